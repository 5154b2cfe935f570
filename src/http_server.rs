//! Serving an axum router on a configured address until shutdown: the callback endpoint and
//! the monitor endpoint both start this way.
//!
//! Our own accept loop over hyper rather than `axum::serve`, which has no read timeouts and no
//! connection cap: a few hundred clients trickling their headers held every file descriptor.
//! Here a connection must complete its request head within `header_timeout` (counted from the
//! accept, or from the first byte of a later request), its body within `body_timeout` (408),
//! and may sit idle between requests for `idle_timeout`; beyond `max_connections` open ones a
//! new connection is accepted and closed at once, so that it fails fast instead of waiting in
//! the backlog.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response, StatusCode, header};
use futures_util::StreamExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What one listener lets its clients take.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Open connections at once; more are closed on accept.
    pub max_connections: usize,
    /// From the accept (or a later request's first byte) to the end of the request head.
    pub header_timeout: Duration,
    /// From the end of the head to the end of the body, for handlers that read one.
    pub body_timeout: Duration,
    /// How long a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
}

/// hyper's read buffer bound (its default is ~400 KB): a request head larger than this is
/// refused, so a thousand slow clients hold at most 64 MB.
const MAX_BUF_BYTES: usize = 64 * 1024;
/// Warnings about refused or failed accepts, at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Binds `listen` (named `setting` in errors) and serves `router` until `shutdown`; returns the
/// bound address and the serving task.
pub async fn spawn(
    setting: &'static str,
    listen: &str,
    router: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("{setting} {listen}: {e}"))?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(serve(setting, listener, router, limits, shutdown));
    Ok((addr, task))
}

