//! Sending an uploader's allowed request: straight to the addresses the
//! host resolved and checked before the run ([`Route::Direct`]: the name
//! is never resolved again, so DNS cannot move the upload elsewhere), or
//! through the operator's HTTP proxy ([`Route::Proxy`]: a `CONNECT`
//! tunnel to the destination). Then TLS for `https` (SNI and certificate
//! checked against the URL's host name, with the trust `[upload]` gives:
//! [`crate::upload::UploadPolicy::tls_config`]) and the request over
//! HTTP/1.1. The origin check has already been made by
//! [`super::sandbox::OutboundPolicy`]; this only carries the bytes.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::uri::Scheme;
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody};

use crate::upload::Proxy;

/// How an allowed request reaches its destination.
#[derive(Debug, Clone)]
pub enum Route {
    /// To these addresses (the destination's, resolved and checked once),
    /// tried in order.
    Direct(Vec<std::net::SocketAddr>),
    /// Through the operator's proxy.
    Proxy(Proxy),
}

/// Longest proxy answer to `CONNECT` we read.
const CONNECT_ANSWER_MAX: usize = 16 * 1024;
/// How much a TLS connection takes (and encrypts) per write before it
/// flushes to the socket: rustls' default, 64 KiB, cut each of the
/// uploader's 256 KiB body chunks into four encrypt-and-send rounds.
/// With 1 MiB a chunk goes out in one (`BENCHMARKS.md`).
const TLS_BUFFER: usize = 1 << 20;
/// What `wasi:http` defaults to when the guest sets no timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

pub type Sent = (
    http::Response<WasiBody>,
    Box<dyn Future<Output = Result<(), HttpError>> + Send>,
);

/// Send `request` by `route`; TLS (for `https`) trusts what `tls` does.
pub async fn send(
    route: &Route,
    tls_config: &Arc<rustls::ClientConfig>,
    mut request: http::Request<WasiBody>,
    options: Option<RequestOptions>,
) -> Result<Sent, HttpError> {
    let uri = request.uri();
    let tls = uri.scheme() == Some(&Scheme::HTTPS);
    let authority = uri.authority().ok_or(HttpError::HttpRequestUriInvalid)?;
    // wasi:http sets it; a request made any other way gets it here, since
    // the connection goes to an address, not a name.
    if !request.headers().contains_key(http::header::HOST) {
        let host = http::HeaderValue::from_str(authority.as_str())
            .map_err(|_| HttpError::HttpRequestUriInvalid)?;
        request.headers_mut().insert(http::header::HOST, host);
    }
    let uri = request.uri();
    let authority = uri.authority().ok_or(HttpError::HttpRequestUriInvalid)?;
    let host = authority.host().to_string();
    let target = format!(
        "{host}:{}",
        authority.port_u16().unwrap_or(if tls { 443 } else { 80 })
    );
    let connect_timeout = options
        .and_then(|o| o.connect_timeout)
        .unwrap_or(DEFAULT_TIMEOUT);
    let first_byte_timeout = options
        .and_then(|o| o.first_byte_timeout)
        .unwrap_or(DEFAULT_TIMEOUT);

    let connected = async {
        match route {
            Route::Proxy(proxy) => tunnel(proxy, &target).await,
            Route::Direct(addrs) => connect_any(addrs).await,
        }
    };
    let stream = tokio::time::timeout(connect_timeout, connected)
        .await
        .map_err(|_| HttpError::ConnectionTimeout)??;
    let stream: Box<dyn Stream> = if tls {
        Box::new(tls_client(tls_config, stream, &host).await?)
    } else {
        Box::new(stream)
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;

    // Origin-form on the wire: the tunnel already leads to the host.
    *request.uri_mut() = http::Uri::builder()
        .path_and_query(
            request
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string(),
        )
        .build()
        .map_err(|_| HttpError::HttpRequestUriInvalid)?;

    // Drive the connection while waiting for the answer.
    let mut conn = Box::pin(conn);
    let mut conn_done = false;
    let answer = tokio::time::timeout(first_byte_timeout, sender.send_request(request));
    tokio::pin!(answer);
    let response = loop {
        tokio::select! {
            r = &mut answer => break r.map_err(|_| HttpError::ConnectionReadTimeout)??,
            r = &mut conn, if !conn_done => {
                conn_done = true;
                r?;
            }
        }
    };
    let io = async move {
        if !conn_done {
            conn.await?;
        }
        Ok(())
    };
    Ok((
        response.map(|body| body.map_err(HttpError::from).boxed_unsync()),
        Box::new(io),
    ))
}

/// A TCP connection to the first of `addrs` that answers.
async fn connect_any(addrs: &[std::net::SocketAddr]) -> Result<TcpStream, HttpError> {
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(HttpError::Connect(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::AddrNotAvailable,
            "no address to connect to",
        )
    })))
}

