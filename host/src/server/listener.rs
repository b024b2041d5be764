//! The HTTP listener, bounded: whoever connects, the daemon keeps file
//! descriptors, memory and room for the cluster's own traffic.
//!
//! - **Header timeout.** A connection must send a complete request head
//!   within `header_timeout` of opening, and again of each answer (an idle
//!   keep-alive connection is closed after it too). A body the API reads
//!   whole (parameters, node-to-node requests) must arrive within it too
//!   once its head has ([`BodyDeadline`], set on every request).
//! - **A cap on connections**, derived from the open-file limit (whose
//!   soft value is raised to the hard one at start). At the cap, the
//!   connection that has been idle the longest is closed to make room; if
//!   every connection has a request in flight, the new one is closed.
//! - **Room for the cluster.** Public requests are answered 503 (and their
//!   connection closed) once `max - peer_reserved` connections have a
//!   public request in flight; node-to-node requests (`/internal/`) are
//!   not, so sessions, commands and pings keep working during a flood.
//! - **TLS** (when configured): the handshake runs on the connection's own
//!   task and must finish within the header timeout; each connection
//!   takes the server config current when it opened (a SIGHUP reload
//!   affects new connections only).
//! - **HTTP/2 between nodes only.** A node sends its short requests to
//!   another with HTTP/2 (over TLS it negotiates
//!   [`crate::tls::PEER_ALPN`]; over plain HTTP it starts with HTTP/2's
//!   preface), so they share one connection. A session is the exception:
//!   its HTTP/1.1 request's connection is upgraded to the session's own
//!   ([`crate::protocol`]), and leaves the accounting here once it is (a
//!   node holds one session at a time). An HTTP/2 connection is served
//!   node-to-node routes and `/health` only (anything else is answered
//!   421): the public API stays one request per connection, as the caps
//!   above count it. With mutual TLS, a client that asks for HTTP/2
//!   without a certificate is closed after the handshake (every node
//!   presents one). Its streams are bounded ([`PEER_STREAMS`], header
//!   size, reset floods) and it is closed once idle for the header
//!   timeout, as an HTTP/1.1 connection is.
//! - **What a handler leaves of an HTTP/1.1 body** is read and discarded
//!   (bounded), or the answer says `connection: close`: a refusal does
//!   not close, unannounced, the connection of a client that sends its
//!   body in time ([`super::unread_body`]).
//! - Every request carries its client's address ([`ClientAddr`]) for the
//!   sign-in throttle, and on TLS connections the client's certificate
//!   ([`ClientCertificate`]) for node identity.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tower::ServiceExt;

use crate::api::{BodyDeadline, ClientAddr};
use crate::config::ServerSettings;
use crate::protocol::INTERNAL_PREFIX;
use crate::tls::{ClientCertificate, PEER_ALPN, TlsContext};

use super::unread_body;

/// Streams in flight on one node-to-node (HTTP/2) connection: a session,
/// its commands and pings, event long-polls and forwarded status requests.
pub const PEER_STREAMS: u32 = 128;
/// Largest header block of a node-to-node request (its signature
/// headers and a path are well under 1 KiB).
const PEER_HEADER_LIST: u32 = 16 * 1024;
/// Streams a client may open and reset before the server has taken
/// them, on one HTTP/2 connection (h2's own default, set here so it is
/// ours): past it the connection ends with GOAWAY (ENHANCE_YOUR_CALM),
/// against the "rapid reset" flood (CVE-2023-44487).
const PEER_PENDING_RESETS: usize = 20;
/// The one unauthenticated route an HTTP/2 connection is also served
/// (`Peers::reachable`).
const HEALTH_PATH: &str = "/health";

/// File descriptors kept for everything but client connections (plugin
/// files, programs' pipes, connections to other nodes, logs).
const FD_RESERVE: u64 = 256;

/// The listener's limits, resolved.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub peer_reserved: usize,
    pub header_timeout: Duration,
}

impl Limits {
    /// From `[server]`, the open-file limit and the cluster's size.
    pub fn resolve(settings: &ServerSettings, nodes: usize) -> Limits {
        // Whatever the cap, the descriptors must be there: raise the soft
        // limit, and never allow more connections than it leaves room for.
        let fds = raise_open_file_limit();
        let usable = if fds > 2 * FD_RESERVE {
            fds - FD_RESERVE
        } else {
            fds / 2
        };
        let usable = usable.clamp(16, 1 << 20) as usize;
        let max = match settings.max_connections {
            0 => usable,
            n => n.min(usable),
        };
        let reserved = match settings.peer_reserved_connections {
            0 => 8 * nodes + 16,
            n => n,
        };
        Limits {
            max_connections: max,
            peer_reserved: reserved.min(max / 2),
            header_timeout: Duration::from_secs_f64(settings.header_timeout_secs),
        }
    }
}

