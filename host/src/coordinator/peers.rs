//! The coordinator's client for the node-to-node API.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{Stream, StreamExt, TryStreamExt};
use reqwest::StatusCode;
use tokio_util::codec::{FramedRead, LinesCodec};
use tokio_util::io::StreamReader;

use crate::protocol::{
    Busy, CANCEL_TASK_PATH, CollectParameters, LATEST_TASK_PATH, NodeEvent, OpenSession,
    SESSIONS_PATH, SETTINGS_PATH, StartJob, StartUpload,
};
use crate::upload::Proxy;

/// Longest event line accepted from a node.
const MAX_EVENT_LINE: usize = 1 << 20;
/// Timeout of a short command (start job, cancel, status).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("node is busy with task {} coordinated by {}", .0.task_id, .0.coordinator)]
    Busy(Busy),
    #[error("node unreachable: {0}")]
    Unreachable(String),
    #[error("node answered {status}: {body}")]
    Rejected { status: StatusCode, body: String },
}

/// Addresses of the cluster's nodes and the shared secret.
pub struct Peers {
    client: reqwest::Client,
    secret: String,
    base_urls: BTreeMap<String, String>,
}

/// A node's event stream for one session. Dropping it ends the session.
pub struct SessionEvents {
    lines: Box<dyn Stream<Item = Result<String, String>> + Send + Unpin>,
}

impl SessionEvents {
    /// The next event; `None` when the node closed the stream.
    pub async fn next(&mut self) -> Option<Result<NodeEvent, String>> {
        let line = self.lines.next().await?;
        Some(line.and_then(|l| {
            serde_json::from_str(&l).map_err(|e| format!("bad event from node: {e}: {l:?}"))
        }))
    }
}

impl Peers {
    pub fn new(
        nodes: &BTreeMap<String, String>,
        secret: &str,
        connect_timeout: Duration,
    ) -> anyhow::Result<Peers> {
        let client = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .build()?;
        Ok(Peers {
            client,
            secret: secret.to_string(),
            base_urls: nodes
                .iter()
                .map(|(name, addr)| (name.clone(), format!("http://{addr}")))
                .collect(),
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.base_urls.keys()
    }

    /// `host:port` of `node`'s API, as the cluster config gives it.
    pub fn address(&self, node: &str) -> Option<&str> {
        self.base_urls
            .get(node)
            .map(|u| u.trim_start_matches("http://"))
    }

    pub fn contains(&self, node: &str) -> bool {
        self.base_urls.contains_key(node)
    }

    fn url(&self, node: &str, path: &str) -> String {
        format!("{}{path}", self.base_urls[node])
    }

    fn post(&self, node: &str, path: &str) -> reqwest::RequestBuilder {
        self.client
            .post(self.url(node, path))
            .bearer_auth(&self.secret)
    }

    /// Open a session: the node's slot is ours until the stream is dropped.
    pub async fn open_session(
        &self,
        node: &str,
        req: &OpenSession,
    ) -> Result<SessionEvents, PeerError> {
        let response = self
            .post(node, SESSIONS_PATH)
            .json(req)
            .send()
            .await
            .map_err(unreachable)?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::CONFLICT => {
                let busy = response.json::<Busy>().await.map_err(unreachable)?;
                return Err(PeerError::Busy(busy));
            }
            status => return Err(rejected(status, response).await),
        }
        let bytes = response.bytes_stream().map_err(std::io::Error::other);
        let lines = FramedRead::new(
            StreamReader::new(bytes),
            LinesCodec::new_with_max_length(MAX_EVENT_LINE),
        )
        .map_err(|e| e.to_string());
        Ok(SessionEvents {
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
        self.command(self.post(node, &path).json(&body))
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
        self.command(self.post(node, &path).json(&body))
            .await
            .map(drop)
    }

    /// End a session: the node releases its slot (cancelling any job).
    pub async fn close_session(&self, node: &str, task_id: &str) -> Result<(), PeerError> {
        let path = format!("{SESSIONS_PATH}/{task_id}/close");
        self.command(self.post(node, &path)).await.map(drop)
    }

    pub async fn cancel_job(&self, node: &str, task_id: &str) -> Result<(), PeerError> {
        let path = format!("{SESSIONS_PATH}/{task_id}/cancel");
        self.command(self.post(node, &path)).await.map(drop)
    }

    /// The latest task as the coordinator `node` sees it (status forwarded
    /// from another node). `query` is passed through (long-poll).
    pub async fn latest_task(
        &self,
        node: &str,
        query: &[(String, String)],
        wait: Duration,
    ) -> Result<serde_json::Value, PeerError> {
        let request = self
            .client
            .get(self.url(node, LATEST_TASK_PATH))
            .bearer_auth(&self.secret)
            .query(query)
            .timeout(COMMAND_TIMEOUT + wait);
        let response = request.send().await.map_err(unreachable)?;
        if !response.status().is_success() {
            return Err(rejected(response.status(), response).await);
        }
        response.json().await.map_err(unreachable)
    }

    /// Ask the coordinator `node` to cancel task `task_id`.
    pub async fn cancel_task(
        &self,
        node: &str,
        task_id: &str,
    ) -> Result<serde_json::Value, PeerError> {
        let response = self
            .command(
                self.post(node, CANCEL_TASK_PATH)
                    .json(&serde_json::json!({ "taskId": task_id })),
            )
            .await?;
        response.json().await.map_err(unreachable)
    }

    /// Give `node` the cluster's new settings.
    pub async fn push_settings(
        &self,
        node: &str,
        settings: &crate::settings::ClusterSettings,
    ) -> Result<(), PeerError> {
        self.command(self.post(node, SETTINGS_PATH).json(settings))
            .await
            .map(drop)
    }

    async fn command(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, PeerError> {
        let response = request
            .timeout(COMMAND_TIMEOUT)
            .send()
            .await
            .map_err(unreachable)?;
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(rejected(response.status(), response).await)
        }
    }
}

fn unreachable(e: reqwest::Error) -> PeerError {
    // reqwest's Display omits the cause ("error sending request"); the
    // chain says what actually went wrong (refused, timed out, ...).
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        message = format!("{message}: {s}");
        source = s.source();
    }
    PeerError::Unreachable(message)
}

async fn rejected(status: StatusCode, response: reqwest::Response) -> PeerError {
    let body = response.text().await.unwrap_or_default();
    PeerError::Rejected { status, body }
}
