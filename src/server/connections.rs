//! The accept loop: a bound on open connections and per-connection
//! timeouts, which `axum::serve` does not offer (it has neither a header
//! read timeout nor a limit, so idle or slow clients can hold every file
//! descriptor and lock real clients out).
//!
//! Each connection is in one of three phases, tracked from its bytes and
//! its requests:
//! - **idle**: no request in flight and no byte of a new one. Closed after
//!   `idle_timeout` (keep-alive), or earlier when the server is at its
//!   connection bound and needs the slot (after [`SHED_MIN_IDLE`]), as
//!   nginx drains keep-alive connections when it runs out of them;
//! - **head**: bytes of a request arrived but not a whole header. Closed
//!   after `header_timeout` (slowloris);
//! - **request**: headers parsed, a handler runs. The body read and the
//!   request itself have their own deadlines (`super::timeouts`).
//!
//! hyper's own `header_read_timeout` is not used: it starts when hyper
//! begins waiting for a head, idle keep-alive included, so it cannot tell
//! an idle connection from a slow one.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};
use tower::ServiceExt;

use crate::logging::{RateLimit, WARN_INTERVAL};

/// A connection idle at least this long may be closed to make room when
/// the server is at its connection bound (a fresh connection has not had
/// time to send its request yet).
pub const SHED_MIN_IDLE: Duration = Duration::from_millis(250);

/// How long connections get to finish their last response once shutdown
/// closes them, before they are dropped.
pub const CLOSE_GRACE: Duration = Duration::from_millis(500);

/// Connections the kernel may hold complete but not yet accepted. Rust's
/// and tokio's `bind` use 128, which a burst of new connections (a load
/// balancer's retries, a reconnecting fleet) overflows: the dropped SYNs
/// are retried by the clients after a second. The kernel caps it at
/// `net.core.somaxconn`.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds `addr` (host:port; the first address it resolves to) with a
/// listen backlog of [`LISTEN_BACKLOG`].
pub async fn listen(addr: &str) -> io::Result<TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(a) {
            Ok(()) => return socket.listen(LISTEN_BACKLOG),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the address resolves to nothing",
        )
    }))
}

/// Timeouts and bounds of client connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnConfig {
    /// Most open client connections; past it, the longest-idle ones are
    /// closed and new ones wait in the kernel's backlog.
    pub max_connections: usize,
    /// A request's header must arrive within this long of its first byte.
    pub header_timeout: Duration,
    /// A connection with no request in flight is closed after this long.
    pub idle_timeout: Duration,
}

/// What the accept loop tells its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stop {
    /// Keep serving.
    Run,
    /// Finish the request in flight, then close (no keep-alive).
    Graceful,
    /// Close now.
    Close,
}

const IDLE: u8 = 0;
const HEAD: u8 = 1;
const REQUEST: u8 = 2;

/// Milliseconds since the first call: a clock that fits an atomic.
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Phase of one connection (see the module doc), shared by its socket
/// wrapper, its service and its task.
struct ConnState {
    phase: AtomicU8,
    /// When the phase began (ms, [`now_ms`]).
    since: AtomicU64,
    /// Requests in flight (HTTP/2 may have several).
    active: AtomicUsize,
    /// Wakes the connection's task when its deadline moves earlier.
    changed: Notify,
}

impl ConnState {
    fn new() -> Self {
        ConnState {
            phase: AtomicU8::new(IDLE),
            since: AtomicU64::new(now_ms()),
            active: AtomicUsize::new(0),
            changed: Notify::new(),
        }
    }

    /// Bytes arrived: an idle connection starts reading a head.
    fn on_read(&self) {
        if self.phase.load(Ordering::Acquire) == IDLE && self.active.load(Ordering::Acquire) == 0 {
            self.since.store(now_ms(), Ordering::Release);
            self.phase.store(HEAD, Ordering::Release);
            self.changed.notify_one();
        }
    }

    fn begin_request(self: &Arc<Self>) -> RequestGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        self.phase.store(REQUEST, Ordering::Release);
        RequestGuard(self.clone())
    }

    /// When the current phase times out, or `None` while a request runs.
    fn deadline(&self, config: &ConnConfig) -> Option<u64> {
        let since = self.since.load(Ordering::Acquire);
        match self.phase.load(Ordering::Acquire) {
            IDLE => Some(since + config.idle_timeout.as_millis() as u64),
            HEAD => Some(since + config.header_timeout.as_millis() as u64),
            _ => None,
        }
    }

    /// How long the connection has been idle, if it is.
    fn idle_for(&self) -> Option<Duration> {
        (self.phase.load(Ordering::Acquire) == IDLE).then(|| {
            Duration::from_millis(now_ms().saturating_sub(self.since.load(Ordering::Acquire)))
        })
    }
}

/// A request in flight on a connection; the connection turns idle when the
/// last one ends.
struct RequestGuard(Arc<ConnState>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.since.store(now_ms(), Ordering::Release);
            self.0.phase.store(IDLE, Ordering::Release);
            self.0.changed.notify_one();
        }
    }
}

