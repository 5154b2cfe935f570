//! Who may see and act: basic auth or a bearer token (required whenever one is configured,
//! and the configuration requires one for actions or an address that is not loopback), a CSRF
//! token on every form, and headers that keep the pages from running anything but our script.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use secrecy::{ExposeSecret, SecretString};
use sha1::Digest;

use super::Dashboard;
use crate::config::DashboardCredentials;

/// A form is a few fields; anything larger is refused before it is read.
pub const MAX_FORM_BYTES: usize = 64 * 1024;
/// Failed logins allowed per window; beyond, every login is refused until the window ends.
const FAILURES_PER_WINDOW: u32 = 20;
const FAILURE_WINDOW: Duration = Duration::from_secs(10);

/// Page content may come only from the dashboard: an app's `<script>` that escaping missed
/// would still not run.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; \
     base-uri 'none'";

/// The credentials and the CSRF token of this process.
pub struct Access {
    user: String,
    credentials: DashboardCredentials,
    /// Random per process: a form rendered before a restart is refused after it.
    csrf: String,
    /// Failed logins per client address in its current window.
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

/// Clients whose failures are remembered at once; beyond, the oldest windows are forgotten.
const CLIENTS_REMEMBERED: usize = 10_000;

/// Who made a request: the configured user, `token`, or `anyone` when no login is set.
#[derive(Debug, Clone)]
pub struct Actor {
    pub name: String,
    /// By bearer token: no browser sends one by itself, so no CSRF token is asked for.
    by_token: bool,
}

impl Access {
    pub fn new(user: &str, credentials: DashboardCredentials) -> Result<Access> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)
            .map_err(|e| anyhow::anyhow!("no randomness for the dashboard's CSRF token: {e}"))?;
        Ok(Access {
            user: user.to_string(),
            credentials,
            csrf: bytes.iter().map(|b| format!("{b:02x}")).collect(),
            failures: Mutex::new(HashMap::new()),
        })
    }

    pub fn csrf_token(&self) -> &str {
        &self.csrf
    }

    fn required(&self) -> bool {
        self.credentials.password.is_some() || self.credentials.token.is_some()
    }

    /// Who the `Authorization` header names, if it holds a configured credential.
    fn authenticate(&self, headers: &HeaderMap) -> Option<Actor> {
        let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        let (scheme, rest) = value.split_once(' ')?;
        if scheme.eq_ignore_ascii_case("bearer") {
            let token = self.credentials.token.as_ref()?;
            return same_secret(rest.trim(), token).then(|| Actor {
                name: "token".into(),
                by_token: true,
            });
        }
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let password = self.credentials.password.as_ref()?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (user, given) = decoded.split_once(':')?;
        (same_secret(user, &SecretString::from(self.user.clone())) & same_secret(given, password))
            .then(|| Actor {
                name: self.user.clone(),
                by_token: false,
            })
    }

    /// Counts a failed login of `client` (with `failed`); false once its window's allowance
    /// is spent.
    fn allow_attempt(&self, client: IpAddr, failed: bool) -> bool {
        let client = network_of(client);
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = failures.get_mut(&client) else {
            if failed {
                if failures.len() >= CLIENTS_REMEMBERED {
                    // Forget windows that ended, then clients under the limit; a client over
                    // it is never forgotten before its window ends.
                    failures.retain(|_, (since, count)| {
                        since.elapsed() <= FAILURE_WINDOW && *count > FAILURES_PER_WINDOW
                    });
                }
                if failures.len() < CLIENTS_REMEMBERED {
                    failures.insert(client, (Instant::now(), 1));
                }
            }
            return true;
        };
        if entry.0.elapsed() > FAILURE_WINDOW {
            *entry = (Instant::now(), 0);
        }
        if failed {
            entry.1 = entry.1.saturating_add(1);
        }
        entry.1 <= FAILURES_PER_WINDOW
    }
}

/// The client as failures are counted: its IPv4 address, or its IPv6 /64 (one host commonly
/// holds a whole /64).
fn network_of(client: IpAddr) -> IpAddr {
    match client {
        IpAddr::V4(_) => client,
        IpAddr::V6(v6) => {
            let mut octets = v6.octets();
            octets[8..].fill(0);
            IpAddr::from(octets)
        }
    }
}

