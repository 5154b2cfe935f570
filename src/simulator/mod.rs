//! A WeChat API simulator: the endpoints the daemon calls, with WeChat's wire format and rules
//! (token expiry and invalidation, `client_msg_id` de-duplication, 64-bit msgids, errcodes for
//! bad openids, templates and data), injectable faults, and a count of what reached users.
//!
//! Conventions (docs/simulator.md): an openid must look like `o…` (else 40003); one containing
//! `unfollowed` answers 43004, one containing `refuse` 43101. Delivery events say
//! `failed:user block` for openids containing `block`, `failed: system failed` for `sysfail`,
//! `failed:freq limit` for `freqlimit`, and `success` otherwise. What WeChat added since 2023
//! is in `today`.

pub mod push;
pub mod subscribe;
pub mod today;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What the simulator gets wrong on purpose, each as a fraction of template sends.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Answer errcode -1 (system busy) without delivering.
    pub busy_rate: f64,
    /// Answer HTTP 502 without delivering.
    pub http_error_rate: f64,
    /// Deliver, then never answer (the caller's timeout fires): the ambiguous case.
    pub hang_rate: f64,
    /// Deliver, then answer 200 with a body that is not JSON.
    pub garbage_rate: f64,
    /// Answer `errcode` (for example 45009) without delivering.
    pub errcode_rate: f64,
    pub errcode: i64,
    /// Only for sends of this appid (all appids when unset).
    pub errcode_appid: Option<String>,
    /// Wait this long before answering every send.
    pub delay_ms: u64,
}

/// A template as `get_all_private_template` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct SimTemplate {
    pub template_id: String,
    pub title: String,
    pub content: String,
}

/// Where delivery events go, and how they are signed and sealed.
#[derive(Debug, Clone)]
pub struct CallbackTarget {
    pub url: String,
    pub token: String,
    /// Safe mode: encrypt each push with this EncodingAESKey and the sending appid.
    pub encoding_aes_key: Option<String>,
}

#[derive(Debug, Clone)]
pub struct SimSettings {
    pub faults: Faults,
    /// Answer 40037 for template ids not in `templates`.
    pub strict_templates: bool,
    pub templates: Vec<SimTemplate>,
    /// appid → secret; empty accepts any non-empty pair.
    pub credentials: HashMap<String, String>,
    pub token_lifetime: Duration,
    /// How long a replaced token keeps working (WeChat: about 5 minutes).
    pub token_grace: Duration,
    /// How long `client_msg_id` de-duplicates (WeChat: 10 minutes).
    pub dedup_window: Duration,
    pub callback: Option<CallbackTarget>,
    pub event_delay: Duration,
    /// Push each event before answering the send, so it races the sender's bookkeeping.
    pub events_before_answer: bool,
    /// How many times each event is pushed (WeChat repeats pushes it thinks were lost).
    pub event_copies: u32,
    /// Record what users see under the 2023 rules (`Delivery::shown`).
    pub content_rules_2023: bool,
    /// Template sends accepted per appid per day (Beijing time); beyond it, 45009.
    pub daily_limit: u64,
    /// (openid, template_id) pairs whose user refused the template: 43101.
    pub refusals: Vec<(String, String)>,
    /// Sends to one openid closer than this answer 43117 (zero: never).
    pub per_user_interval: Duration,
    /// The same template and data to the same openid again within this answer 40241, even
    /// with the same `client_msg_id` (zero: never).
    pub duplicate_window: Duration,
    /// The category template library `api_add_template` copies from.
    pub library: Vec<today::LibraryTemplate>,
    /// Templates an account may hold; `api_add_template` beyond it answers 45026.
    pub max_private_templates: usize,
    /// Subscription templates `gettemplate` lists and `bizsend` accepts.
    pub subscribe_templates: Vec<subscribe::SimSubscribeTemplate>,
    /// Answer every `bizsend` with this errcode (48001: an account without the feature).
    pub subscribe_errcode: Option<i64>,
}

impl Default for SimSettings {
    fn default() -> Self {
        SimSettings {
            faults: Faults::default(),
            strict_templates: false,
            templates: demo_templates(),
            credentials: HashMap::new(),
            token_lifetime: Duration::from_secs(7200),
            token_grace: Duration::from_secs(300),
            dedup_window: Duration::from_secs(600),
            callback: None,
            event_delay: Duration::from_millis(50),
            events_before_answer: false,
            event_copies: 1,
            content_rules_2023: true,
            daily_limit: 100_000,
            refusals: Vec::new(),
            per_user_interval: Duration::ZERO,
            duplicate_window: Duration::ZERO,
            library: today::demo_library(),
            max_private_templates: 25,
            subscribe_templates: subscribe::demo_subscribe_templates(),
            subscribe_errcode: None,
        }
    }
}