/// Connections the kernel may hold for `accept` (capped by
/// `net.core.somaxconn`, 4096 by default). The standard library's 128
/// overflowed when 10,000 simulated nodes were first connected to at once
/// (connections reset): a coordinator, or a node that many consoles and
/// relays reach in a burst, needs a deeper queue.
const LISTEN_BACKLOG: i32 = 4096;

/// A listening TCP socket on `addr`, as `std::net::TcpListener::bind`
/// makes it (`SO_REUSEADDR`, close-on-exec) but with [`LISTEN_BACKLOG`].
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    bind_sharing(addr, false)
}

/// [`bind`], with `SO_REUSEPORT` set before binding if `reuse_port`: the
/// port may then be shared with a socket that holds it (the local
/// cluster's, [`crate::cluster`]).
pub fn bind_sharing(addr: SocketAddr, reuse_port: bool) -> std::io::Result<std::net::TcpListener> {
    let socket = tcp_socket(addr)?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// A TCP socket (close-on-exec) of `addr`'s family, not yet bound.
pub fn tcp_socket(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
}

/// Raise the soft open-file limit to the hard one; the soft limit after.
pub fn raise_open_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
    }
    limit.rlim_cur
}

/// The open connections, and which of them are busy.
#[derive(Default)]
struct Registry {
    conns: Mutex<HashMap<u64, Conn>>,
    next_id: AtomicU64,
    /// Connections with a public (not node-to-node) request in flight.
    public_busy: AtomicUsize,
    refused_logged: AtomicU64,
}

struct Conn {
    /// Requests in flight (0 or 1 with HTTP/1.1).
    busy: usize,
    idle_since: Instant,
    evict: Arc<Notify>,
}

impl Registry {
    fn open(&self) -> usize {
        self.conns.lock().unwrap().len()
    }

    fn add(&self) -> (u64, Arc<Notify>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let evict = Arc::new(Notify::new());
        crate::metrics::global().connections_open.inc();
        self.conns.lock().unwrap().insert(
            id,
            Conn {
                busy: 0,
                idle_since: Instant::now(),
                evict: evict.clone(),
            },
        );
        (id, evict)
    }

    fn remove(&self, id: u64) {
        if self.conns.lock().unwrap().remove(&id).is_some() {
            crate::metrics::global().connections_open.dec();
        }
    }

    /// Close the connection idle the longest; whether there was one.
    fn evict_idlest(&self) -> bool {
        let mut conns = self.conns.lock().unwrap();
        let idlest = conns
            .iter()
            .filter(|(_, c)| c.busy == 0)
            .min_by_key(|(_, c)| c.idle_since)
            .map(|(id, _)| *id);
        match idlest.and_then(|id| conns.remove(&id)) {
            Some(conn) => {
                crate::metrics::global().connections_open.dec();
                conn.evict.notify_one();
                true
            }
            None => false,
        }
    }

    /// How long connection `id` has had no request in flight: `None` while
    /// one is (or once the connection is gone).
    fn idle_for(&self, id: u64) -> Option<Duration> {
        let conns = self.conns.lock().unwrap();
        let conn = conns.get(&id)?;
        (conn.busy == 0).then(|| conn.idle_since.elapsed())
    }

    /// Completes once connection `id` has been idle for `timeout`.
    async fn idle_timeout(&self, id: u64, timeout: Duration) {
        loop {
            let wait = match self.idle_for(id) {
                Some(idle) if idle >= timeout => return,
                Some(idle) => timeout - idle,
                None => timeout,
            };
            tokio::time::sleep(wait).await;
        }
    }

    fn begin(self: &Arc<Self>, id: u64, public: bool) -> RequestGuard {
        if let Some(c) = self.conns.lock().unwrap().get_mut(&id) {
            c.busy += 1;
        }
        if public {
            self.public_busy.fetch_add(1, Ordering::Relaxed);
        }
        RequestGuard {
            registry: self.clone(),
            id,
            public,
        }
    }

    fn log_refused(&self, what: &str) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if self.refused_logged.swap(now, Ordering::Relaxed) != now {
            tracing::warn!("{what}");
        }
    }
}

