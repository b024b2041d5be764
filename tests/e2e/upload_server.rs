//! A real HTTP server standing in for the support upload host, over plain
//! HTTP or over TLS with a certificate from a CA made for it. It records
//! each PUT (path, body SHA-256, size), streaming bodies so large uploads
//! cost no memory, and answers from a script: a queue of responses, then
//! 200 for the rest.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use autocollect::local_tls::{LocalCa, serve_tls};
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use futures::StreamExt;
use sha2::{Digest, Sha256};

/// How the server answers one PUT.
#[derive(Debug, Clone, Copy)]
pub enum Reply {
    Status(u16, &'static str),
    /// Read the body, wait this long, then answer 200.
    Slow(std::time::Duration),
    /// Read the body, then never answer (cancel tests).
    Hang,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub path: String,
    pub sha256: String,
    pub size: u64,
    /// The body's first bytes (at most [`HEAD_KEPT`]).
    pub head: Vec<u8>,
}

/// Bytes of each body kept for inspection.
pub const HEAD_KEPT: usize = 64 * 1024;

#[derive(Default)]
struct Shared {
    script: Mutex<VecDeque<Reply>>,
    received: Mutex<Vec<Received>>,
    /// How many PUT bodies have arrived, for waiting on them.
    count: tokio::sync::watch::Sender<usize>,
    /// When each answered PUT arrived and was answered.
    intervals: Mutex<Vec<(Instant, Instant)>>,
}

pub struct UploadServer {
    pub addr: SocketAddr,
    /// Over TLS: the certificate (PEM) of the CA that signed ours.
    ca_pem: Option<String>,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl UploadServer {
    /// Plain HTTP.
    pub async fn start() -> UploadServer {
        Self::serve(None).await
    }

    /// HTTPS, with a certificate for `localhost` and `127.0.0.1` signed by
    /// a CA made for this server alone ([`UploadServer::ca_pem`]).
    pub async fn start_tls() -> UploadServer {
        let ca = LocalCa::new("autocollect test upload CA").unwrap();
        let tls = ca.server_config(&["localhost", "127.0.0.1"]).unwrap();
        Self::serve(Some((ca.pem(), tls))).await
    }

    async fn serve(tls: Option<(String, Arc<rustls::ServerConfig>)>) -> UploadServer {
        let shared = Arc::new(Shared::default());
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (ca_pem, task) = match tls {
            None => (
                None,
                tokio::spawn(async move { axum::serve(listener, app).await.unwrap() }),
            ),
            Some((pem, config)) => (Some(pem), tokio::spawn(serve_tls(listener, config, app))),
        };
        UploadServer {
            addr,
            ca_pem,
            shared,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`, or `https://` over TLS (what a user
    /// passes as upload host).
    pub fn host(&self) -> String {
        self.host_named(&self.addr.ip().to_string())
    }

    /// The same with another name for this machine (`localhost`).
    pub fn host_named(&self, name: &str) -> String {
        let scheme = if self.ca_pem.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{name}:{}", self.addr.port())
    }

    /// The CA's certificate (PEM), for `[upload] ca_file`; TLS only.
    pub fn ca_pem(&self) -> &str {
        self.ca_pem.as_deref().expect("a TLS upload server")
    }

    /// Write the CA's certificate to `dir/upload-ca.pem` (for `[upload]
    /// ca_file` or `--cacert`); its path.
    pub fn write_ca(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("upload-ca.pem");
        std::fs::write(&path, self.ca_pem()).unwrap();
        path
    }

    /// Answer the next PUTs with these, in order; then 200.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.shared.script.lock().unwrap().extend(replies);
    }

    /// (arrival, answer) of each answered PUT, in answer order.
    pub fn intervals(&self) -> Vec<(Instant, Instant)> {
        self.shared.intervals.lock().unwrap().clone()
    }

    /// The artifacts received: every PUT but the host's manifests
    /// (`<zip>.manifest.json`, sent after each zip).
    pub fn received(&self) -> Vec<Received> {
        let all = self.received_with_manifests();
        all.into_iter()
            .filter(|r| !r.path.ends_with(".manifest.json"))
            .collect()
    }

    /// Every PUT received, manifests included, in arrival order.
    pub fn received_with_manifests(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }

    /// Wait until `n` PUT bodies have arrived in full.
    pub async fn wait_received(&self, n: usize) {
        let mut count = self.shared.count.subscribe();
        let arrived = count.wait_for(|c| *c >= n);
        tokio::time::timeout(crate::support::PATIENCE, arrived)
            .await
            .expect("uploads arrive in time")
            .unwrap();
    }
}

impl Drop for UploadServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> (StatusCode, String) {
    if request.method() != Method::PUT {
        // HEAD (the preflight) and anything else: the host is up.
        return (StatusCode::OK, String::new());
    }
    let arrived = Instant::now();
    let path = request.uri().path().to_string();
    let mut body = Body::into_data_stream(request.into_body());
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut head = Vec::new();
    while let Some(chunk) = body.next().await {
        let Ok(chunk) = chunk else {
            return (StatusCode::BAD_REQUEST, "body interrupted".into());
        };
        size += chunk.len() as u64;
        hasher.update(&chunk);
        let room = HEAD_KEPT.saturating_sub(head.len());
        head.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }
    let sha256 = hex(&hasher.finalize());
    shared.received.lock().unwrap().push(Received {
        path,
        sha256,
        size,
        head,
    });
    shared.count.send_modify(|c| *c += 1);
    let reply = shared.script.lock().unwrap().pop_front();
    let answer = match reply {
        None => (StatusCode::OK, String::new()),
        Some(Reply::Status(code, body)) => (StatusCode::from_u16(code).unwrap(), body.into()),
        Some(Reply::Slow(delay)) => {
            tokio::time::sleep(delay).await;
            (StatusCode::OK, String::new())
        }
        Some(Reply::Hang) => futures::future::pending().await,
    };
    shared
        .intervals
        .lock()
        .unwrap()
        .push((arrived, Instant::now()));
    answer
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a file, streamed.
pub fn sha256_file(path: &std::path::Path) -> String {
    let mut file = std::fs::File::open(path).unwrap();
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).unwrap();
    hex(&hasher.finalize())
}

/// A loopback port nothing listens on.
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}