/// Templates the simulator lists out of the box; the first is the 2014 interface page's example.
pub fn demo_templates() -> Vec<SimTemplate> {
    vec![
        SimTemplate {
            template_id: "ngqIpbwh8bUfcSsECmogfXcV14J0tQlEpBO27izEYtY".into(),
            title: "购买成功通知".into(),
            content: "{{first.DATA}}\n商品：{{keynote1.DATA}}\n金额：{{keynote2.DATA}}\n时间：{{keynote3.DATA}}\n{{remark.DATA}}".into(),
        },
        SimTemplate {
            template_id: "TEMPLATE_ID".into(),
            title: "通知".into(),
            content: "{{first.DATA}}".into(),
        },
    ]
}

/// Counters a test or a staging user reads from `GET /sim/stats`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    /// Template send requests received.
    pub send_requests: u64,
    /// The most send requests being answered at one time.
    pub peak_sends_in_flight: u64,
    /// Messages that reached a user (each counted once per delivery).
    pub delivered: u64,
    /// Deliveries of a message the same user had already received.
    pub duplicate_deliveries: u64,
    /// Resends answered from the `client_msg_id` window without a second delivery.
    pub deduplicated: u64,
    /// Access tokens issued (by either token endpoint).
    pub tokens_issued: u64,
    /// Answers by errcode (as text, for JSON), including 0.
    pub errcodes: HashMap<String, u64>,
    /// Faults injected, by kind.
    pub faults: HashMap<String, u64>,
    /// Delivery events pushed and acknowledged, and pushes that failed all retries.
    pub events_acknowledged: u64,
    pub events_failed: u64,
    /// Subscription notifications accepted by `bizsend` (also counted in `delivered`).
    pub subscribe_sends: u64,
}

/// One message that reached a user.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delivery {
    pub appid: String,
    pub touser: String,
    pub template_id: String,
    pub client_msg_id: Option<String>,
    pub msgid: i64,
    pub data: Value,
    /// What the user sees under the 2023 rules (`null` when they are off).
    pub shown: Value,
}

struct IssuedToken {
    appid: String,
    expires: Instant,
    /// Set when a newer token replaced it; it works until then.
    retired_at: Option<Instant>,
}

#[derive(Default)]
pub(crate) struct SimState {
    tokens: HashMap<String, IssuedToken>,
    /// appid → the token the stable endpoint hands out.
    stable: HashMap<String, String>,
    /// (appid, openid, client_msg_id) → (msgid, first seen).
    dedup: HashMap<(String, String, String), (i64, Instant)>,
    /// What each user received, to count duplicates: (appid, openid, message key) → count.
    received: HashMap<(String, String, String), u64>,
    deliveries: Vec<Delivery>,
    next_msgid: i64,
    sends_in_flight: u64,
    stats: Stats,
    /// (appid, day) → template sends accepted.
    quota_used: HashMap<(String, String), u64>,
    /// (appid, openid) → the last delivery.
    last_send: HashMap<(String, String), Instant>,
    /// (appid, openid, template and data) → the last delivery of that content.
    recent_content: HashMap<(String, String, String), Instant>,
    /// (appid, openid, subscription template) → the user's consent.
    consents: HashMap<(String, String, String), subscribe::SimConsent>,
}

impl SimState {
    /// The next msgid: 64-bit, past 32 bits from the start, as WeChat's are.
    pub(crate) fn new_msgid(&mut self) -> i64 {
        let msgid = self.next_msgid;
        self.next_msgid += 1;
        msgid
    }

    /// A message reached its user: counted, and counted again as a duplicate when the same
    /// user already had the message `message_key` names.
    pub(crate) fn record_delivery(&mut self, message_key: String, delivery: Delivery) {
        let seen = self
            .received
            .entry((delivery.appid.clone(), delivery.touser.clone(), message_key))
            .or_default();
        *seen += 1;
        if *seen > 1 {
            self.stats.duplicate_deliveries += 1;
        }
        self.stats.delivered += 1;
        self.deliveries.push(delivery);
    }
}

/// Counts a send request as in flight until it is answered (or its client went away).
struct SendInFlight<'a>(&'a Simulator);

