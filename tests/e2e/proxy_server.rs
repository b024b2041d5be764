//! A real HTTP proxy standing in for a customer's outbound proxy. It
//! serves `CONNECT` tunnels (what the uploader's requests use) and
//! absolute-form requests (what the preflight's HTTP client sends for an
//! `http://` host), and records each request line it was asked for and
//! the bytes the client sent into each tunnel.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt, copy_bidirectional};
use tokio::net::{TcpListener, TcpStream};

/// What the client sent into each tunnel (the first [`TUNNEL_KEPT`]
/// bytes), recorded before they are passed on.
type Tunnels = Arc<Mutex<Vec<Arc<Mutex<Vec<u8>>>>>>;

/// Bytes of each tunnel kept for inspection.
pub const TUNNEL_KEPT: usize = 16 << 20;

pub struct ProxyServer {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
    tunnels: Tunnels,
    task: tokio::task::JoinHandle<()>,
}

impl ProxyServer {
    /// A proxy that forwards everything.
    pub async fn start() -> ProxyServer {
        Self::with(true).await
    }

    /// A proxy that answers `CONNECT` with 403 (and forwards the rest).
    pub async fn refusing_tunnels() -> ProxyServer {
        Self::with(false).await
    }

    async fn with(tunnels: bool) -> ProxyServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let tunneled = Tunnels::default();
        let (log, taps) = (requests.clone(), tunneled.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (log, taps) = (log.clone(), taps.clone());
                tokio::spawn(async move {
                    let _ = relay(client, log, taps, tunnels).await;
                });
            }
        });
        ProxyServer {
            addr,
            requests,
            tunnels: tunneled,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`, what the config's `upload.proxy` takes.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Request lines seen, e.g. `CONNECT 127.0.0.1:4000`, in order.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    /// The bytes the client sent into each tunnel so far, in order of
    /// `CONNECT`.
    pub fn tunneled(&self) -> Vec<Vec<u8>> {
        let tunnels = self.tunnels.lock().unwrap();
        tunnels.iter().map(|t| t.lock().unwrap().clone()).collect()
    }
}

impl Drop for ProxyServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(
    mut client: TcpStream,
    log: Arc<Mutex<Vec<String>>>,
    taps: Tunnels,
    tunnels: bool,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        let n = client.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let text = String::from_utf8_lossy(&head[..end]).into_owned();
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_string();
    let mut parts = request_line.split(' ');
    let (method, target, version) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    log.lock().unwrap().push(format!("{method} {target}"));

    let mut upstream = if method == "CONNECT" {
        if !tunnels {
            client
                .write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
                .await?;
            return Ok(());
        }
        let mut upstream = TcpStream::connect(target).await?;
        client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await?;
        let tap = Arc::new(Mutex::new(Vec::new()));
        taps.lock().unwrap().push(tap.clone());
        return tunnel(client, &mut upstream, &head[end..], &tap).await;
    } else {
        // Absolute form: rewrite to origin form for the host.
        let rest = target.strip_prefix("http://").unwrap_or(target);
        let slash = rest.find('/').unwrap_or(rest.len());
        let (authority, path) = rest.split_at(slash);
        let path = if path.is_empty() { "/" } else { path };
        let mut upstream = TcpStream::connect(authority).await?;
        let mut forwarded = format!("{method} {path} {version}\r\n");
        for line in lines.filter(|l| !l.is_empty()) {
            if !line.to_ascii_lowercase().starts_with("proxy-") {
                forwarded.push_str(line);
                forwarded.push_str("\r\n");
            }
        }
        forwarded.push_str("\r\n");
        upstream.write_all(forwarded.as_bytes()).await?;
        upstream
    };
    upstream.write_all(&head[end..]).await?;
    copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}

/// Relay a tunnel both ways, recording what the client sends (`early`:
/// what it sent with its `CONNECT`) before passing it on.
async fn tunnel(
    mut client: TcpStream,
    upstream: &mut TcpStream,
    early: &[u8],
    tap: &Mutex<Vec<u8>>,
) -> std::io::Result<()> {
    let record = |bytes: &[u8]| {
        let mut kept = tap.lock().unwrap();
        let room = TUNNEL_KEPT.saturating_sub(kept.len());
        kept.extend_from_slice(&bytes[..bytes.len().min(room)]);
    };
    record(early);
    upstream.write_all(early).await?;
    let (mut from_client, mut to_client) = client.split();
    let (mut from_upstream, mut to_upstream) = upstream.split();
    let up = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = from_client.read(&mut buf).await?;
            if n == 0 {
                return to_upstream.shutdown().await;
            }
            record(&buf[..n]);
            to_upstream.write_all(&buf[..n]).await?;
        }
    };
    let down = async {
        tokio::io::copy(&mut from_upstream, &mut to_client).await?;
        to_client.shutdown().await
    };
    tokio::try_join!(up, down).map(drop)
}
