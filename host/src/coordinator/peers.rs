//! The coordinator's client for the node-to-node API.
//!
//! Every request is signed ([`crate::peer_auth`]) and bounded: a TCP
//! connection within `connect_timeout`, an answer within `peer_timeout`
//! (a session's stream then lives as long as the task, watched by the
//! driver's heartbeat check). Errors name the node and say what happened
//! in an operator's words.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use reqwest::{Method, StatusCode};
use serde::Serialize;
use tokio_util::codec::{FramedRead, LinesCodec};
use tokio_util::io::StreamReader;

use crate::protocol::{
    Busy, CANCEL_TASK_PATH, CollectParameters, LATEST_TASK_PATH, LowDisk, NodeEvent, OpenSession,
    SESSIONS_PATH, SETTINGS_PATH, StartJob, StartUpload,
};
use crate::tls::TlsContext;
use crate::upload::Proxy;

/// Longest event line accepted from a node.
const MAX_EVENT_LINE: usize = 1 << 20;
/// What a session's line buffer starts with (not the default 8 KiB).
const EVENT_BUFFER: usize = 512;
/// Longest error body read from a node.
const MAX_ERROR_BODY: usize = 16 * 1024;
/// Pooled connections are dropped after this long unused: shorter than
/// the server's header timeout, so we never reuse one it is closing.
const POOL_IDLE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("{node} is busy with task {} coordinated by {}", .busy.task_id, .busy.coordinator)]
    Busy { node: String, busy: Busy },
    #[error("{node} cannot collect: {message}")]
    LowDisk { node: String, message: String },
    #[error("{node} did not answer within {}", secs(*.after))]
    NoAnswer { node: String, after: Duration },
    #[error("cannot connect to {node} at {address}: {reason}")]
    Unreachable {
        node: String,
        address: String,
        reason: String,
    },
    #[error("the connection to {node} broke: {reason}")]
    Broken { node: String, reason: String },
    #[error("{node} sent an answer over {max} bytes")]
    TooLarge { node: String, max: usize },
    #[error("{node} refused the request ({status}): {message}")]
    Rejected {
        node: String,
        status: StatusCode,
        message: String,
    },
    #[error("{0} is not a node of this cluster")]
    UnknownNode(String),
}

impl PeerError {
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            PeerError::Rejected { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Largest answer that carries a whole task (forwarded status, cancel,
/// task events): a task of 10,000 nodes with long outputs fits.
const MAX_TASK_BYTES: usize = 64 << 20;
/// Largest answer of another kind (a refusal's reason: busy, low disk).
const MAX_SMALL_ANSWER: usize = 64 * 1024;

/// `5 s`, `1.5 s`: durations as operators read them.
pub fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0} s")
    } else {
        format!("{s:.1} s")
    }
}

/// Addresses of the cluster's nodes, this node's name and the secret
/// that signs every request.
pub struct Peers {
    /// The HTTP client and the TLS generation it was built for.
    client: std::sync::Mutex<(u64, reqwest::Client)>,
    tls: Option<Arc<TlsContext>>,
    secret: String,
    me: String,
    addresses: BTreeMap<String, String>,
    connect_timeout: Duration,
    timeout: Duration,
}

/// A node's event stream for one session. Dropping it ends the session.
pub struct SessionEvents {
    node: String,
    lines: Box<dyn Stream<Item = Result<String, String>> + Send + Unpin>,
}

impl SessionEvents {
    /// The next event; `None` when the node closed the stream. An error
    /// says, in the node's name, what broke.
    pub async fn next(&mut self) -> Option<Result<NodeEvent, String>> {
        let line = self.lines.next().await?;
        Some(match line {
            Ok(l) => serde_json::from_str(&l).map_err(|e| {
                format!(
                    "{} sent an event this node does not understand ({e}): {:?}",
                    self.node,
                    l.chars().take(200).collect::<String>()
                )
            }),
            Err(e) => Err(format!("the connection to {} broke: {e}", self.node)),
        })
    }
}