impl<'a> SendInFlight<'a> {
    fn begin(sim: &'a Simulator) -> SendInFlight<'a> {
        let mut state = sim.state.lock().expect("sim state");
        state.sends_in_flight += 1;
        state.stats.peak_sends_in_flight =
            state.stats.peak_sends_in_flight.max(state.sends_in_flight);
        SendInFlight(sim)
    }
}

impl Drop for SendInFlight<'_> {
    fn drop(&mut self) {
        self.0.state.lock().expect("sim state").sends_in_flight -= 1;
    }
}

pub struct Simulator {
    settings: Mutex<SimSettings>,
    state: Mutex<SimState>,
    http: reqwest::Client,
}

impl Simulator {
    pub fn new(settings: SimSettings) -> Arc<Simulator> {
        Arc::new(Simulator {
            settings: Mutex::new(settings),
            state: Mutex::new(SimState {
                next_msgid: 3_000_000_000,
                ..SimState::default()
            }),
            http: crate::wechat::api::http_client(
                reqwest::Client::builder().timeout(Duration::from_secs(5)),
            )
            .expect("HTTP client"),
        })
    }

    pub fn stats(&self) -> Stats {
        self.state.lock().expect("sim state").stats.clone()
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.state.lock().expect("sim state").deliveries.clone()
    }

    pub fn set_faults(&self, faults: Faults) {
        self.settings.lock().expect("sim settings").faults = faults;
    }

    pub fn set_callback(&self, callback: Option<CallbackTarget>) {
        self.settings.lock().expect("sim settings").callback = callback;
    }

    /// Changes any setting while the simulator runs.
    pub fn update(&self, change: impl FnOnce(&mut SimSettings)) {
        change(&mut self.settings.lock().expect("sim settings"));
    }

    /// Every token stops working at once, as when another service forced a refresh.
    pub fn invalidate_tokens(&self) {
        let mut state = self.state.lock().expect("sim state");
        state.tokens.clear();
        state.stable.clear();
    }

    fn settings(&self) -> SimSettings {
        self.settings.lock().expect("sim settings").clone()
    }

