//! A client for the public API (the CLI, the demo, tests, benchmarks).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::api::{CANCEL_URI, EVENTS_URI, HEALTH_URI, START_URI, STATUS_URI};
use crate::coordinator::task::{TaskState, TaskStatus};

/// Long-poll length asked of the server per request.
const POLL_SECS: f64 = 20.0;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error (its JSON body, field-keyed).
    #[error("{status}: {body}")]
    Api { status: StatusCode, body: Value },
    #[error("cannot reach {url}: {message}")]
    Transport { url: String, message: String },
    #[error("timed out after {0:?} waiting for the task")]
    Timeout(Duration),
}

#[derive(Clone)]
pub struct ApiClient {
    base: String,
    user: String,
    password: String,
    http: reqwest::Client,
}

/// How a client checks the daemon's certificate (`https://` URLs).
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// Trust only the CA certificates in this PEM file (as curl's and
    /// couchbase-cli's `--cacert`). Absent: the public web roots.
    pub ca_file: Option<PathBuf>,
    /// Check nothing (`--no-ssl-verify`): the connection is encrypted but
    /// anyone in the middle can read it.
    pub no_verify: bool,
}

impl ApiClient {
    /// `base` is like `https://127.0.0.1:9101`; its certificate is checked
    /// against the public web roots.
    pub fn new(base: &str, user: &str, password: &str) -> ApiClient {
        let http = Self::builder()
            .build()
            .expect("a client with default settings");
        Self::with_http(base, user, password, http)
    }