/// A request in flight; the connection is idle again when it drops (when
/// the response body has been sent).
struct RequestGuard {
    registry: Arc<Registry>,
    id: u64,
    public: bool,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if let Some(c) = self.registry.conns.lock().unwrap().get_mut(&self.id) {
            c.busy = c.busy.saturating_sub(1);
            c.idle_since = Instant::now();
        }
        if self.public {
            self.registry.public_busy.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A response body that holds its request's guard until it is done.
struct GuardedBody {
    inner: Body,
    _guard: RequestGuard,
}

impl hyper::body::Body for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serve `app` on `listener` within `limits` (over TLS with `tls`) until
/// `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: Limits,
    tls: Option<Arc<TlsContext>>,
    shutdown: impl Future<Output = ()>,
) {
    let registry = Arc::new(Registry::default());
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut shutdown => return,
        };
        let (stream, client) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors (or a transient error): make room and
                // try again shortly rather than spin.
                registry.log_refused(&format!("accepting a connection failed: {e}"));
                registry.evict_idlest();
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if registry.open() >= limits.max_connections && !registry.evict_idlest() {
            registry.log_refused(&format!(
                "{} connections are busy (server.max_connections): closing a new one from {client}",
                limits.max_connections
            ));
            drop(stream);
            continue;
        }
        // No Nagle: session events and long-poll answers are small writes
        // that must leave at once, not wait for the peer's delayed ACK.
        let _ = stream.set_nodelay(true);
        let (id, evict) = registry.add();
        let conn = Connection {
            client,
            app: app.clone(),
            registry: registry.clone(),
            limits,
            id,
            evict,
        };
        match &tls {
            None => {
                tokio::spawn(conn.serve(stream, ClientCertificate(None), Protocol::Detect));
            }
            Some(tls) => {
                tokio::spawn(conn.handshake(stream, tls.server_config(), tls.mutual()));
            }
        }
    }
}

/// One accepted connection.
struct Connection {
    client: SocketAddr,
    app: Router,
    registry: Arc<Registry>,
    limits: Limits,
    id: u64,
    evict: Arc<Notify>,
}

impl Connection {
    /// The TLS handshake, bounded by the header timeout (and given up if
    /// the connection is evicted meanwhile), then serve.
    async fn handshake(self, stream: TcpStream, config: Arc<rustls::ServerConfig>, mutual: bool) {
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let client = self.client;
        let handshake = async move {
            // A TLS connection starts with a handshake record; a plain
            // HTTP request (a client given http:// by mistake) gets told
            // so in words instead of a reset.
            let mut first = [0u8; 1];
            match stream.peek(&mut first).await {
                Ok(1) if first[0] != TLS_HANDSHAKE_RECORD => {
                    tracing::debug!(%client, "a plain HTTP request on the TLS port: answered 400");
                    refuse_plain_http(stream).await;
                    None
                }
                Ok(1) => match acceptor.accept(stream).await {
                    Ok(stream) => Some(stream),
                    Err(e) => {
                        tracing::debug!(%client, "TLS handshake failed: {e}");
                        None
                    }
                },
                _ => None,
            }
        };
        let accepted = tokio::select! {
            accepted = tokio::time::timeout(self.limits.header_timeout, handshake) => accepted,
            _ = self.evict.notified() => Ok(None),
        };
        match accepted {
            Ok(Some(stream)) => {
                let session = stream.get_ref().1;
                crate::metrics::global().tls_handshake(
                    session.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
                );
                let cert = session
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .map(|leaf| Arc::new(leaf.clone().into_owned()));
                let protocol = if session.alpn_protocol() != Some(PEER_ALPN) {
                    Protocol::Http1
                } else if mutual && cert.is_none() {
                    // With mutual TLS every node presents its certificate:
                    // whoever asks for the nodes' protocol without one is
                    // not a node, and gets no HTTP/2 to try its luck with.
                    tracing::debug!(client = %self.client, "the nodes' ALPN protocol without a certificate: closed");
                    self.registry.remove(self.id);
                    return;
                } else {
                    Protocol::Http2
                };
                self.serve(stream, ClientCertificate(cert), protocol).await;
            }
            Ok(None) => self.registry.remove(self.id),
            Err(_) => {
                tracing::debug!(client = %self.client, "TLS handshake timed out");
                self.registry.remove(self.id);
            }
        }
    }

