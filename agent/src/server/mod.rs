//! The mTLS endpoint: accepts TCP, completes the TLS handshake (client certificate required)
//! with the TLS config current at accept time, names the client from its certificate, and
//! serves the router over HTTP/1.1 or HTTP/2 as ALPN chose, within fixed limits.
//!
//! Owns sockets and TLS, and enforces the per-request policy and limits (`crate::policy`, below
//! it and the control channel that switches them) and counts into `crate::stats`; what is
//! served is `routes`.
//! It never touches kernel maps. Who may hold a connection before authenticating is
//! `admission`; why handshakes fail, counted and logged, is `handshake`.

pub mod access;
pub mod admission;
mod api;
pub mod handshake;
pub mod identity;
pub mod isolation;
mod operator;
pub mod pages;
pub mod pods;
pub mod reload;
pub mod routes;
pub mod tls;

pub use crate::policy::{ListenerPolicy, limits};

use std::{
    os::fd::{AsRawFd as _, RawFd},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
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

use self::{
    admission::{PeerKey, PendingPool, ShedBy, Ticket},
    handshake::{Failure, FailureLog, Throttle},
    identity::ClientIdentity,
    limits::*,
    reload::TlsSource,
};
use crate::stats::ServerStats;

/// How long open connections get to finish after shutdown starts.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a connection checks whether it has been idle too long.
const IDLE_CHECK: Duration = Duration::from_secs(1);

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

/// What every connection task shares: the authenticated budget, the counters, the throttled
/// logs.
struct Shared {
    budget: Budget,
    authenticated: Arc<Semaphore>,
    stats: Arc<ServerStats>,
    failures: FailureLog,
    over_authenticated: Throttle,
}

/// Serves until `shutdown` resolves, then drains open connections for up to 5 s. Runs the TLS
/// reloader meanwhile.
///
/// Connections are admitted in two stages: at accept into the pending pool (per peer and in
/// total, see `admission`), and once the handshake has verified a client certificate into the
/// authenticated budget. Sockets in every state stay within [`Budget::sockets`], below
/// `RLIMIT_NOFILE`, so `accept` itself never fails for want of descriptors.
pub async fn serve(
    listener: TcpListener,
    tls: TlsSource,
    state: Arc<ListenerPolicy>,
    app: Router,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let configs = tls.subscribe();
    let reloader = crate::tasks::spawn("tls-reload", tls.run());
    let nofile = raise_nofile(Budget::WANTED_FDS);
    let budget = Budget::fit(nofile);
    if budget.pending < MAX_PENDING || budget.authenticated < MAX_CONNECTIONS {
        tracing::warn!(
            nofile,
            wanted = Budget::WANTED_FDS,
            "RLIMIT_NOFILE is too low for the connection limits; cut to fit"
        );
    }
    tracing::info!(
        pending_per_peer = budget.pending_per_peer,
        pending = budget.pending,
        authenticated = budget.authenticated,
        sockets = budget.sockets,
        nofile,
        "connection limits"
    );
    serve_with(listener, configs, state, app, shutdown, budget).await;
    reloader.abort();
}

/// Serves `listener` within `budget` until `shutdown` resolves, each connection with the TLS
/// config current in `configs` at accept; then closes the listener at once and drains.
pub async fn serve_with(
    listener: TcpListener,
    configs: watch::Receiver<Arc<rustls::ServerConfig>>,
    state: Arc<ListenerPolicy>,
    app: Router,
    shutdown: impl std::future::Future<Output = ()>,
    budget: Budget,
) {
    widen_backlog(&listener);
    let sockets = Arc::new(Semaphore::new(budget.sockets));
    let pool = PendingPool::new(
        budget.pending_per_peer,
        budget.pending,
        has_data,
        state.stats.clone(),
    );
    let shared = Arc::new(Shared {
        budget,
        authenticated: Arc::new(Semaphore::new(budget.authenticated)),
        stats: state.stats.clone(),
        failures: FailureLog::default(),
        over_authenticated: Throttle::new(handshake::LOG_EVERY, handshake::LOG_BURST),
    });
    let accept_errors = Throttle::new(handshake::LOG_EVERY, handshake::LOG_BURST);
    let (stop_tx, stop_rx) = watch::channel(false);
    let builder = http_builder();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    accept_failed(&e, &accept_errors).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = sockets.clone().try_acquire_owned() else {
            // Only when shed connections are not closed as fast as they come.
            shared.stats.handshake_failed(Failure::ShedTotal);
            shared.failures.log(
                Failure::ShedTotal,
                peer,
                &format_args!("socket budget ({}) spent; closed at accept", budget.sockets),
            );
            drop(tcp);
            continue;
        };
        let slot = Slot::new(permit, state.stats.clone());
        let _ = tcp.set_nodelay(true);
        let admission = pool.admit(PeerKey::of(peer.ip()), tcp.as_raw_fd());
        let timeout = if admission.pressure {
            HANDSHAKE_TIMEOUT_UNDER_PRESSURE
        } else {
            HANDSHAKE_TIMEOUT
        };
        // Each connection takes the config current now; a reload never touches open ones.
        let acceptor = TlsAcceptor::from(configs.borrow().clone());
        let conn = Conn {
            peer,
            app: app.clone(),
            builder: builder.clone(),
            stop: stop_rx.clone(),
            shared: shared.clone(),
            _slot: slot,
        };
        tokio::spawn(conn.run(tcp, acceptor, admission.ticket, timeout));
    }
    drop(listener);
    tracing::info!(listener = %state.listener, "stopped accepting; draining connections");
    let _ = stop_tx.send(true);
    drain(&sockets, budget.sockets).await;
}