    /// As [`ApiClient::new`], checking the daemon's certificate as `tls`
    /// says.
    pub fn with_tls(
        base: &str,
        user: &str,
        password: &str,
        tls: &ClientTls,
    ) -> anyhow::Result<ApiClient> {
        let mut builder = Self::builder();
        if let Some(path) = &tls.ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("reading --cacert {}: {e}", path.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .ok()
                .filter(|c| !c.is_empty())
                .ok_or_else(|| {
                    anyhow::anyhow!("--cacert {}: no PEM certificate in it", path.display())
                })?;
            builder = builder.tls_built_in_root_certs(false);
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        if tls.no_verify {
            builder = builder.danger_accept_invalid_certs(true);
        }
        let http = builder
            .build()
            .map_err(|e| anyhow::anyhow!("TLS settings: {}", error_chain(&e)))?;
        Ok(Self::with_http(base, user, password, http))
    }

    fn builder() -> reqwest::ClientBuilder {
        // Idle connections are dropped before the daemon's header timeout
        // closes them, so a request never goes out on one the server is
        // closing.
        reqwest::Client::builder().pool_idle_timeout(std::time::Duration::from_secs(10))
    }

    fn with_http(base: &str, user: &str, password: &str, http: reqwest::Client) -> ApiClient {
        ApiClient {
            base: base.trim_end_matches('/').to_string(),
            user: user.to_string(),
            password: password.to_string(),
            http,
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Any request, any form body; returns status and JSON body (tests use
    /// this to check error responses exactly).
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<RequestBody>,
        auth: bool,
    ) -> Result<(StatusCode, Value), ClientError> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method, &url);
        if auth {
            request = request.basic_auth(&self.user, Some(&self.password));
        }
        request = match body {
            Some(RequestBody::Form(pairs)) => request.form(&pairs),
            Some(RequestBody::Json(v)) => request.json(&v),
            None => request,
        };
        let response = request.send().await.map_err(|e| ClientError::Transport {
            url: url.clone(),
            message: error_chain(&e),
        })?;
        let status = response.status();
        let text = response.text().await.map_err(|e| ClientError::Transport {
            url,
            message: error_chain(&e),
        })?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, body))
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<RequestBody>,
    ) -> Result<Value, ClientError> {
        let (status, body) = self.request(method, path, body, true).await?;
        if status.is_success() {
            Ok(body)
        } else {
            Err(ClientError::Api { status, body })
        }
    }

    /// Start a collection: `nodes` is `all` or a comma list of names.
    pub async fn start(&self, nodes: &str) -> Result<TaskStatus, ClientError> {
        self.start_with(&StartOptions::nodes(nodes)).await
    }

    /// Start a collection, uploading if `options` name a destination.
    pub async fn start_with(&self, options: &StartOptions) -> Result<TaskStatus, ClientError> {
        let from = if options.nodes == "all" {
            "allnodes"
        } else {
            &options.nodes
        };
        let mut form = vec![("from".to_string(), from.to_string())];
        let mut add = |key: &str, value: &Option<String>| {
            if let Some(v) = value {
                form.push((key.to_string(), v.clone()));
            }
        };
        add("upload_host", &options.upload_host);
        add("customer", &options.customer);
        add("ticket", &options.ticket);
        add("encryptionPassword", &options.encryption_password);
        add("since", &options.since);
        add("until", &options.until);
        add("taskRegexp", &options.task_regexp);
        if options.bypass_reachability_checks {
            form.push(("bypassReachabilityChecks".into(), "true".into()));
        }
        let body = RequestBody::Form(form);
        parse(self.call(Method::POST, START_URI, Some(body)).await?)
    }

    /// The latest task; `None` if none has run.
    pub async fn status(&self) -> Result<Option<TaskStatus>, ClientError> {
        self.status_since(None).await
    }

    async fn status_since(&self, since: Option<u64>) -> Result<Option<TaskStatus>, ClientError> {
        let path = match since {
            Some(v) => format!("{STATUS_URI}?since={v}&wait={POLL_SECS}"),
            None => STATUS_URI.to_string(),
        };
        match self.call(Method::GET, &path, None).await {
            Ok(v) => parse(v).map(Some),
            Err(ClientError::Api { status, .. }) if status == StatusCode::NOT_FOUND => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Follow the latest task until `done`, calling `on_change` with it
    /// after every change: from the event stream
    /// (`GET /collectLogs/events`, resumed with `Last-Event-ID` if the
    /// connection drops), or by long-polls from a daemon without one.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        mut on_change: impl FnMut(&TaskStatus),
        done: impl Fn(&TaskStatus) -> bool,
    ) -> Result<TaskStatus, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut task: Option<TaskStatus> = None;
        let mut last_id: Option<u64> = None;
        let mut dropped = 0;
        loop {
            let mut stream = match self.events(last_id).await {
                Ok(s) => s,
                Err(ClientError::Api { status, .. })
                    if status == StatusCode::NOT_FOUND
                        || status == StatusCode::METHOD_NOT_ALLOWED =>
                {
                    return self.poll_until(timeout, on_change, done).await;
                }
                Err(e) => return Err(e),
            };
            loop {
                let event = match tokio::time::timeout_at(deadline, stream.next()).await {
                    Err(_) => return Err(ClientError::Timeout(timeout)),
                    Ok(Some(Ok(event))) => event,
                    Ok(Some(Err(e))) if dropped < 3 => {
                        tracing::debug!("event stream: {e}");
                        break;
                    }
                    Ok(Some(Err(e))) => return Err(e),
                    Ok(None) => break,
                };
                if event.apply(&mut task).is_err() {
                    // A change for a task we do not hold: start over.
                    last_id = None;
                    break;
                }
                last_id = event.id.or(last_id);
                if let Some(t) = &task {
                    on_change(t);
                    if done(t) {
                        return Ok(t.clone());
                    }
                }
            }
            dropped += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Open the event stream, resuming after `last_event_id`.
    pub async fn events(&self, last_event_id: Option<u64>) -> Result<EventStream, ClientError> {
        let url = format!("{}{EVENTS_URI}", self.base);
        let mut request = self
            .http
            .get(&url)
            .basic_auth(&self.user, Some(&self.password))
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id.to_string());
        }
        let response = request.send().await.map_err(|e| ClientError::Transport {
            url: url.clone(),
            message: error_chain(&e),
        })?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
            return Err(ClientError::Api { status, body });
        }
        Ok(EventStream {
            url,
            body: Box::pin(response.bytes_stream()),
            buffer: Vec::new(),
        })
    }

    /// [`ApiClient::wait_until`] by long-polls of the status.
    pub async fn poll_until(
        &self,
        timeout: Duration,
        mut on_change: impl FnMut(&TaskStatus),
        done: impl Fn(&TaskStatus) -> bool,
    ) -> Result<TaskStatus, ClientError> {
        let started = Instant::now();
        let mut since = None;
        loop {
            if started.elapsed() > timeout {
                return Err(ClientError::Timeout(timeout));
            }
            if let Some(task) = self.status_since(since).await? {
                if since.is_none_or(|v| task.version > v) {
                    on_change(&task);
                }
                if done(&task) {
                    return Ok(task);
                }
                since = Some(task.version);
            } else {
                since = Some(0);
            }
        }
    }

    /// Wait for task `task_id` to end.
    pub async fn wait_for_end(
        &self,
        task_id: &str,
        timeout: Duration,
    ) -> Result<TaskStatus, ClientError> {
        self.wait_until(
            timeout,
            |_| {},
            |t| t.task_id == task_id && t.status != TaskState::Running,
        )
        .await
    }

    pub async fn cancel(&self) -> Result<Option<TaskStatus>, ClientError> {
        match self.call(Method::POST, CANCEL_URI, None).await {
            Ok(v) => parse(v).map(Some),
            Err(ClientError::Api { status, .. }) if status == StatusCode::NOT_FOUND => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn health(&self) -> Result<Value, ClientError> {
        self.health_query("").await
    }

    /// Wait (server-side, up to `secs`) until the node holds no session;
    /// returns its health document (`session` is null when idle).
    pub async fn wait_idle(&self, secs: f64) -> Result<Value, ClientError> {
        self.health_query(&format!("?waitIdle={secs}")).await
    }

    async fn health_query(&self, query: &str) -> Result<Value, ClientError> {
        let path = format!("{HEALTH_URI}{query}");
        let (status, body) = self.request(Method::GET, &path, None, false).await?;
        if status.is_success() {
            Ok(body)
        } else {
            Err(ClientError::Api { status, body })
        }
    }
}

/// What to collect and where to upload it.
#[derive(Clone, Default)]
pub struct StartOptions {
    /// `all` or a comma list of node names.
    pub nodes: String,
    pub upload_host: Option<String>,
    pub customer: Option<String>,
    pub ticket: Option<String>,
    pub bypass_reachability_checks: bool,
    /// `encryptionPassword`: each node's zip is encrypted with it (a
    /// secret: `Debug` masks it).
    pub encryption_password: Option<String>,
    /// The time window (`since`, `until`): RFC 3339, or a duration
    /// before now (`2h`).
    pub since: Option<String>,
    pub until: Option<String>,
    /// `taskRegexp`: only the collector tasks whose names match.
    pub task_regexp: Option<String>,
}

impl std::fmt::Debug for StartOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StartOptions")
            .field("nodes", &self.nodes)
            .field("upload_host", &self.upload_host)
            .field("customer", &self.customer)
            .field("ticket", &self.ticket)
            .field(
                "bypass_reachability_checks",
                &self.bypass_reachability_checks,
            )
            .field(
                "encryption_password",
                &self.encryption_password.as_ref().map(|_| "<secret>"),
            )
            .finish_non_exhaustive()
    }
}