impl Peers {
    /// Requests go over TLS (checked against `[tls] ca_file`, presenting
    /// this node's certificate) when `tls` is given, else plain HTTP.
    pub fn new(
        nodes: &BTreeMap<String, String>,
        secret: &str,
        me: &str,
        tls: Option<Arc<TlsContext>>,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> anyhow::Result<Peers> {
        let (generation, client) = build_client(tls.as_deref(), connect_timeout)?;
        Ok(Peers {
            client: std::sync::Mutex::new((generation, client)),
            tls,
            secret: secret.to_string(),
            me: me.to_string(),
            addresses: nodes.clone(),
            connect_timeout,
            timeout,
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.addresses.keys()
    }

    /// `host:port` of `node`'s API, as the cluster config gives it.
    pub fn address(&self, node: &str) -> Option<&str> {
        self.addresses.get(node).map(String::as_str)
    }

    pub fn contains(&self, node: &str) -> bool {
        self.addresses.contains_key(node)
    }

    /// How long a node has to answer a request (`peer_timeout`).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The client for the current TLS configuration (rebuilt after a
    /// SIGHUP reload; requests in flight keep the one they started with).
    fn client(&self) -> reqwest::Client {
        let mut current = self.client.lock().unwrap();
        if let Some(tls) = &self.tls
            && tls.client_config().1 != current.0
        {
            match build_client(Some(tls), self.connect_timeout) {
                Ok(fresh) => *current = fresh,
                Err(e) => tracing::error!("keeping the previous client for other nodes: {e:#}"),
            }
        }
        current.1.clone()
    }

    /// A signed request to `node`.
    fn request(
        &self,
        method: Method,
        node: &str,
        path_and_query: &str,
        body: Option<Vec<u8>>,
    ) -> Result<reqwest::RequestBuilder, PeerError> {
        let address = self
            .address(node)
            .ok_or_else(|| PeerError::UnknownNode(node.to_string()))?;
        let body = body.unwrap_or_default();
        let signed = crate::peer_auth::sign(&self.secret, &self.me, &method, path_and_query, &body);
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut request = self
            .client()
            .request(method, format!("{scheme}://{address}{path_and_query}"));
        for (name, value) in signed {
            request = request.header(name, value);
        }
        if !body.is_empty() {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        Ok(request)
    }

    fn json<T: Serialize>(
        &self,
        node: &str,
        path: &str,
        body: &T,
    ) -> Result<reqwest::RequestBuilder, PeerError> {
        let body = serde_json::to_vec(body).expect("protocol types serialize");
        self.request(Method::POST, node, path, Some(body))
    }

    /// Open a session: the node's slot is ours until the stream is dropped.
    /// The node must answer within the peer timeout.
    pub async fn open_session(
        &self,
        node: &str,
        req: &OpenSession,
    ) -> Result<SessionEvents, PeerError> {
        let request = self.json(node, SESSIONS_PATH, req)?;
        let response = match tokio::time::timeout(self.timeout, request.send()).await {
            Ok(sent) => sent.map_err(|e| self.transport(node, e))?,
            Err(_) => return Err(self.no_answer(node)),
        };
        match response.status() {
            StatusCode::OK => {}
            StatusCode::CONFLICT => {
                let busy = self
                    .read_json::<Busy>(node, response, MAX_SMALL_ANSWER)
                    .await?;
                return Err(PeerError::Busy {
                    node: node.to_string(),
                    busy,
                });
            }
            StatusCode::INSUFFICIENT_STORAGE => {
                let low = self
                    .read_json::<LowDisk>(node, response, MAX_SMALL_ANSWER)
                    .await?;
                return Err(PeerError::LowDisk {
                    node: node.to_string(),
                    message: low.message,
                });
            }
            status => return Err(self.rejected(node, status, response).await),
        }
        let bytes = response
            .bytes_stream()
            .map_err(|e| std::io::Error::other(innermost(&e)));
        // Event lines are short: a small buffer to start with (it grows
        // for a long one), as a coordinator holds one per node.
        let lines = FramedRead::with_capacity(
            StreamReader::new(bytes),
            LinesCodec::new_with_max_length(MAX_EVENT_LINE),
            EVENT_BUFFER,
        )
        .map_err(|e| e.to_string());
        Ok(SessionEvents {
            node: node.to_string(),
            lines: Box::new(lines),
        })
    }

    pub async fn start_job(
        &self,
        node: &str,
        task_id: &str,
        parameters: &CollectParameters,
    ) -> Result<(), PeerError> {
        let path = format!("{SESSIONS_PATH}/{task_id}/job");
        let body = StartJob {
            parameters: parameters.clone(),
        };
        self.command(node, self.json(node, &path, &body)?)
            .await
            .map(drop)
    }

    /// Upload what the node collected to `base_url` + its file name.
    pub async fn start_upload(
        &self,
        node: &str,
        task_id: &str,
        base_url: &str,
        proxy: Option<&Proxy>,
    ) -> Result<(), PeerError> {
        let path = format!("{SESSIONS_PATH}/{task_id}/upload");
        let body = StartUpload {
            base_url: base_url.to_string(),
            proxy: proxy.map(|p| p.given.clone()),
        };
        self.command(node, self.json(node, &path, &body)?)
            .await
            .map(drop)
    }

    /// End a session: the node releases its slot (cancelling any job).
    pub async fn close_session(&self, node: &str, task_id: &str) -> Result<(), PeerError> {
        self.session_command(node, task_id, "close").await
    }

    pub async fn cancel_job(&self, node: &str, task_id: &str) -> Result<(), PeerError> {
        self.session_command(node, task_id, "cancel").await
    }

    /// Whether `node` answers its `/health` within `deadline` (for
    /// `/pools/default`'s `status`).
    pub async fn reachable(&self, node: &str, deadline: Duration) -> bool {
        match self.request(Method::GET, node, "/health", None) {
            Ok(request) => self
                .answer(node, request.timeout(deadline), deadline)
                .await
                .is_ok(),
            Err(_) => false,
        }
    }

    /// Tell the node we are still here (renews the session's lease).
    pub async fn ping(&self, node: &str, task_id: &str) -> Result<(), PeerError> {
        self.session_command(node, task_id, "ping").await
    }

    async fn session_command(
        &self,
        node: &str,
        task_id: &str,
        verb: &str,
    ) -> Result<(), PeerError> {
        let path = format!("{SESSIONS_PATH}/{task_id}/{verb}");
        let request = self.request(Method::POST, node, &path, None)?;
        self.command(node, request).await.map(drop)
    }

    /// The latest task as the coordinator `node` sees it (status forwarded
    /// from another node). `query` is passed through (long-poll `wait`,
    /// which extends the deadline).
    pub async fn latest_task(
        &self,
        node: &str,
        query: &[(String, String)],
        wait: Duration,
    ) -> Result<serde_json::Value, PeerError> {
        let mut path = LATEST_TASK_PATH.to_string();
        if !query.is_empty() {
            path.push('?');
            path.push_str(&serde_urlencoded::to_string(query).expect("pairs encode"));
        }
        let request = self
            .request(Method::GET, node, &path, None)?
            .timeout(self.timeout + wait);
        let response = self.answer(node, request, self.timeout + wait).await?;
        self.read_json(node, response, MAX_TASK_BYTES).await
    }

    /// The coordinator `node`'s task events after version `after` (waiting
    /// up to `wait` for one), or its latest task whole when `after` is
    /// `None` or too old: for the event stream of a node that does not
    /// coordinate. The answer is bounded (`MAX_TASK_BYTES`).
    pub async fn task_events(
        &self,
        node: &str,
        after: Option<u64>,
        wait: Duration,
    ) -> Result<crate::protocol::TaskEvents, PeerError> {
        let mut query = vec![("wait".to_string(), wait.as_secs_f64().to_string())];
        if let Some(after) = after {
            query.push(("after".to_string(), after.to_string()));
        }
        let path = format!(
            "{}?{}",
            crate::protocol::TASK_EVENTS_PATH,
            serde_urlencoded::to_string(&query).expect("pairs encode")
        );
        let request = self
            .request(Method::GET, node, &path, None)?
            .timeout(self.timeout + wait);
        let response = self.answer(node, request, self.timeout + wait).await?;
        let body = self.read_whole(node, response, MAX_TASK_BYTES).await?;
        serde_json::from_slice(&body).map_err(|e| PeerError::Broken {
            node: node.to_string(),
            reason: format!("it sent task events this node does not understand: {e}"),
        })
    }

    /// Ask the coordinator `node` to cancel task `task_id`; it waits up to
    /// `wait` for its nodes to confirm.
    pub async fn cancel_task(
        &self,
        node: &str,
        task_id: &str,
        wait: Duration,
    ) -> Result<serde_json::Value, PeerError> {
        let body = serde_json::json!({ "taskId": task_id });
        let request = self
            .json(node, CANCEL_TASK_PATH, &body)?
            .timeout(self.timeout + wait);
        let response = self.answer(node, request, self.timeout + wait).await?;
        self.read_json(node, response, MAX_TASK_BYTES).await
    }

    /// Give `node` the cluster's new settings.
    pub async fn push_settings(
        &self,
        node: &str,
        settings: &crate::settings::ClusterSettings,
    ) -> Result<(), PeerError> {
        self.command(node, self.json(node, SETTINGS_PATH, settings)?)
            .await
            .map(drop)
    }

    /// A short command: answered within the peer timeout, and successful.
    async fn command(
        &self,
        node: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, PeerError> {
        self.answer(node, request.timeout(self.timeout), self.timeout)
            .await
    }

    async fn answer(
        &self,
        node: &str,
        request: reqwest::RequestBuilder,
        deadline: Duration,
    ) -> Result<reqwest::Response, PeerError> {
        let response = match tokio::time::timeout(deadline, request.send()).await {
            Ok(sent) => sent.map_err(|e| self.transport(node, e))?,
            Err(_) => return Err(self.no_answer(node)),
        };
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(self.rejected(node, response.status(), response).await)
        }
    }

    async fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        node: &str,
        response: reqwest::Response,
        max: usize,
    ) -> Result<T, PeerError> {
        let body = self.read_whole(node, response, max).await?;
        serde_json::from_slice(&body).map_err(|e| PeerError::Broken {
            node: node.to_string(),
            reason: format!("it sent an answer this node does not understand: {e}"),
        })
    }

    /// The body, read within the peer timeout: at most `max` bytes, or
    /// an error that says so (a node's answer is input like any other).
    async fn read_whole(
        &self,
        node: &str,
        response: reqwest::Response,
        max: usize,
    ) -> Result<Bytes, PeerError> {
        let body = self
            .read_body(node, response, max.saturating_add(1))
            .await?;
        if body.len() > max {
            return Err(PeerError::TooLarge {
                node: node.to_string(),
                max,
            });
        }
        Ok(body)
    }

    /// The body, read within the peer timeout and at most `max` bytes
    /// (more is cut).
    async fn read_body(
        &self,
        node: &str,
        response: reqwest::Response,
        max: usize,
    ) -> Result<Bytes, PeerError> {
        let mut body = Vec::new();
        let mut stream = response.bytes_stream();
        let read = async {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| self.transport(node, e))?;
                let room = max.saturating_sub(body.len());
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if body.len() >= max {
                    break;
                }
            }
            Ok(())
        };
        match tokio::time::timeout(self.timeout, read).await {
            Ok(Ok(())) => Ok(body.into()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(self.no_answer(node)),
        }
    }

    fn no_answer(&self, node: &str) -> PeerError {
        PeerError::NoAnswer {
            node: node.to_string(),
            after: self.timeout,
        }
    }

    /// A transport failure, in words.
    fn transport(&self, node: &str, e: reqwest::Error) -> PeerError {
        let address = self.address(node).unwrap_or_default().to_string();
        if e.is_connect() {
            let reason = if e.is_timeout() && self.tls.is_some() {
                // The handshake is part of connecting: a hung daemon
                // accepts TCP (its kernel does) but never answers TLS.
                format!(
                    "no TLS connection within {} (nothing accepted it, or the TLS handshake \
                     got no answer)",
                    secs(self.connect_timeout)
                )
            } else if e.is_timeout() {
                format!("no connection within {}", secs(self.connect_timeout))
            } else {
                let chain = crate::client::error_chain(&e);
                match io_kind(&e) {
                    Some(std::io::ErrorKind::ConnectionRefused) => {
                        "connection refused (is its daemon running?)".to_string()
                    }
                    _ if chain.contains("invalid peer certificate") => format!(
                        "its TLS certificate is not accepted (is it signed by the CA of \
                         [tls] ca_file, and valid for {}?): {chain}",
                        crate::tls::host_of(&address)
                    ),
                    _ => chain,
                }
            };
            return PeerError::Unreachable {
                node: node.to_string(),
                address,
                reason,
            };
        }
        if e.is_timeout() {
            return self.no_answer(node);
        }
        PeerError::Broken {
            node: node.to_string(),
            reason: crate::client::error_chain(&e),
        }
    }

    async fn rejected(
        &self,
        node: &str,
        status: StatusCode,
        response: reqwest::Response,
    ) -> PeerError {
        let body = self
            .read_body(node, response, MAX_ERROR_BODY)
            .await
            .unwrap_or_default();
        PeerError::Rejected {
            node: node.to_string(),
            status,
            message: error_message(&body),
        }
    }
}

/// A client for node-to-node requests, and the TLS generation it uses.
fn build_client(
    tls: Option<&TlsContext>,
    connect_timeout: Duration,
) -> anyhow::Result<(u64, reqwest::Client)> {
    // HTTP/2 only: one connection per node carries the session stream,
    // commands and pings as streams (HTTP/1.1 needs a connection for each
    // request in flight). Over TLS the connection negotiates
    // `tls::PEER_ALPN`; over plain HTTP it starts with HTTP/2's preface.
    let mut builder = reqwest::Client::builder()
        .http2_prior_knowledge()
        .connect_timeout(connect_timeout)
        .pool_idle_timeout(POOL_IDLE)
        .tcp_nodelay(true)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none());
    let mut generation = 0;
    if let Some(tls) = tls {
        let (config, g) = tls.client_config();
        generation = g;
        builder = builder.use_preconfigured_tls((*config).clone());
    }
    Ok((generation, builder.build()?))
}

/// The message of a field-keyed JSON error (`{"_": "..."}`), else the
/// body as text.
fn error_message(body: &[u8]) -> String {
    match serde_json::from_slice::<BTreeMap<String, String>>(body) {
        Ok(fields) => fields
            .iter()
            .map(|(k, v)| {
                if k == "_" {
                    v.clone()
                } else {
                    format!("{k}: {v}")
                }
            })
            .collect::<Vec<_>>()
            .join("; "),
        Err(_) => String::from_utf8_lossy(body).trim().to_string(),
    }
}

/// The deepest cause of `e`: what actually happened ("connection closed
/// before message completed"), not "error decoding response body".
fn innermost(e: &reqwest::Error) -> String {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message = s.to_string();
        source = s.source();
    }
    message
}

fn io_kind(e: &reqwest::Error) -> Option<std::io::ErrorKind> {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        source = s.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_operators_write_them() {
        assert_eq!(secs(Duration::from_secs(5)), "5 s");
        assert_eq!(secs(Duration::from_millis(1500)), "1.5 s");
    }

    #[test]
    fn error_bodies_become_messages() {
        assert_eq!(error_message(br#"{"_":"no session"}"#), "no session");
        assert_eq!(error_message(br#"{"proxy":"bad"}"#), "proxy: bad");
        assert_eq!(error_message(b" plain "), "plain");
    }

    #[tokio::test]
    async fn an_unknown_node_is_an_error_not_a_panic() {
        let peers = Peers::new(
            &BTreeMap::from([("n1".to_string(), "127.0.0.1:9".to_string())]),
            "0123456789abcdef",
            "n1",
            None,
            Duration::from_secs(1),
            Duration::from_secs(1),
        )
        .unwrap();
        let e = peers.cancel_job("n9", "t").await.unwrap_err();
        assert_eq!(e.to_string(), "n9 is not a node of this cluster");
    }
}