/// Compares without an early exit on the first differing byte: the digests of both sides,
/// every byte of them.
fn same_secret(given: &str, expected: &SecretString) -> bool {
    let a = sha1::Sha1::digest(given.as_bytes());
    let b = sha1::Sha1::digest(expected.expose_secret().as_bytes());
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Every request: login when one is required, the CSRF token and origin on every POST, and
/// the security headers on every answer.
pub async fn guard(
    State(dashboard): State<Arc<Dashboard>>,
    request: Request,
    next: Next,
) -> Response {
    let access = &dashboard.access;
    let actor = if access.required() {
        // Failed logins are counted per client address: one that failed too often is refused
        // before its login is compared, and cannot lock out the operator elsewhere.
        let client = request
            .extensions()
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |c| c.0.ip());
        if !access.allow_attempt(client, false) {
            return refused(
                StatusCode::TOO_MANY_REQUESTS,
                "too many failed logins; wait a few seconds",
            );
        }
        match access.authenticate(request.headers()) {
            Some(actor) => actor,
            None => {
                let attempted = request.headers().contains_key(header::AUTHORIZATION);
                if attempted && !access.allow_attempt(client, true) {
                    tracing::warn!(
                        client = %client,
                        "dashboard: failed logins over the limit; refusing this client's logins for a few seconds"
                    );
                }
                let mut response = refused(StatusCode::UNAUTHORIZED, "login required");
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"wechat-outbox\", charset=\"UTF-8\""),
                );
                return response;
            }
        }
    } else {
        // Without a login, only requests that name the machine by address or as localhost:
        // a web page the operator opens cannot point a name of its own at 127.0.0.1 (DNS
        // rebinding) and read the pages.
        if !named_by_address(request.headers()) {
            return refused(
                StatusCode::MISDIRECTED_REQUEST,
                "without a login the dashboard answers only to its address or localhost",
            );
        }
        Actor {
            name: "anyone".into(),
            by_token: false,
        }
    };
    let request = if request.method() == Method::POST {
        match checked_post(access, &actor, request).await {
            Ok(request) => request,
            Err(response) => return response,
        }
    } else {
        request
    };
    let mut request = request;
    request.extensions_mut().insert(actor);
    // At most a few pages read the database at once: under `run` the pool is the senders'.
    // The page runs in a task of its own that holds the permit to its end, so that a client
    // that hangs up cannot leave its statement running beyond the count. The overview reads
    // figures kept in memory (and reads them one at a time), the static files nothing.
    let path = request.uri().path();
    let mut response = if path == "/" || path.starts_with("/static/") {
        next.run(request).await
    } else {
        let permit =
            tokio::time::timeout(READER_WAIT, dashboard.queries.clone().acquire_owned()).await;
        let Ok(Ok(permit)) = permit else {
            return refused(
                StatusCode::SERVICE_UNAVAILABLE,
                "the dashboard is busy with other pages; try again in a moment",
            );
        };
        let page = tokio::spawn(async move {
            let _permit = permit;
            next.run(request).await
        });
        match page.await {
            Ok(response) => response,
            Err(_) => refused(StatusCode::INTERNAL_SERVER_ERROR, "the page failed"),
        }
    };
    secure(response.headers_mut());
    response
}

/// How long a page waits for a turn to read the database before it is answered 503.
const READER_WAIT: Duration = Duration::from_secs(10);