/// The socket, reporting arriving bytes to the connection's state.
struct Tracked {
    stream: TcpStream,
    state: Arc<ConnState>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.on_read();
        }
        poll
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Serves `app` on `listener` until `stop` resolves; then stops accepting,
/// lets each connection finish its response (`Stop::Graceful`) and
/// closes what is left after [`CLOSE_GRACE`]. Returns once every
/// connection is closed (or dropped).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    config: ConnConfig,
    stop: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let (stop_tx, stop_rx) = watch::channel(Stop::Run);
    // Bumped when the bound is reached: idle connections close themselves.
    let (shed_tx, shed_rx) = watch::channel(0u64);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Whole-body and whole-request deadlines are the handlers' (see
    // `super::timeouts`); hyper's per-head timer would also cut idle
    // keep-alive connections at the header timeout.
    builder.http1().keep_alive(true);
    let builder = Arc::new(builder);
    static LIMIT_LOG: RateLimit = RateLimit::new(WARN_INTERVAL);
    static ACCEPT_LOG: RateLimit = RateLimit::new(WARN_INTERVAL);
    tokio::pin!(stop);
    loop {
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if let Some(suppressed) = LIMIT_LOG.check() {
                    tracing::warn!(
                        max_connections = config.max_connections,
                        suppressed,
                        "connection limit reached: closing idle connections, new ones wait"
                    );
                }
                metrics::counter!(super::metrics::CONNECTIONS_LIMITED).increment(1);
                // Ask again every SHED_MIN_IDLE: connections too fresh to
                // shed the first time may be idle long enough the next.
                let waited = loop {
                    shed_tx.send_modify(|n| *n += 1);
                    tokio::select! {
                        p = slots.clone().acquire_owned() => break Some(p.expect("never closed")),
                        _ = tokio::time::sleep(SHED_MIN_IDLE) => continue,
                        _ = &mut stop => break None,
                    }
                };
                match waited {
                    Some(p) => p,
                    None => break,
                }
            }
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    if let Some(suppressed) = ACCEPT_LOG.check() {
                        tracing::warn!(error = %e, suppressed, "accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let conn = Connection {
            app: app.clone(),
            builder: builder.clone(),
            config,
            stop: stop_rx.clone(),
            shed: shed_rx.clone(),
        };
        tokio::spawn(async move {
            let _permit = permit;
            metrics::gauge!(super::metrics::CONNECTIONS_OPEN).increment(1.0);
            conn.run(stream, peer).await;
            metrics::gauge!(super::metrics::CONNECTIONS_OPEN).decrement(1.0);
        });
    }
    drop(listener);
    let _ = stop_tx.send(Stop::Graceful);
    let all = config.max_connections as u32;
    if tokio::time::timeout(CLOSE_GRACE, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the close grace; closing them");
        let _ = stop_tx.send(Stop::Close);
        let _ = tokio::time::timeout(Duration::from_millis(100), slots.acquire_many(all)).await;
    }
    Ok(())
}

/// One accepted connection and what it needs.
struct Connection {
    app: Router,
    builder: Arc<auto::Builder<TokioExecutor>>,
    config: ConnConfig,
    stop: watch::Receiver<Stop>,
    shed: watch::Receiver<u64>,
}

impl Connection {
    async fn run(mut self, stream: TcpStream, peer: SocketAddr) {
        let state = Arc::new(ConnState::new());
        let io = TokioIo::new(Tracked {
            stream,
            state: state.clone(),
        });
        let (app, svc_state) = (self.app.clone(), state.clone());
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            let guard = svc_state.begin_request();
            let app = app.clone();
            async move {
                let response = app.oneshot(req).await;
                drop(guard);
                Ok::<_, Infallible>(response.unwrap_or_else(|never| match never {}))
            }
        });
        let conn = self.builder.serve_connection(io, service);
        tokio::pin!(conn);
        let mut graceful = false;
        loop {
            let deadline = state.deadline(&self.config);
            let sleep = async {
                match deadline {
                    Some(at) => {
                        tokio::time::sleep(Duration::from_millis(at.saturating_sub(now_ms()))).await
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut conn => return,
                _ = state.changed.notified() => {}
                _ = sleep => {
                    if state.deadline(&self.config).is_some_and(|at| at <= now_ms()) {
                        let reason = if state.idle_for().is_some() { "idle" } else { "header_timeout" };
                        metrics::counter!(super::metrics::CONNECTIONS_CLOSED, "reason" => reason).increment(1);
                        tracing::debug!(%peer, reason, "closing connection");
                        return;
                    }
                }
                changed = self.shed.changed() => {
                    // The accept loop is gone (it dropped the sender): the
                    // server has stopped; without this the branch would be
                    // ready forever and spin.
                    if changed.is_err() {
                        return;
                    }
                    if state.idle_for().is_some_and(|d| d >= SHED_MIN_IDLE) {
                        metrics::counter!(super::metrics::CONNECTIONS_CLOSED, "reason" => "shed").increment(1);
                        return;
                    }
                }
                changed = self.stop.changed() => {
                    let stop = if changed.is_ok() { *self.stop.borrow_and_update() } else { Stop::Close };
                    if stop == Stop::Close || state.idle_for().is_some() {
                        return;
                    }
                    if !graceful {
                        graceful = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        }
    }
}
