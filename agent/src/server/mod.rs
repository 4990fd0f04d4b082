//! The mTLS endpoint: accepts TCP, completes the TLS handshake (client certificate required)
//! with the TLS config current at accept time, names the client from its certificate, and
//! serves the router over HTTP/1.1 or HTTP/2 as ALPN chose, within fixed limits.
//!
//! Owns sockets, TLS, limits and the endpoint's own metrics; what is served is `routes`.
//! It never touches kernel maps.

pub mod access;
pub mod identity;
pub mod isolation;
pub mod limits;
mod operator;
pub mod pages;
pub mod reload;
pub mod routes;
pub mod stats;
pub mod tls;

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::Router;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, watch},
};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

use self::{identity::ClientIdentity, limits::*, reload::TlsSource, stats::ServerStats};
use crate::config::{AccessLog, ServerConfig as ServerSection};

/// How long open connections get to finish after shutdown starts.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a connection checks whether it has been idle too long.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// Per-request policy shared by every connection; the values a live config change may switch
/// are read per request.
pub struct ServerState {
    allowed_client_names: std::sync::RwLock<Arc<[String]>>,
    access_log: AtomicU8,
    pub limiter: RateLimiter,
    pub in_flight: Arc<Semaphore>,
    pub stats: Arc<ServerStats>,
}

impl ServerState {
    pub fn new(section: &ServerSection, stats: Arc<ServerStats>) -> Arc<Self> {
        let state = Arc::new(Self {
            allowed_client_names: std::sync::RwLock::new(
                section.allowed_client_names.clone().into(),
            ),
            access_log: AtomicU8::new(0),
            limiter: RateLimiter::new(
                section.rate_limit_rps,
                section.rate_limit_burst,
                RATE_LIMIT_IDENTITIES,
            ),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            stats,
        });
        state.set_access_log(section.access_log);
        state
    }

    pub fn allowed_client_names(&self) -> Arc<[String]> {
        self.allowed_client_names
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Takes effect from the next request (open connections included).
    pub fn set_allowed_client_names(&self, names: &[String]) {
        *self
            .allowed_client_names
            .write()
            .unwrap_or_else(|p| p.into_inner()) = names.into();
    }

    pub fn access_log(&self) -> AccessLog {
        match self.access_log.load(Ordering::Relaxed) {
            0 => AccessLog::Off,
            1 => AccessLog::Info,
            _ => AccessLog::Debug,
        }
    }

    /// Takes effect from the next request.
    pub fn set_access_log(&self, level: AccessLog) {
        let v = match level {
            AccessLog::Off => 0,
            AccessLog::Info => 1,
            AccessLog::Debug => 2,
        };
        self.access_log.store(v, Ordering::Relaxed);
    }
}

fn http_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    builder
}

/// Serves until `shutdown` resolves, then drains open connections for up to 5 s. Runs the TLS
/// reloader meanwhile.
pub async fn serve(
    listener: TcpListener,
    tls: TlsSource,
    state: Arc<ServerState>,
    app: Router,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let configs = tls.subscribe();
    let reloader = tokio::spawn(tls.run());
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let (stop_tx, stop_rx) = watch::channel(false);
    let builder = http_builder();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            state
                .stats
                .connections_rejected
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "connection limit ({MAX_CONNECTIONS}) reached; closing");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        // Each connection takes the config current now; a reload never touches open ones.
        let acceptor = TlsAcceptor::from(configs.borrow().clone());
        let conn = Conn {
            peer,
            app: app.clone(),
            builder: builder.clone(),
            stop: stop_rx.clone(),
            _slot: Slot::new(permit, state.stats.clone()),
        };
        tokio::spawn(conn.run(tcp, acceptor));
    }
    reloader.abort();
    tracing::info!("stopped accepting; draining connections");
    let _ = stop_tx.send(true);
    let all = u32::try_from(MAX_CONNECTIONS).unwrap_or(u32::MAX);
    if tokio::time::timeout(DRAIN_TIMEOUT, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("connections still open after {DRAIN_TIMEOUT:?}; closing them");
    }
}