/// Logs a failed accept (throttled) and, unless it was one connection's trouble, backs off
/// instead of spinning (EMFILE, ENOBUFS).
async fn accept_failed(e: &std::io::Error, throttle: &Throttle) {
    if let Some(suppressed) = throttle.check(Instant::now()) {
        tracing::warn!(error = %e, suppressed, "accept failed");
    }
    if !matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::Interrupted
    ) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every socket slot of `budget` is back (the connections told to stop have
/// closed), at most [`DRAIN_TIMEOUT`].
async fn drain(sockets: &Semaphore, budget: usize) {
    let all = u32::try_from(budget).unwrap_or(u32::MAX);
    if tokio::time::timeout(DRAIN_TIMEOUT, sockets.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("connections still open after {DRAIN_TIMEOUT:?}; closing them");
    }
}

/// Sets the listen backlog to [`LISTEN_BACKLOG`] (the listener comes with 128).
fn widen_backlog(listener: &TcpListener) {
    // SAFETY: listen(2) on the descriptor `listener` owns and keeps open for the call; on a
    // socket already listening it only changes the backlog.
    if unsafe { libc::listen(listener.as_raw_fd(), LISTEN_BACKLOG) } != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "cannot raise the listen backlog to {LISTEN_BACKLOG}; keeping 128"
        );
    }
}