async fn serve(
    setting: &'static str,
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let connections = TaskTracker::new();
    let mut over_cap = Throttled::default();
    let mut accept_errors = Throttled::default();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                if let Some(more) = accept_errors.due() {
                    tracing::warn!(error = %e, setting, more, "cannot accept a connection");
                }
                // Out of file descriptors, say: the error repeats until one is closed.
                if !is_connection_error(&e) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            drop(stream);
            if let Some(more) = over_cap.due() {
                tracing::warn!(
                    setting,
                    max_connections = limits.max_connections,
                    more,
                    "connection closed on accept: at the cap of open connections"
                );
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        connections.spawn(serve_connection(
            stream,
            router.clone(),
            limits,
            shutdown.clone(),
            permit,
        ));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Counts events and says when to log them: the first at once, then at most every
/// `WARN_EVERY`, with how many happened meanwhile.
#[derive(Default)]
struct Throttled {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttled {
    fn due(&mut self) -> Option<u64> {
        self.due_at(Instant::now())
    }

    fn due_at(&mut self, now: Instant) -> Option<u64> {
        if self.last.is_some_and(|at| now < at + WARN_EVERY) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

async fn serve_connection(
    stream: TcpStream,
    router: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let peer = stream.peer_addr().ok();
    let phase = Arc::new(Phase::new());
    let io = TokioIo::new(Watched {
        inner: stream,
        phase: phase.clone(),
    });
    let service = {
        let phase = phase.clone();
        let router = TowerToHyperService::new(router);
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let in_request = phase.request_started();
            let deadline = BodyDeadline::default();
            let mut request = deadline.wrap(request, limits.body_timeout);
            // Who is asking, for handlers that count per client (the dashboard's logins).
            if let Some(peer) = peer {
                request
                    .extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
            }
            let answer = hyper::service::Service::call(&router, request);
            async move {
                let response = answer.await?;
                drop(in_request);
                Ok::<_, Infallible>(if deadline.hit() {
                    body_timed_out()
                } else {
                    response
                })
            }
        })
    };
    let mut builder = http1::Builder::new();
    // Our watchdog times the head instead: hyper's timer also runs while a kept-alive
    // connection waits, which would make the idle timeout the header timeout.
    builder
        .header_read_timeout(None)
        .max_buf_size(MAX_BUF_BYTES);
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let mut draining = false;
    loop {
        tokio::select! {
            served = connection.as_mut() => {
                if let Err(e) = served {
                    tracing::debug!(error = %e, "connection ended");
                }
                return;
            }
            _ = shutdown.cancelled(), if !draining => {
                // Stopping: a request being handled finishes; nobody waits for a slow head.
                if !phase.in_request() {
                    return;
                }
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
            why = phase.expired(limits) => {
                tracing::debug!(why, "connection closed");
                return; // dropping it closes the socket
            }
        }
    }
}

/// Where a connection is in its life, for the watchdog.
#[derive(Clone, Copy)]
enum State {
    /// Waiting for a request head to be complete, since then.
    AwaitingHead(Instant),
    /// A request is being handled (its body read under the body timeout).
    InRequest,
    /// Kept alive between requests, since then.
    Idle(Instant),
}

struct Phase(Mutex<State>);

impl Phase {
    fn new() -> Phase {
        Phase(Mutex::new(State::AwaitingHead(Instant::now())))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes arrived: on an idle connection they begin the next request head.
    fn bytes_read(&self) {
        let mut state = self.state();
        if let State::Idle(_) = *state {
            *state = State::AwaitingHead(Instant::now());
        }
    }

    fn request_started(self: &Arc<Self>) -> RequestGuard {
        *self.state() = State::InRequest;
        RequestGuard(self.clone())
    }

    fn in_request(&self) -> bool {
        matches!(*self.state(), State::InRequest)
    }

    /// Resolves when the connection has outstayed its phase's limit, with the reason.
    async fn expired(&self, limits: ConnectionLimits) -> &'static str {
        loop {
            let (at, why) = match *self.state() {
                State::AwaitingHead(since) => (
                    since + limits.header_timeout,
                    "request head not received in time",
                ),
                State::Idle(since) => (since + limits.idle_timeout, "idle"),
                // The body has its own deadline; look again once the request is done.
                State::InRequest => (Instant::now() + limits.header_timeout, ""),
            };
            if !why.is_empty() && at <= Instant::now() {
                return why;
            }
            // Deadlines only move later, so waking at the old one is never too late.
            tokio::time::sleep_until(at).await;
        }
    }
}

/// Marks the connection idle when its request has been answered (or abandoned).
struct RequestGuard(Arc<Phase>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        *self.0.state() = State::Idle(Instant::now());
    }
}

/// The socket, telling the watchdog when bytes arrive.
struct Watched {
    inner: TcpStream,
    phase: Arc<Phase>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.phase.bytes_read();
        }
        read
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Set when a request's body did not arrive in time; in the request's extensions, so that a
/// handler's middleware can tell a timeout from a malformed body.
#[derive(Clone, Default)]
pub struct BodyDeadline(Arc<AtomicBool>);

impl BodyDeadline {
    pub fn hit(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// The request with its body cut off (an error to whoever reads it) after `limit`.
    fn wrap(&self, request: Request<Incoming>, limit: Duration) -> Request<Body> {
        let deadline = Instant::now() + limit;
        let flag = self.0.clone();
        let mut request = request.map(|incoming| {
            let chunks = Body::new(incoming).into_data_stream();
            Body::from_stream(futures_util::stream::unfold(Some(chunks), move |chunks| {
                let flag = flag.clone();
                async move {
                    let mut chunks = chunks?;
                    match tokio::time::timeout_at(deadline, chunks.next()).await {
                        Ok(Some(chunk)) => Some((chunk, Some(chunks))),
                        Ok(None) => None,
                        Err(_) => {
                            flag.store(true, Ordering::Relaxed);
                            let error = axum::Error::new("request body timed out");
                            Some((Err(error), None))
                        }
                    }
                }
            }))
        });
        request.extensions_mut().insert(self.clone());
        request
    }
}

fn body_timed_out() -> Response<Body> {
    let mut response = Response::new(Body::from("request body timed out"));
    *response.status_mut() = StatusCode::REQUEST_TIMEOUT;
    response.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    response
}

/// The soft limit on open files (`RLIMIT_NOFILE`) of this process, from /proc/self/limits;
/// `None` when unlimited or unreadable.
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_files_limit_is_read_from_proc() {
        let limit = open_files_limit().expect("a finite soft limit on Linux");
        assert!(limit >= 64, "{limit}");
    }

    #[test]
    fn repeated_warnings_are_throttled_and_counted() {
        let start = Instant::now();
        let mut warnings = Throttled::default();
        assert_eq!(warnings.due_at(start), Some(0));
        assert_eq!(warnings.due_at(start), None);
        assert_eq!(warnings.due_at(start + WARN_EVERY / 2), None);
        assert_eq!(
            warnings.due_at(start + WARN_EVERY),
            Some(2),
            "the two kept back are counted"
        );
    }
}