/// A POST passes with a form whose `csrf` field is this process's token, from a page of this
/// dashboard (Origin, when the browser sends it, names the same host). The body is read here
/// (it is small) and handed on.
async fn checked_post(
    access: &Access,
    actor: &Actor,
    request: Request,
) -> Result<Request, Response> {
    if actor.by_token {
        return Ok(request);
    }
    let headers = request.headers();
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        let origin_host = origin
            .to_str()
            .ok()
            .and_then(|o| o.split_once("://"))
            .map(|(_, host)| host);
        if host.is_none() || origin_host != host {
            return Err(refused(
                StatusCode::FORBIDDEN,
                "the form came from another site",
            ));
        }
    }
    if headers
        .get("sec-fetch-site")
        .is_some_and(|s| s != "same-origin" && s != "none")
    {
        return Err(refused(
            StatusCode::FORBIDDEN,
            "the form came from another site",
        ));
    }
    let (parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_FORM_BYTES).await else {
        return Err(refused(StatusCode::PAYLOAD_TOO_LARGE, "form too large"));
    };
    let token = form_urlencoded::parse(&bytes)
        .find(|(key, _)| key == "csrf")
        .map(|(_, value)| value.into_owned())
        .unwrap_or_default();
    if !same_secret(&token, &SecretString::from(access.csrf.clone())) {
        return Err(refused(
            StatusCode::FORBIDDEN,
            "the form's CSRF token is missing or out of date: reload the page and try again",
        ));
    }
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

/// Whether the Host header names an IP address or localhost (with any port).
fn named_by_address(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

fn refused(status: StatusCode, why: &'static str) -> Response {
    let mut response = (status, format!("{why}\n")).into_response();
    secure(response.headers_mut());
    response
}

fn secure(headers: &mut HeaderMap) {
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        // Not `no-referrer`: with it a browser sends `Origin: null` on the forms' POSTs.
        (header::REFERRER_POLICY, "same-origin"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(password: Option<&str>, token: Option<&str>) -> Access {
        Access::new(
            "ops",
            DashboardCredentials {
                password: password.map(|p| SecretString::from(p.to_string())),
                token: token.map(|t| SecretString::from(t.to_string())),
            },
        )
        .unwrap()
    }

    fn with(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        headers
    }

    fn basic(user: &str, password: &str) -> String {
        let pair = format!("{user}:{password}");
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        )
    }

    #[test]
    fn basic_auth_needs_the_user_and_the_password() {
        let a = access(Some("correct horse battery"), None);
        assert_eq!(
            a.authenticate(&with(&basic("ops", "correct horse battery")))
                .map(|a| a.name),
            Some("ops".into())
        );
        for wrong in [
            basic("ops", "correct horse batter"),
            basic("root", "correct horse battery"),
            basic("ops", ""),
            "Basic !!!".into(),
            "Bearer correct horse battery".into(),
        ] {
            assert!(a.authenticate(&with(&wrong)).is_none(), "{wrong}");
        }
    }

    #[test]
    fn a_bearer_token_is_its_own_actor() {
        let a = access(None, Some("a-token-of-sixteen+"));
        let actor = a.authenticate(&with("Bearer a-token-of-sixteen+")).unwrap();
        assert!(actor.by_token && actor.name == "token");
        assert!(
            a.authenticate(&with(&basic("ops", "a-token-of-sixteen+")))
                .is_none()
        );
    }

    #[test]
    fn failed_logins_beyond_the_allowance_are_refused() {
        let a = access(Some("correct horse battery"), None);
        let (guesser, operator) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        for _ in 0..FAILURES_PER_WINDOW {
            assert!(a.allow_attempt(guesser, true));
        }
        assert!(!a.allow_attempt(guesser, true));
        assert!(
            !a.allow_attempt(guesser, false),
            "refused before its login is compared"
        );
        assert!(
            a.allow_attempt(operator, false),
            "another client is not locked out"
        );
    }

    #[test]
    fn an_open_dashboard_answers_to_addresses_and_localhost_only() {
        let host = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::HOST, HeaderValue::from_str(value).unwrap());
            named_by_address(&headers)
        };
        for ok in [
            "127.0.0.1:9480",
            "localhost:9480",
            "LOCALHOST",
            "[::1]:9480",
            "10.0.0.5",
        ] {
            assert!(host(ok), "{ok}");
        }
        for rebound in [
            "evil.example:9480",
            "evil.example",
            "127.0.0.1.nip.io:9480",
            "",
        ] {
            assert!(!host(rebound), "{rebound}");
        }
        assert!(!named_by_address(&HeaderMap::new()));
    }

    #[test]
    fn each_process_has_its_own_csrf_token() {
        let (a, b) = (access(None, None), access(None, None));
        assert_eq!(a.csrf_token().len(), 64);
        assert_ne!(a.csrf_token(), b.csrf_token());
    }
}