    fn issue_token(
        &self,
        appid: &str,
        state: &mut SimState,
        lifetime: Duration,
        grace: Duration,
    ) -> String {
        let token = format!("SIM{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        let now = Instant::now();
        for old in state
            .tokens
            .values_mut()
            .filter(|t| t.appid == appid && t.retired_at.is_none())
        {
            old.retired_at = Some(now + grace);
        }
        state.tokens.insert(
            token.clone(),
            IssuedToken {
                appid: appid.into(),
                expires: now + lifetime,
                retired_at: None,
            },
        );
        state.stats.tokens_issued += 1;
        token
    }

    /// The appid a token belongs to, or the errcode WeChat gives for it.
    fn check_token(
        &self,
        token: Option<&str>,
        state: &SimState,
    ) -> Result<String, (i64, &'static str)> {
        let token = token
            .filter(|t| !t.is_empty())
            .ok_or((41001, "access_token missing"))?;
        let issued = state.tokens.get(token).ok_or((
            40001,
            "invalid credential, access_token is invalid or not latest",
        ))?;
        let now = Instant::now();
        if issued.expires <= now {
            return Err((42001, "access_token expired"));
        }
        if issued.retired_at.is_some_and(|at| at <= now) {
            return Err((
                40001,
                "invalid credential, access_token is invalid or not latest",
            ));
        }
        Ok(issued.appid.clone())
    }

    fn check_credentials(&self, appid: &str, secret: &str) -> Result<(), (i64, &'static str)> {
        if appid.is_empty() {
            return Err((41002, "appid missing"));
        }
        if secret.is_empty() {
            return Err((41004, "appsecret missing"));
        }
        let settings = self.settings.lock().expect("sim settings");
        match settings.credentials.get(appid) {
            Some(expected) if expected != secret => Err((40125, "invalid appsecret")),
            None if !settings.credentials.is_empty() => Err((40013, "invalid appid")),
            _ => Ok(()),
        }
    }
}

/// Serves the simulator until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    sim: Arc<Simulator>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(sim))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Binds `addr` (port 0 for any) and serves in the background; returns the bound address.
pub async fn spawn(
    addr: SocketAddr,
    sim: Arc<Simulator>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(serve(listener, sim, shutdown));
    Ok(bound)
}

pub fn router(sim: Arc<Simulator>) -> Router {
    Router::new()
        .route("/cgi-bin/token", get(classic_token))
        .route("/cgi-bin/stable_token", post(stable_token))
        .route("/cgi-bin/message/template/send", post(send_template))
        .route("/cgi-bin/message/subscribe/bizsend", post(send_subscribe))
        .route("/wxaapi/newtmpl/gettemplate", get(subscribe::get_templates))
        .route("/sim/subscribe/popup", post(subscribe::popup))
        .route("/sim/subscribe/change", post(subscribe::change))
        .route(
            "/cgi-bin/template/get_all_private_template",
            get(list_templates),
        )
        .route(
            "/cgi-bin/template/api_add_template",
            post(today::add_template),
        )
        .route(
            "/cgi-bin/template/del_private_template",
            post(today::delete_template),
        )
        .route("/cgi-bin/openapi/quota/get", post(today::quota_get))
        .route(
            "/sim/stats",
            get(|State(sim): State<Arc<Simulator>>| async move { Json(sim.stats()) }),
        )
        .route(
            "/sim/deliveries",
            get(|State(sim): State<Arc<Simulator>>| async move { Json(sim.deliveries()) }),
        )
        .route(
            "/sim/faults",
            post(
                |State(sim): State<Arc<Simulator>>, Json(f): Json<Faults>| async move {
                    sim.set_faults(f);
                    Json(json!({"ok": true}))
                },
            ),
        )
        .route(
            "/sim/invalidate-tokens",
            post(|State(sim): State<Arc<Simulator>>| async move {
                sim.invalidate_tokens();
                Json(json!({"ok": true}))
            }),
        )
        .with_state(sim)
}

/// An openid as WeChat issues them: `o`, then 6-64 letters, digits, `_` or `-` in all.
pub(crate) fn valid_openid(touser: &str) -> bool {
    touser.starts_with('o')
        && (6..=64).contains(&touser.len())
        && touser
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

pub(crate) fn errcode(code: i64, msg: &str) -> Json<Value> {
    Json(json!({"errcode": code, "errmsg": msg}))
}

#[derive(Deserialize)]
struct ClassicTokenQuery {
    grant_type: Option<String>,
    appid: Option<String>,
    secret: Option<String>,
}

async fn classic_token(
    State(sim): State<Arc<Simulator>>,
    Query(q): Query<ClassicTokenQuery>,
) -> Json<Value> {
    if q.grant_type.as_deref() != Some("client_credential") {
        return errcode(40002, "invalid grant_type");
    }
    let (appid, secret) = (q.appid.unwrap_or_default(), q.secret.unwrap_or_default());
    if let Err((code, msg)) = sim.check_credentials(&appid, &secret) {
        return errcode(code, msg);
    }
    let settings = sim.settings();
    let mut state = sim.state.lock().expect("sim state");
    let token = sim.issue_token(
        &appid,
        &mut state,
        settings.token_lifetime,
        settings.token_grace,
    );
    Json(json!({"access_token": token, "expires_in": settings.token_lifetime.as_secs()}))
}

#[derive(Deserialize)]
struct StableTokenRequest {
    grant_type: Option<String>,
    appid: Option<String>,
    secret: Option<String>,
    #[serde(default)]
    force_refresh: bool,
}

async fn stable_token(State(sim): State<Arc<Simulator>>, body: axum::body::Bytes) -> Json<Value> {
    let Ok(req) = serde_json::from_slice::<StableTokenRequest>(&body) else {
        return errcode(47001, "data format error");
    };
    if req.grant_type.as_deref() != Some("client_credential") {
        return errcode(40002, "invalid grant_type");
    }
    let (appid, secret) = (
        req.appid.unwrap_or_default(),
        req.secret.unwrap_or_default(),
    );
    if let Err((code, msg)) = sim.check_credentials(&appid, &secret) {
        return errcode(code, msg);
    }
    let settings = sim.settings();
    let mut state = sim.state.lock().expect("sim state");
    let current = state
        .stable
        .get(&appid)
        .cloned()
        .filter(|t| sim.check_token(Some(t), &state).is_ok());
    let token = match current {
        Some(token) if !req.force_refresh => token,
        _ => {
            let token = sim.issue_token(
                &appid,
                &mut state,
                settings.token_lifetime,
                settings.token_grace,
            );
            state.stable.insert(appid, token.clone());
            token
        }
    };
    let remaining = state
        .tokens
        .get(&token)
        .map(|t| {
            t.expires
                .saturating_duration_since(Instant::now())
                .as_secs()
        })
        .unwrap_or(0);
    Json(json!({"access_token": token, "expires_in": remaining}))
}

#[derive(Deserialize)]
pub(crate) struct TokenQuery {
    pub(crate) access_token: Option<String>,
}

async fn list_templates(
    State(sim): State<Arc<Simulator>>,
    Query(q): Query<TokenQuery>,
) -> Json<Value> {
    let state = sim.state.lock().expect("sim state");
    if let Err((code, msg)) = sim.check_token(q.access_token.as_deref(), &state) {
        return errcode(code, msg);
    }
    let templates = sim.settings().templates;
    Json(json!({"template_list": templates}))
}

enum Fault {
    Errcode(i64),
    Busy,
    HttpError,
    Hang,
    Garbage,
}

fn draw_fault(faults: &Faults) -> Option<Fault> {
    let roll = fastrand::f64();
    let mut edge = 0.0;
    for (rate, fault) in [
        (faults.busy_rate, Fault::Busy),
        (faults.http_error_rate, Fault::HttpError),
        (faults.hang_rate, Fault::Hang),
        (faults.garbage_rate, Fault::Garbage),
        (faults.errcode_rate, Fault::Errcode(faults.errcode)),
    ] {
        edge += rate;
        if roll < edge {
            return Some(fault);
        }
    }
    None
}

async fn send_template(
    State(sim): State<Arc<Simulator>>,
    Query(q): Query<TokenQuery>,
    body: axum::body::Bytes,
) -> Response {
    send(sim, q, body, false).await
}

/// `POST /cgi-bin/message/subscribe/bizsend`, with the same faults as a template send.
async fn send_subscribe(
    State(sim): State<Arc<Simulator>>,
    Query(q): Query<TokenQuery>,
    body: axum::body::Bytes,
) -> Response {
    send(sim, q, body, true).await
}

async fn send(
    sim: Arc<Simulator>,
    q: TokenQuery,
    body: axum::body::Bytes,
    subscribe: bool,
) -> Response {
    let _in_flight = SendInFlight::begin(&sim);
    let settings = sim.settings();
    if settings.faults.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(settings.faults.delay_ms)).await;
    }
    let mut fault = draw_fault(&settings.faults);
    let mut event_to_push = None;
    let (code, msg, msgid) = {
        let mut state = sim.state.lock().expect("sim state");
        state.stats.send_requests += 1;
        if let (Some(Fault::Errcode(_)), Some(only)) = (&fault, &settings.faults.errcode_appid) {
            let appid = q
                .access_token
                .as_deref()
                .and_then(|t| state.tokens.get(t))
                .map(|t| t.appid.as_str());
            if appid != Some(only.as_str()) {
                fault = None;
            }
        }
        let name = match fault {
            Some(Fault::Busy) => Some("busy"),
            Some(Fault::HttpError) => Some("http_error"),
            Some(Fault::Hang) => Some("hang"),
            Some(Fault::Garbage) => Some("garbage"),
            Some(Fault::Errcode(_)) => Some("errcode"),
            None => None,
        };
        if let Some(name) = name {
            *state.stats.faults.entry(name.into()).or_default() += 1;
        }
        match fault {
            Some(Fault::HttpError) => {
                return (StatusCode::BAD_GATEWAY, "502 Bad Gateway").into_response();
            }
            Some(Fault::Busy) => {
                *state.stats.errcodes.entry("-1".into()).or_default() += 1;
                return errcode(-1, "system error").into_response();
            }
            Some(Fault::Errcode(code)) => {
                *state.stats.errcodes.entry(code.to_string()).or_default() += 1;
                return errcode(code, "injected by the simulator").into_response();
            }
            _ => {}
        }
        let token = q.access_token.as_deref();
        let outcome = if subscribe {
            sim.deliver_subscribe(&mut state, &settings, token, &body)
        } else {
            sim.deliver(&mut state, &settings, token, &body)
        };
        let (code, msg, msgid) = match outcome {
            Ok((msgid, event)) => {
                event_to_push = event.zip(settings.callback.clone());
                (0, "ok", Some(msgid))
            }
            Err((code, msg)) => (code, msg, None),
        };
        *state.stats.errcodes.entry(code.to_string()).or_default() += 1;
        (code, msg, msgid)
    };
    if let Some((event, target)) = event_to_push {
        let copies = settings.event_copies.max(1);
        if settings.events_before_answer {
            push::push_event(&sim, &target, &event, copies).await;
        } else {
            push::spawn_event(sim.clone(), target, event, settings.event_delay, copies);
        }
    }
    match fault {
        Some(Fault::Hang) => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            errcode(-1, "system error").into_response()
        }
        Some(Fault::Garbage) => {
            (StatusCode::OK, "<html><body>502 gateway</body></html>").into_response()
        }
        _ => match msgid {
            Some(msgid) => {
                Json(json!({"errcode": 0, "errmsg": "ok", "msgid": msgid})).into_response()
            }
            None => errcode(code, msg).into_response(),
        },
    }
}

