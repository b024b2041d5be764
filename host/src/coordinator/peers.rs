//! The coordinator's client for the node-to-node API.
//!
//! Every request is signed ([`crate::peer_auth`]) and bounded: a TCP
//! connection within `connect_timeout`, an answer within `peer_timeout`
//! (a session's upgraded connection, [`super::session`], then lives as
//! long as the task, watched by the driver's heartbeat check). Errors
//! name the node and say what happened in an operator's words.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde::Serialize;

use super::session::Session;
use crate::protocol::{
    Busy, CANCEL_TASK_PATH, LATEST_TASK_PATH, LowDisk, OpenSession, SESSION_PROTOCOL,
    SESSIONS_PATH, SETTINGS_PATH,
};
use crate::tls::TlsContext;

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
    #[error(
        "{node} does not speak this node's session protocol ({SESSION_PROTOCOL}): {what}; \
         run the same autocollect version on every node"
    )]
    OtherVersion { node: String, what: String },
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
    /// The HTTP clients and the TLS generation they were built for.
    clients: std::sync::Mutex<Clients>,
    tls: Option<Arc<TlsContext>>,
    secret: String,
    me: String,
    addresses: BTreeMap<String, String>,
    connect_timeout: Duration,
    timeout: Duration,
}

/// The clients a node's requests to other nodes go out on.
#[derive(Clone)]
struct Clients {
    /// The TLS generation they were built for.
    generation: u64,
    /// HTTP/2, for short requests: one pooled connection per node.
    requests: reqwest::Client,
    /// HTTP/1.1, for sessions: each upgraded to a connection of its own.
    sessions: reqwest::Client,
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
        let clients = build_clients(tls.as_deref(), connect_timeout)?;
        Ok(Peers {
            clients: std::sync::Mutex::new(clients),
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

    /// The clients for the current TLS configuration (rebuilt after a
    /// SIGHUP reload; requests in flight keep the ones they started with).
    fn clients(&self) -> Clients {
        let mut current = self.clients.lock().unwrap();
        if let Some(tls) = &self.tls
            && tls.client_config().1 != current.generation
        {
            match build_clients(Some(tls), self.connect_timeout) {
                Ok(fresh) => *current = fresh,
                Err(e) => tracing::error!("keeping the previous client for other nodes: {e:#}"),
            }
        }
        current.clone()
    }

    /// A signed request to `node`, over HTTP/2.
    fn request(
        &self,
        method: Method,
        node: &str,
        path_and_query: &str,
        body: Option<Vec<u8>>,
    ) -> Result<reqwest::RequestBuilder, PeerError> {
        let client = self.clients().requests;
        self.signed(&client, method, node, path_and_query, body)
            .map(|(request, _nonce)| request)
    }

    /// A request to `node` on `client`, signed; and its nonce.
    fn signed(
        &self,
        client: &reqwest::Client,
        method: Method,
        node: &str,
        path_and_query: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(reqwest::RequestBuilder, String), PeerError> {
        let address = self
            .address(node)
            .ok_or_else(|| PeerError::UnknownNode(node.to_string()))?;
        let body = body.unwrap_or_default();
        let signed = crate::peer_auth::sign(&self.secret, &self.me, &method, path_and_query, &body);
        let nonce = crate::peer_auth::nonce_of(&signed).to_string();
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut request = client.request(method, format!("{scheme}://{address}{path_and_query}"));
        for (name, value) in signed {
            request = request.header(name, value);
        }
        if !body.is_empty() {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        Ok((request, nonce))
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

    /// Open a session: the node's slot is ours until the session is
    /// dropped or closed. The node must answer, and the connection be
    /// upgraded, within the peer timeout.
    pub async fn open_session(&self, node: &str, req: &OpenSession) -> Result<Session, PeerError> {
        let body = serde_json::to_vec(req).expect("protocol types serialize");
        let client = self.clients().sessions;
        let (request, nonce) =
            self.signed(&client, Method::POST, node, SESSIONS_PATH, Some(body))?;
        let request = request
            .header(reqwest::header::CONNECTION, "upgrade")
            .header(reqwest::header::UPGRADE, SESSION_PROTOCOL);
        let opened = async {
            let response = request.send().await.map_err(|e| self.transport(node, e))?;
            self.upgraded(node, response).await
        };
        let connection = match tokio::time::timeout(self.timeout, opened).await {
            Ok(opened) => opened?,
            Err(_) => return Err(self.no_answer(node)),
        };
        Ok(Session::new(
            node,
            connection,
            &self.secret,
            &nonce,
            self.timeout,
        ))
    }

    /// The connection of a session the node took, or why it did not.
    async fn upgraded(
        &self,
        node: &str,
        response: reqwest::Response,
    ) -> Result<reqwest::Upgraded, PeerError> {
        let other_version = |what: String| PeerError::OtherVersion {
            node: node.to_string(),
            what,
        };
        let upgrade = response
            .headers()
            .get(reqwest::header::UPGRADE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        match response.status() {
            StatusCode::SWITCHING_PROTOCOLS if upgrade.as_deref() == Some(SESSION_PROTOCOL) => {
                response.upgrade().await.map_err(|e| PeerError::Broken {
                    node: node.to_string(),
                    reason: crate::client::error_chain(&e),
                })
            }
            StatusCode::SWITCHING_PROTOCOLS => Err(other_version(format!(
                "it switched to {}",
                upgrade.as_deref().unwrap_or("no named protocol")
            ))),
            StatusCode::UPGRADE_REQUIRED => Err(other_version(format!(
                "it speaks {}",
                upgrade.as_deref().unwrap_or("another one")
            ))),
            StatusCode::CONFLICT => {
                let busy = self
                    .read_json::<Busy>(node, response, MAX_SMALL_ANSWER)
                    .await?;
                Err(PeerError::Busy {
                    node: node.to_string(),
                    busy,
                })
            }
            StatusCode::INSUFFICIENT_STORAGE => {
                let low = self
                    .read_json::<LowDisk>(node, response, MAX_SMALL_ANSWER)
                    .await?;
                Err(PeerError::LowDisk {
                    node: node.to_string(),
                    message: low.message,
                })
            }
            // A node from before sessions were upgraded answers with its
            // event stream instead.
            status if status.is_success() => Err(other_version(format!(
                "it answered {status} without switching protocols (an older version?)"
            ))),
            status => Err(self.rejected(node, status, response).await),
        }
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

/// The clients for node-to-node requests and sessions.
fn build_clients(tls: Option<&TlsContext>, connect_timeout: Duration) -> anyhow::Result<Clients> {
    let builder = || {
        reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .pool_idle_timeout(POOL_IDLE)
            .tcp_nodelay(true)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
    };
    // Short requests: HTTP/2 only, so that requests in flight at once to
    // a node share one connection. Over TLS the connection negotiates
    // `tls::PEER_ALPN`; over plain HTTP it starts with HTTP/2's preface.
    let mut requests = builder().http2_prior_knowledge();
    // Sessions: HTTP/1.1, whose connection the node upgrades to the
    // session's own (an HTTP/2 connection would hold its buffers and
    // tables for the whole task, 38 KiB a node).
    let mut sessions = builder().http1_only().pool_max_idle_per_host(0);
    let mut generation = 0;
    if let Some(tls) = tls {
        let (config, g) = tls.client_config();
        generation = g;
        requests = requests.use_preconfigured_tls((*config).clone());
        let mut http1 = (*config).clone();
        http1.alpn_protocols = vec![b"http/1.1".to_vec()];
        sessions = sessions.use_preconfigured_tls(http1);
    }
    Ok(Clients {
        generation,
        requests: requests.build()?,
        sessions: sessions.build()?,
    })
}

/// The message of a field-keyed JSON error (`{"_": "..."}`), else the
/// body as text.
fn error_message(body: &[u8]) -> String {
    match serde_json::from_slice::<BTreeMap<String, String>>(body) {
        Ok(fields) => crate::protocol::field_errors_message(&fields),
        Err(_) => String::from_utf8_lossy(body).trim().to_string(),
    }
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
        let e = peers
            .push_settings("n9", &Default::default())
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "n9 is not a node of this cluster");
    }
}
