//! A real headless Chromium, driven over WebDriver by Debian's `chromedriver`.
//!
//! The browser is needed: `.ci/run` installs `chromium` and `chromium-driver` when they are
//! missing, and with `CI` set a missing browser fails the test. Elsewhere (a fresh machine
//! running the README's `cargo test` before installing them) the dashboard's browser tests say
//! so on stderr and return.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::wd::Capabilities;
use fantoccini::{Client, ClientBuilder, Locator};

pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// Where screenshots go: `WECHAT_OUTBOX_SCREENSHOTS=docs/dashboard` writes the docs' images.
pub const SCREENSHOTS_ENV: &str = "WECHAT_OUTBOX_SCREENSHOTS";

pub struct Browser {
    pub client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

/// Whether the browser tests can run here; panics in CI when they cannot.
pub fn available() -> bool {
    if Path::new(CHROMEDRIVER).exists() && Path::new(CHROMIUM).exists() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{CHROMEDRIVER} or {CHROMIUM} missing: apt-get install chromium chromium-driver");
    }
    eprintln!(
        "SKIPPED: the dashboard's browser test needs {CHROMIUM} and {CHROMEDRIVER} \
         (apt-get install chromium chromium-driver; .ci/run installs them)"
    );
    false
}

impl Browser {
    pub async fn start() -> Browser {
        let port = {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let profile = tempfile::tempdir().unwrap();
        let mut capabilities = Capabilities::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1360,1000", "--lang=en-US",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(capabilities.clone())
                .connect(&url)
                .await
            {
                Ok(client) => break client,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("no WebDriver session: {e}"),
            }
        };
        Browser {
            client,
            driver,
            _profile: profile,
        }
    }

    pub async fn goto(&self, url: &str) {
        self.client.goto(url).await.expect("page loads");
    }

    /// The text of the first element `css` selects, waiting for it to appear. Read in one
    /// script: a live page may swap its elements between a find and a read.
    pub async fn text(&self, css: &str) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let text = self
                .client
                .execute(
                    "const e = document.querySelector(arguments[0]); return e ? e.innerText : null;",
                    vec![serde_json::json!(css)],
                )
                .await
                .expect("script runs");
            if let Some(text) = text.as_str() {
                return text.to_string();
            }
            assert!(tokio::time::Instant::now() < deadline, "no element {css}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn find(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no element {css}: {e}"))
    }

    pub async fn count(&self, css: &str) -> usize {
        self.client
            .find_all(Locator::Css(css))
            .await
            .expect("find_all")
            .len()
    }

    /// Clicks the element; again if a live page swapped it meanwhile.
    pub async fn click(&self, css: &str) {
        for _ in 0..5 {
            match self.find(css).await.click().await {
                Ok(()) => return,
                Err(fantoccini::error::CmdError::Standard(e))
                    if e.error == fantoccini::error::ErrorStatus::StaleElementReference =>
                {
                    continue;
                }
                Err(e) => panic!("click {css}: {e}"),
            }
        }
        panic!("{css} kept going stale");
    }

    /// Clicks what submits a form or follows a link, and waits until the next page has loaded
    /// (the old page's elements would otherwise still answer).
    pub async fn click_to_next_page(&self, css: &str) {
        self.eval("document.body.dataset.leaving = 'yes'; return null;")
            .await;
        self.click(css).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left = self
                .client
                .execute(
                    "return document.readyState === 'complete' && !document.body.dataset.leaving;",
                    vec![],
                )
                .await
                .ok()
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
            if left {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no next page after clicking {css}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Types into the form field named `name`, replacing what it held.
    pub async fn fill(&self, name: &str, value: &str) {
        let field = self.find(&format!("[name='{name}']")).await;
        field.clear().await.expect("clear");
        field.send_keys(value).await.expect("type");
    }

    /// Chooses `value` in the `select` named `name`.
    pub async fn choose(&self, name: &str, value: &str) {
        let select = self.find(&format!("select[name='{name}']")).await;
        select.select_by_value(value).await.expect("select");
    }

    /// Runs `script` in the page and returns what it returns.
    pub async fn eval(&self, script: &str) -> serde_json::Value {
        self.client
            .execute(script, vec![])
            .await
            .expect("script runs")
    }

    /// The page's path and query.
    pub async fn path(&self) -> String {
        let url = self.client.current_url().await.expect("url");
        match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_string(),
        }
    }

    /// Saves a PNG of the page as `name`.png under `$WECHAT_OUTBOX_SCREENSHOTS`, if set.
    pub async fn screenshot(&self, name: &str) {
        let Some(dir) = std::env::var_os(SCREENSHOTS_ENV).map(PathBuf::from) else {
            return;
        };
        let png = self.client.screenshot().await.expect("screenshot");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }

    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
    }
}