#[derive(Deserialize)]
struct SendRequest {
    touser: Option<String>,
    template_id: Option<String>,
    data: Option<Value>,
    client_msg_id: Option<String>,
}

impl Simulator {
    /// Checks a send like WeChat does and delivers it once per (openid, client_msg_id) window.
    /// Returns the msgid and, for a new delivery, the event to push.
    fn deliver(
        &self,
        state: &mut SimState,
        settings: &SimSettings,
        token: Option<&str>,
        body: &[u8],
    ) -> Result<(i64, Option<push::Event>), (i64, &'static str)> {
        let appid = self.check_token(token, state)?;
        let req: SendRequest =
            serde_json::from_slice(body).map_err(|_| (47001, "data format error"))?;
        let touser = req.touser.unwrap_or_default();
        if !valid_openid(&touser) {
            return Err((40003, "invalid openid"));
        }
        let template_id = req.template_id.unwrap_or_default();
        if template_id.is_empty() || template_id.len() > 64 {
            return Err((40036, "invalid template_id size"));
        }
        if settings.strict_templates
            && !settings
                .templates
                .iter()
                .any(|t| t.template_id == template_id)
        {
            return Err((40037, "invalid template_id"));
        }
        let data = req.data.unwrap_or(Value::Null);
        let well_formed = data.as_object().is_some_and(|params| {
            params
                .values()
                .all(|p| p.get("value").is_some_and(Value::is_string))
        });
        if !well_formed {
            return Err((47003, "argument invalid! data.value invalid"));
        }
        if touser.contains("unfollowed") {
            return Err((43004, "require subscribe"));
        }
        if today::refused(&settings.refusals, &touser, &template_id) {
            return Err((43101, "user refuse to accept the msg"));
        }
        let now = Instant::now();
        let content_key = (!settings.duplicate_window.is_zero()).then(|| {
            (
                appid.clone(),
                touser.clone(),
                format!("{template_id}:{data}"),
            )
        });
        if let Some(key) = &content_key
            && state
                .recent_content
                .get(key)
                .is_some_and(|at| now.duration_since(*at) < settings.duplicate_window)
        {
            return Err((40241, "duplicate message within 60 seconds"));
        }
        if let Some(key) = &req.client_msg_id {
            let dedup_key = (appid.clone(), touser.clone(), key.clone());
            if let Some((msgid, at)) = state.dedup.get(&dedup_key)
                && now.duration_since(*at) < settings.dedup_window
            {
                let msgid = *msgid;
                state.stats.deduplicated += 1;
                return Ok((msgid, None));
            }
        }
        if state.too_frequent(&appid, &touser, settings.per_user_interval, now) {
            return Err((43117, "too frequently to this openid"));
        }
        if state.used_today(&appid) >= settings.daily_limit {
            return Err((45009, "reach max api daily quota limit"));
        }
        *state
            .quota_used
            .entry((appid.clone(), today::quota_day()))
            .or_default() += 1;
        // Kept only when their rule is on: a benchmark's million sends need neither.
        if !settings.per_user_interval.is_zero() {
            state.last_send.insert((appid.clone(), touser.clone()), now);
        }
        if let Some(key) = content_key {
            state.recent_content.insert(key, now);
        }
        let msgid = state.new_msgid();
        if let Some(key) = &req.client_msg_id {
            state
                .dedup
                .insert((appid.clone(), touser.clone(), key.clone()), (msgid, now));
        }
        // A message is the same message when its key (or, without one, its content) repeats.
        let message_key = req
            .client_msg_id
            .clone()
            .unwrap_or_else(|| format!("{template_id}:{data}"));
        let shown = if settings.content_rules_2023 {
            today::shown(&data)
        } else {
            Value::Null
        };
        state.record_delivery(
            message_key,
            Delivery {
                appid: appid.clone(),
                touser: touser.clone(),
                template_id,
                client_msg_id: req.client_msg_id,
                msgid,
                data,
                shown,
            },
        );
        Ok((
            msgid,
            Some(push::Event::template_finished(&appid, &touser, msgid)),
        ))
    }
}