/// Open a TCP connection to the proxy and ask it for a tunnel to `target`.
async fn tunnel(proxy: &Proxy, target: &str) -> Result<TcpStream, HttpError> {
    let mut stream = TcpStream::connect(&proxy.authority)
        .await
        .map_err(HttpError::Connect)?;
    let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(auth) = &proxy.authorization {
        head.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
    }
    head.push_str("\r\n");
    stream
        .write_all(head.as_bytes())
        .await
        .map_err(HttpError::Connect)?;

    // The proxy says nothing more until we speak, so reading past the end
    // of its answer cannot swallow the destination's bytes.
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await.map_err(HttpError::Connect)?;
        if n == 0 || answer.len() + n > CONNECT_ANSWER_MAX {
            return Err(refused(proxy, target, "no valid answer to CONNECT"));
        }
        answer.extend_from_slice(&buf[..n]);
    }
    let status_line = String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    let status = status_line.split_whitespace().nth(1).unwrap_or_default();
    if !status.starts_with('2') || status.len() != 3 {
        return Err(refused(proxy, target, &status_line));
    }
    Ok(stream)
}

fn refused(proxy: &Proxy, target: &str, what: &str) -> HttpError {
    HttpError::InternalError(Some(format!(
        "upload proxy {} refused a tunnel to {target}: {what}",
        proxy.url
    )))
}

/// TLS to `host` over `stream`, verified with `config`. A refused
/// certificate is said in words (the guest sees the message).
async fn tls_client(
    config: &Arc<rustls::ClientConfig>,
    stream: TcpStream,
    host: &str,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, HttpError> {
    use rustls::pki_types::ServerName;
    let connector = tokio_rustls::TlsConnector::from(config.clone());
    let name = match host.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
        Ok(ip) => ServerName::from(ip),
        Err(_) => ServerName::try_from(host.to_string()).map_err(HttpError::from)?,
    };
    connector
        .connect_with(name, stream, |c| c.set_buffer_limit(Some(TLS_BUFFER)))
        .await
        .map_err(|e| {
            let words = crate::upload::certificate_problem(&e)
                .unwrap_or_else(|| format!("TLS with the upload host {host} failed: {e}"));
            HttpError::InternalError(Some(words))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};
    use tokio::net::TcpListener;

    /// A server that answers one request and returns its head.
    async fn one_request_server() -> (std::net::SocketAddr, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut buf).await.unwrap();
                head.extend_from_slice(&buf[..n]);
            }
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            String::from_utf8_lossy(&head).into_owned()
        });
        (addr, task)
    }

    fn no_tls() -> Arc<rustls::ClientConfig> {
        crate::upload::UploadPolicy::default().tls_config().unwrap()
    }

    #[tokio::test]
    async fn a_direct_request_goes_to_the_checked_address_not_to_a_new_lookup() {
        let (addr, server) = one_request_server().await;
        // The name does not resolve at all: the only way to the server is
        // the address the host pinned.
        let uri = format!("http://uploads.invalid:{}/acme/a.zip", addr.port());
        let request = http::Request::put(uri)
            .body(Empty::new().map_err(|never| match never {}).boxed_unsync())
            .unwrap();
        let (response, io) = send(&Route::Direct(vec![addr]), &no_tls(), request, None)
            .await
            .expect("sent to the pinned address");
        assert_eq!(response.status(), 200);
        drop(response);
        let _ = Box::into_pin(io).await;
        let head = server.await.unwrap();
        assert!(head.starts_with("PUT /acme/a.zip HTTP/1.1\r\n"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains(&format!("host: uploads.invalid:{}", addr.port())),
            "{head}"
        );
    }
}