/// Whether the client's first bytes are queued on socket `fd`, read or not (a real client sends
/// its ClientHello right after connecting; a silent one never does). The pool's
/// [`admission::Probe`]: it calls this only for connections it holds, whose socket
/// [`FirstBytes`] keeps open until their ticket has left the pool.
fn has_data(fd: RawFd) -> bool {
    let mut byte = 0u8;
    // SAFETY: recv writes at most 1 byte into `byte`, which outlives the call. `fd` is open:
    // the pool probes only connections it holds, and a connection's ticket leaves the pool
    // before its socket is closed (FirstBytes drops `ticket` before `inner`). MSG_PEEK leaves
    // the byte queued for the TLS handshake, MSG_DONTWAIT never blocks.
    let n = unsafe {
        libc::recv(
            fd,
            (&raw mut byte).cast::<libc::c_void>(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n > 0
}

/// A held socket slot; counts the connection as active while it lives.
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

/// Why a handshake ended without an authenticated client, for the log line.
enum Refusal {
    Error(std::io::Error),
    Timeout(Duration),
    Shed(ShedBy, Budget),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Error(e) => write!(f, "{e}"),
            Refusal::Timeout(t) => write!(f, "no handshake within {t:?}"),
            Refusal::Shed(ShedBy::PerPeer, b) => write!(
                f,
                "shed: {} handshakes pending from this peer and another came",
                b.pending_per_peer
            ),
            Refusal::Shed(ShedBy::Total, b) => write!(
                f,
                "shed: {} handshakes pending, the most from this peer, and another came",
                b.pending
            ),
        }
    }
}

struct Conn {
    peer: std::net::SocketAddr,
    app: Router,
    builder: auto::Builder<TokioExecutor>,
    stop: watch::Receiver<bool>,
    shared: Arc<Shared>,
    _slot: Slot,
}

impl Conn {
    async fn run(
        mut self,
        tcp: TcpStream,
        acceptor: TlsAcceptor,
        ticket: Ticket,
        timeout: Duration,
    ) {
        let peer = self.peer;
        let Some(tls) = self.handshake(tcp, acceptor, ticket, timeout).await else {
            return;
        };
        let Some(_authenticated) = self.admit() else {
            return;
        };
        let identity = Arc::new(client_identity(&tls));
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

    /// The TLS handshake, within `timeout` and unless shed or stopped: the stream, its ticket
    /// out of the pending pool. A failure is counted and logged.
    async fn handshake(
        &mut self,
        tcp: TcpStream,
        acceptor: TlsAcceptor,
        ticket: Ticket,
        timeout: Duration,
    ) -> Option<tokio_rustls::server::TlsStream<FirstBytes>> {
        let pending = ticket.pending().clone();
        let io = FirstBytes {
            ticket: Some(ticket),
            inner: tcp,
        };
        let handshake = tokio::time::timeout(timeout, acceptor.accept(io));
        // Biased: a handshake that is done counts as done even if it was shed meanwhile.
        let outcome = tokio::select! {
            biased;
            result = handshake => match result {
                Ok(Ok(tls)) => Ok(tls),
                Ok(Err(e)) => Err((handshake::classify(&e), Refusal::Error(e))),
                Err(_) => Err((Failure::Timeout, Refusal::Timeout(timeout))),
            },
            () = pending.shed() => {
                let by = pending.shed_by().unwrap_or(ShedBy::Total);
                let failure = match by {
                    ShedBy::PerPeer => Failure::ShedPerPeer,
                    ShedBy::Total => Failure::ShedTotal,
                };
                Err((failure, Refusal::Shed(by, self.shared.budget)))
            }
            _ = self.stop.wait_for(|stop| *stop) => return None,
        };
        // A failed handshake's socket is closed by now, its ticket (dropped first) out of the
        // pool; a completed one's ticket leaves the pool below.
        drop(pending);
        let mut tls = match outcome {
            Ok(tls) => tls,
            Err((failure, refusal)) => {
                self.shared.stats.handshake_failed(failure);
                self.shared.failures.log(failure, self.peer, &refusal);
                return None;
            }
        };
        tls.get_mut().0.ticket = None;
        Some(tls)
    }

    /// A place among the authenticated connections, or none (counted, and logged throttled).
    fn admit(&self) -> Option<OwnedSemaphorePermit> {
        let Ok(permit) = self.shared.authenticated.clone().try_acquire_owned() else {
            self.shared
                .stats
                .connections_rejected
                .fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = self.shared.over_authenticated.check(Instant::now()) {
                tracing::info!(
                    peer = %self.peer,
                    suppressed,
                    "authenticated connection limit ({}) reached; closing",
                    self.shared.budget.authenticated
                );
            }
            return None;
        };
        Some(permit)
    }
}

/// Who the peer is, from its certificate's leaf (none: no names).
fn client_identity(tls: &tokio_rustls::server::TlsStream<FirstBytes>) -> ClientIdentity {
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map_or_else(
            || ClientIdentity::from_names(Vec::new()),
            |leaf| ClientIdentity::from_der(leaf),
        )
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

/// The socket under TLS, with the connection's place in the pending pool while it handshakes:
/// marks it as having spoken at the first byte read (so it is shed after silent ones), then
/// passes everything through.
struct FirstBytes {
    /// Declared before `inner`, so dropped first: the pool never holds a closed descriptor.
    /// Taken out once the handshake is done.
    ticket: Option<Ticket>,
    inner: TcpStream,
}

impl AsyncRead for FirstBytes {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before
            && let Some(ticket) = &self.ticket
        {
            ticket.pending().mark_spoke();
        }
        result
    }
}

impl AsyncWrite for FirstBytes {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
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