/// A held connection slot; counts the connection as active while it lives.
struct Slot {
    _permit: OwnedSemaphorePermit,
    stats: Arc<ServerStats>,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, stats: Arc<ServerStats>) -> Self {
        stats.connections_active.fetch_add(1, Ordering::Relaxed);
        Self {
            _permit: permit,
            stats,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.stats
            .connections_active
            .fetch_sub(1, Ordering::Relaxed);
    }
}

struct Conn {
    peer: std::net::SocketAddr,
    app: Router,
    builder: auto::Builder<TokioExecutor>,
    stop: watch::Receiver<bool>,
    _slot: Slot,
}

impl Conn {
    async fn run(mut self, tcp: TcpStream, acceptor: TlsAcceptor) {
        let peer = self.peer;
        let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
        let tls = tokio::select! {
            result = handshake => match result {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            },
            _ = self.stop.wait_for(|stop| *stop) => return,
        };
        let identity = Arc::new(
            tls.get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map_or_else(
                    || ClientIdentity::from_names(Vec::new()),
                    |leaf| ClientIdentity::from_der(leaf),
                ),
        );
        let activity = Arc::new(Activity::new());
        let io = TokioIo::new(Tracked {
            inner: tls,
            activity: activity.clone(),
        });
        let app = self.app.clone();
        let tracker = activity.clone();
        let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
            let mut request = request.map(axum::body::Body::new);
            request.extensions_mut().insert(identity.clone());
            request
                .extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            let handling = tracker.handle();
            let app = app.clone();
            async move {
                let response = app.oneshot(request).await?;
                // From here until the body is done (or dropped) the response is streaming.
                let streaming = handling.respond();
                Ok::<_, std::convert::Infallible>(response.map(|body| {
                    axum::body::Body::new(Streaming {
                        inner: body,
                        _guard: streaming,
                    })
                }))
            }
        });
        let conn = self.builder.serve_connection(io, service);
        tokio::pin!(conn);
        let mut tick = tokio::time::interval(IDLE_CHECK);
        let mut closing: Option<Instant> = None;
        loop {
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                    return;
                }
                _ = self.stop.wait_for(|stop| *stop), if closing.is_none() => {
                    conn.as_mut().graceful_shutdown();
                    closing = Some(Instant::now());
                }
                _ = tick.tick() => match (closing, activity.check()) {
                    (None, Verdict::Idle) => {
                        tracing::debug!(%peer, "no request for {IDLE_TIMEOUT:?}; closing");
                        conn.as_mut().graceful_shutdown();
                        closing = Some(Instant::now());
                    }
                    (_, Verdict::Stalled) => {
                        tracing::debug!(%peer, "response unread for {IDLE_TIMEOUT:?}; dropping");
                        return;
                    }
                    (Some(since), _) if since.elapsed() >= DRAIN_TIMEOUT => return,
                    _ => {}
                },
            }
        }
    }
}

/// What one connection is doing, for the idle and stalled-reader rules:
/// - **idle**: no request being handled or streamed, and none started or finished for
///   [`IDLE_TIMEOUT`] (HTTP/2 PINGs do not count: they would keep every connection alive);
/// - **stalled**: a response body is being sent but no byte has been written for
///   [`IDLE_TIMEOUT`] (a client that stopped reading).
struct Activity {
    epoch: Instant,
    last_request_ms: AtomicU64,
    last_write_ms: AtomicU64,
    handling: AtomicUsize,
    streaming: AtomicUsize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Active,
    Idle,
    Stalled,
}