    async fn serve<S>(self, stream: S, cert: ClientCertificate, protocol: Protocol)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Connection {
            client,
            app,
            registry,
            limits,
            id,
            evict,
        } = self;
        let public_cap = limits.max_connections - limits.peer_reserved;
        let requests = registry.clone();
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            let path = request.uri().path();
            let public = !path.starts_with(INTERNAL_PREFIX);
            // Public requests over HTTP/2 are refused without counting.
            let misdirected =
                request.version() == http::Version::HTTP_2 && public && path != HEALTH_PATH;
            let guard = requests.begin(id, public && !misdirected);
            let refusal = if misdirected {
                Some(misdirected_response())
            } else if public && requests.public_busy.load(Ordering::Relaxed) > public_cap {
                crate::metrics::global().throttled(crate::metrics::Throttle::Connections);
                requests.log_refused(
                    "public requests fill the connections not kept for other nodes: answering 503",
                );
                Some(busy_response())
            } else {
                None
            };
            let app = app.clone();
            request.extensions_mut().insert(ClientAddr(client));
            request.extensions_mut().insert(cert.clone());
            request
                .extensions_mut()
                .insert(BodyDeadline(limits.header_timeout));
            async move {
                let response = match refusal {
                    Some(refusal) => refusal,
                    None => {
                        // HTTP/1.1: what the app leaves of the body must
                        // not cost the client its connection (an HTTP/2
                        // stream's does not).
                        let (request, unread) = if request.version() == http::Version::HTTP_2 {
                            (request.map(Body::new), None)
                        } else {
                            let (request, unread) = unread_body::track(request);
                            (request, Some(unread))
                        };
                        let mut response = match app.oneshot(request).await {
                            Ok(response) => response,
                            Err(never) => match never {},
                        };
                        if let Some(unread) = unread {
                            unread.settle(&mut response, limits.header_timeout);
                        }
                        response
                    }
                };
                Ok::<_, Infallible>(response.map(|inner| GuardedBody {
                    inner,
                    _guard: guard,
                }))
            }
        });
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(PEER_STREAMS)
            .max_header_list_size(PEER_HEADER_LIST)
            .max_pending_accept_reset_streams(PEER_PENDING_RESETS);
        let builder = match protocol {
            Protocol::Http1 => builder.http1_only(),
            Protocol::Http2 => builder.http2_only(),
            Protocol::Detect => builder,
        };
        // A session's connection is upgraded (`api::session`): it then
        // leaves this accounting, bounded by the session instead.
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
        tokio::pin!(connection);
        tokio::select! {
            result = &mut connection => {
                if let Err(e) = result {
                    tracing::debug!(%client, "connection ended: {e}");
                }
            }
            _ = evict.notified() => {
                connection.as_mut().graceful_shutdown();
                let _ = connection.await;
            }
            // HTTP/2 has no header timeout of its own: an idle connection
            // (or one that never sends a first request) is closed here.
            _ = registry.idle_timeout(id, limits.header_timeout) => {
                connection.as_mut().graceful_shutdown();
                let _ = connection.await;
            }
        }
        registry.remove(id);
    }
}

/// How a connection speaks HTTP.
#[derive(Debug, Clone, Copy)]
enum Protocol {
    /// TLS, without the nodes' ALPN protocol.
    Http1,
    /// TLS, with [`PEER_ALPN`]: another node.
    Http2,
    /// Plain TCP: HTTP/2 if the connection opens with its preface, else
    /// HTTP/1.1.
    Detect,
}

/// The first byte of a TLS connection (a handshake record).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Answer a plain HTTP request on the TLS port with a 400 that says what
/// to do, then close.
async fn refuse_plain_http(mut stream: TcpStream) {
    use tokio::io::AsyncWriteExt;
    let body = serde_json::json!({
        "_": "This node serves HTTPS: use an https:// URL (with --cacert for a private CA)"
    })
    .to_string();
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(answer.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// The answer to a public request over HTTP/2.
fn misdirected_response() -> Response<Body> {
    let body = serde_json::json!({
        "_": "HTTP/2 is for requests between nodes: send this request over HTTP/1.1"
    })
    .to_string();
    Response::builder()
        .status(StatusCode::MISDIRECTED_REQUEST)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .expect("a valid response")
}

fn busy_response() -> Response<Body> {
    let body = serde_json::json!({"_": "The server is busy: retry in a moment"}).to_string();
    Response::builder()
        .status(StatusCode::SERVICE_UNAVAILABLE)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::RETRY_AFTER, "1")
        .header(http::header::CONNECTION, "close")
        .body(Body::from(body))
        .expect("a valid response")
}