impl StartOptions {
    pub fn nodes(nodes: &str) -> StartOptions {
        StartOptions {
            nodes: nodes.to_string(),
            ..Default::default()
        }
    }
}

/// One Server-Sent Event.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<u64>,
    pub data: String,
}

/// A task change the client does not hold the task for.
#[derive(Debug)]
pub struct Unknown;

impl SseEvent {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or(Value::Null)
    }

    /// Apply this event to the task as last known.
    pub fn apply(&self, task: &mut Option<TaskStatus>) -> Result<(), Unknown> {
        let data = self.json();
        match self.event.as_str() {
            "snapshot" => *task = serde_json::from_value(data["task"].clone()).ok(),
            "started" => *task = serde_json::from_value(data["task"].clone()).ok(),
            "change" => {
                let Some(t) = task
                    .as_mut()
                    .filter(|t| data["taskId"] == t.task_id.as_str())
                else {
                    return Err(Unknown);
                };
                if let Ok(status) = serde_json::from_value(data["status"].clone()) {
                    t.status = status;
                }
                t.progress = data["progress"].as_u64().unwrap_or(0) as u32;
                t.version = data["version"].as_u64().unwrap_or(t.version);
                if let Some(nodes) = data["nodes"].as_object() {
                    for (node, status) in nodes {
                        if let Ok(status) = serde_json::from_value(status.clone()) {
                            t.per_node.insert(node.clone(), status);
                        }
                    }
                }
                if t.status != TaskState::Running {
                    t.recommended_refresh_period = None;
                    t.cancel_uri = None;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

type ByteStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>;

/// The events of `GET /collectLogs/events`, parsed.
pub struct EventStream {
    url: String,
    body: ByteStream,
    buffer: Vec<u8>,
}

impl EventStream {
    /// The next event; `None` when the server ends the stream.
    pub async fn next(&mut self) -> Option<Result<SseEvent, ClientError>> {
        use futures::StreamExt;
        loop {
            if let Some(end) = find_blank_line(&self.buffer) {
                let block: Vec<u8> = self.buffer.drain(..end.1).collect();
                let text = String::from_utf8_lossy(&block[..end.0]).replace("\r\n", "\n");
                let mut event = SseEvent {
                    event: "message".into(),
                    id: None,
                    data: String::new(),
                };
                let mut data = Vec::new();
                for line in text.lines() {
                    let (field, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    match field {
                        "event" => event.event = value.to_string(),
                        "id" => event.id = value.parse().ok(),
                        "data" => data.push(value),
                        _ => {} // comments (keep-alives), retry
                    }
                }
                if data.is_empty() {
                    continue;
                }
                event.data = data.join("\n");
                return Some(Ok(event));
            }
            match self.body.next().await? {
                Ok(chunk) => self.buffer.extend_from_slice(&chunk),
                Err(e) => {
                    return Some(Err(ClientError::Transport {
                        url: self.url.clone(),
                        message: error_chain(&e),
                    }));
                }
            }
        }
    }
}

/// Where the first event block ends: (end of its text, end of its blank line).
fn find_blank_line(buffer: &[u8]) -> Option<(usize, usize)> {
    let lf = buffer
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|i| (i, i + 2));
    let crlf = buffer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, i + 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 < b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

pub enum RequestBody {
    Form(Vec<(String, String)>),
    Json(Value),
}

fn parse(v: Value) -> Result<TaskStatus, ClientError> {
    serde_json::from_value(v.clone()).map_err(|e| ClientError::Api {
        status: StatusCode::OK,
        body: Value::String(format!("unexpected answer ({e}): {v}")),
    })
}

/// An error with its causes (`a: b: c`): reqwest's own message omits them.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message = format!("{message}: {s}");
        source = s.source();
    }
    message
}