impl Activity {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            last_request_ms: AtomicU64::new(0),
            last_write_ms: AtomicU64::new(0),
            handling: AtomicUsize::new(0),
            streaming: AtomicUsize::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn wrote(&self) {
        self.last_write_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    fn check(&self) -> Verdict {
        self.check_at(self.now_ms())
    }

    /// The verdict at `now_ms` (milliseconds since the connection started).
    fn check_at(&self, now_ms: u64) -> Verdict {
        let since = |mark: &AtomicU64| {
            Duration::from_millis(now_ms.saturating_sub(mark.load(Ordering::Relaxed)))
        };
        let handling = self.handling.load(Ordering::Relaxed);
        let streaming = self.streaming.load(Ordering::Relaxed);
        if handling == 0 && streaming == 0 && since(&self.last_request_ms) >= IDLE_TIMEOUT {
            Verdict::Idle
        } else if handling == 0 && streaming > 0 && since(&self.last_write_ms) >= IDLE_TIMEOUT {
            Verdict::Stalled
        } else {
            Verdict::Active
        }
    }

    fn handle(self: &Arc<Self>) -> Handling {
        self.handling.fetch_add(1, Ordering::Relaxed);
        self.last_request_ms.store(self.now_ms(), Ordering::Relaxed);
        Handling(Some(self.clone()))
    }
}

/// A request being handled; becomes [`StreamingGuard`] once its response is ready.
struct Handling(Option<Arc<Activity>>);

impl Handling {
    fn respond(mut self) -> StreamingGuard {
        let activity = self.0.take().expect("respond once");
        activity.streaming.fetch_add(1, Ordering::Relaxed);
        activity.handling.fetch_sub(1, Ordering::Relaxed);
        activity.wrote();
        StreamingGuard(activity)
    }
}

impl Drop for Handling {
    fn drop(&mut self) {
        if let Some(activity) = self.0.take() {
            activity.handling.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

struct StreamingGuard(Arc<Activity>);

impl Drop for StreamingGuard {
    fn drop(&mut self) {
        self.0.streaming.fetch_sub(1, Ordering::Relaxed);
        let now = self.0.now_ms();
        self.0.last_request_ms.store(now, Ordering::Relaxed);
    }
}

pin_project_lite::pin_project! {
    /// A response body that holds its connection's "streaming" mark until it is done.
    struct Streaming {
        #[pin]
        inner: axum::body::Body,
        _guard: StreamingGuard,
    }
}

impl http_body::Body for Streaming {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// An I/O stream that records when bytes were last written (the stalled-reader clock).
struct Tracked<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote();
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_and_stalled_connections_are_told_apart() {
        let idle = IDLE_TIMEOUT.as_millis() as u64;
        let a = Arc::new(Activity::new());
        assert_eq!(a.check_at(0), Verdict::Active);
        assert_eq!(a.check_at(idle - 1), Verdict::Active);
        assert_eq!(a.check_at(idle), Verdict::Idle);

        // A slow handler is never idle nor stalled, however long it takes.
        let handling = a.handle();
        assert_eq!(a.check_at(10 * idle), Verdict::Active);
        // Its response streams: active while bytes are written, stalled when none are.
        let streaming = handling.respond();
        let start = a.last_write_ms.load(Ordering::Relaxed);
        assert_eq!(a.check_at(start + idle - 1), Verdict::Active);
        assert_eq!(a.check_at(start + idle), Verdict::Stalled);
        // Done: idle counts from the end of the response.
        drop(streaming);
        let end = a.last_request_ms.load(Ordering::Relaxed);
        assert_eq!(a.check_at(end + idle - 1), Verdict::Active);
        assert_eq!(a.check_at(end + idle), Verdict::Idle);
        assert_eq!(a.handling.load(Ordering::Relaxed), 0);
        assert_eq!(a.streaming.load(Ordering::Relaxed), 0);

        // A request dropped before it answered (client gone) leaves no count behind.
        drop(a.handle());
        assert_eq!(a.handling.load(Ordering::Relaxed), 0);
    }
}
