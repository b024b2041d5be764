//! A minimal support upload host, for the `demo` command: it stores the
//! body of each `PUT /CUSTOMER/[TICKET/]FILE` under a directory, streamed
//! to disk, and answers any other request (the preflight's `HEAD`) with
//! 200. HTTPS on loopback, with a certificate from a CA made for it
//! (written as `ca.pem` beside the directory, for `[upload] ca_file`);
//! not for real data.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::local_tls::{LocalCa, serve_tls};

pub struct UploadSink {
    pub addr: SocketAddr,
    pub dir: PathBuf,
    /// The CA that signed its certificate (PEM), for `[upload] ca_file`.
    pub ca_file: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl UploadSink {
    /// Serve HTTPS on an ephemeral loopback port, storing uploads under
    /// `dir`; the CA goes to `dir/../upload-ca.pem`.
    pub async fn start(dir: &Path) -> Result<UploadSink> {
        std::fs::create_dir_all(dir)?;
        let ca = LocalCa::new("autocollect demo upload CA")?;
        let ca_file = dir.with_file_name("upload-ca.pem");
        std::fs::write(&ca_file, ca.pem())?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = axum::Router::new()
            .fallback(store)
            .with_state(Arc::new(dir.to_path_buf()));
        let tls = ca.server_config(&["127.0.0.1"])?;
        let task = tokio::spawn(serve_tls(listener, tls, app));
        Ok(UploadSink {
            addr,
            dir: dir.to_path_buf(),
            ca_file,
            task,
        })
    }

    /// What to pass as the upload host.
    pub fn host(&self) -> String {
        format!("https://{}", self.addr)
    }
}

impl Drop for UploadSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn store(State(dir): State<Arc<PathBuf>>, request: Request) -> (StatusCode, String) {
    if request.method() != Method::PUT {
        return (StatusCode::OK, String::new());
    }
    // Path segments as they are (already quote_plus'ed by the uploader),
    // never `.` or `..`.
    let segments: Vec<&str> = request
        .uri()
        .path()
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    if segments.is_empty() || segments.iter().any(|s| *s == "." || *s == "..") {
        return (StatusCode::BAD_REQUEST, "bad path".into());
    }
    let path = segments.iter().fold(dir.to_path_buf(), |p, s| p.join(s));
    match write(&path, request).await {
        Ok(()) => (StatusCode::CREATED, String::new()),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn write(path: &Path, request: Request) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    let mut file = tokio::fs::File::create(path).await?;
    let mut body = request.into_body().into_data_stream();
    while let Some(chunk) = body.next().await {
        file.write_all(&chunk.map_err(std::io::Error::other)?)
            .await?;
    }
    file.flush().await
}
