//! One PUT attempt over `wasi:http`: the body streamed from the artifact
//! file, the answer's status and the tail of its body read back.

use std::fs::File;
use std::io::Read;

use crate::{ANSWER_TAIL_BYTES, Settings};
use autocollect_sdk::UploadRequest;
use autocollect_sdk::http::outgoing_handler::handle;
use autocollect_sdk::http::poll::Pollable;
use autocollect_sdk::http::streams::{OutputStream, StreamError};
use autocollect_sdk::http::types::{
    ErrorCode, Fields, FutureIncomingResponse, IncomingResponse, Method, OutgoingBody,
    OutgoingRequest, RequestOptions, Scheme,
};

/// "No limit" for a `wasi:http` timeout: longer than any run may last.
const NO_LIMIT: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// The destination URL split the way `wasi:http` takes it.
pub struct Target {
    scheme: Scheme,
    authority: String,
    path_with_query: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| format!("not an absolute URL: {url:?}"))?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "https" => Scheme::Https,
            "http" => Scheme::Http,
            other => return Err(format!("unsupported scheme {other:?} in {url:?}")),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, "/"),
        };
        if authority.is_empty() {
            return Err(format!("no host in {url:?}"));
        }
        Ok(Target {
            scheme,
            authority: authority.to_string(),
            path_with_query: path.to_string(),
        })
    }
}

/// The server's answer to one attempt.
pub struct Answer {
    pub status: u16,
    /// The last [`ANSWER_TAIL_BYTES`] of the response body.
    pub body_tail: Vec<u8>,
    /// Body bytes written before the answer.
    pub bytes_sent: u64,
}

pub enum AttemptError {
    /// The host refused the request: not worth retrying.
    Denied,
    /// No answer (connection, TLS, protocol), with the reason.
    Transport(String),
}

impl From<ErrorCode> for AttemptError {
    fn from(code: ErrorCode) -> Self {
        match code {
            ErrorCode::HttpRequestDenied => AttemptError::Denied,
            other => AttemptError::Transport(describe(&other)),
        }
    }
}

/// Send the artifact once.
pub fn attempt(
    settings: &Settings,
    target: &Target,
    request: &UploadRequest,
) -> Result<Answer, AttemptError> {
    let mut file = File::open(&request.artifact_path).map_err(|e| {
        AttemptError::Transport(format!("cannot read {}: {e}", request.artifact_path))
    })?;
    let size = request.artifact_size;

    let headers = Fields::from_list(&[
        (
            "content-type".into(),
            settings.content_type.clone().into_bytes(),
        ),
        ("content-length".into(), size.to_string().into_bytes()),
    ])
    .map_err(|e| AttemptError::Transport(format!("bad request header: {e:?}")))?;
    let outgoing = OutgoingRequest::new(headers);
    let refuse = |what: &str| AttemptError::Transport(format!("the host rejected the {what}"));
    outgoing
        .set_method(&Method::Put)
        .map_err(|_| refuse("method"))?;
    outgoing
        .set_scheme(Some(&target.scheme))
        .map_err(|_| refuse("scheme"))?;
    outgoing
        .set_authority(Some(&target.authority))
        .map_err(|_| refuse("authority"))?;
    outgoing
        .set_path_with_query(Some(&target.path_with_query))
        .map_err(|_| refuse("path"))?;
    let body = outgoing.body().map_err(|_| refuse("body"))?;

    let options = RequestOptions::new();
    let _ = options.set_connect_timeout(Some(settings.connect_timeout.as_nanos() as u64));
    // The answer comes after the whole body, which can take hours on a slow
    // link: no first-byte limit of our own (the host's deadline bounds the run).
    let _ = options.set_first_byte_timeout(Some(NO_LIMIT.as_nanos() as u64));
    // The request goes out now; the body follows as we write it.
    let response = handle(outgoing, Some(options))?;

    let stream = BodyStream::open(&body).map_err(|_| refuse("body stream"))?;
    let sent = stream.send_file(&mut file, size, settings.chunk_size);
    drop(stream);
    let sent = match sent {
        Ok(sent) => {
            OutgoingBody::finish(body, None)?;
            sent
        }
        // The server may have answered early (and closed): prefer its
        // answer, unless it says yes to a body it did not get in full
        // (all of it written, only the last flush failed, is in full).
        Err((written, reason)) => {
            drop(body);
            return match wait(&response) {
                Ok(answered) if written < size && (200..300).contains(&answered.status()) => {
                    Err(AttemptError::Transport(format!(
                        "the host answered {} after {written} of {size} bytes ({reason})",
                        answered.status()
                    )))
                }
                Ok(answered) => read_answer(answered, written),
                Err(AttemptError::Transport(code)) => Err(AttemptError::Transport(format!(
                    "{code} (while sending the body: {reason})"
                ))),
                Err(e) => Err(e),
            };
        }
    };
    let answered = wait(&response)?;
    read_answer(answered, sent)
}

/// Wait for the response to a request whose body is done.
fn wait(response: &FutureIncomingResponse) -> Result<IncomingResponse, AttemptError> {
    response.subscribe().block();
    match response.get() {
        Some(Ok(Ok(answered))) => Ok(answered),
        Some(Ok(Err(code))) => Err(code.into()),
        Some(Err(())) | None => Err(AttemptError::Transport(
            "the response was not available".into(),
        )),
    }
}

/// The status and the tail of the body of an answer.
fn read_answer(answered: IncomingResponse, bytes_sent: u64) -> Result<Answer, AttemptError> {
    let status = answered.status();
    let mut body_tail = Vec::new();
    // (The stream is dropped before the body it belongs to.)
    if let Ok(body) = answered.consume()
        && let Ok(stream) = body.stream()
    {
        while let Ok(bytes) = stream.blocking_read(ANSWER_TAIL_BYTES as u64) {
            body_tail.extend_from_slice(&bytes);
            let excess = body_tail.len().saturating_sub(ANSWER_TAIL_BYTES);
            body_tail.drain(..excess);
        }
    }
    Ok(Answer {
        status,
        body_tail,
        bytes_sent,
    })
}

/// The request body's output stream and its readiness pollable (dropped
/// first: a pollable must go before the stream it watches).
struct BodyStream {
    ready: Pollable,
    stream: OutputStream,
}

impl BodyStream {
    fn open(body: &OutgoingBody) -> Result<BodyStream, ()> {
        let stream = body.write()?;
        Ok(BodyStream {
            ready: stream.subscribe(),
            stream,
        })
    }

    /// Copy `size` bytes of `file` into the body, reporting progress; on
    /// failure, how many bytes were written and why.
    fn send_file(
        &self,
        file: &mut File,
        size: u64,
        chunk_size: usize,
    ) -> Result<u64, (u64, String)> {
        let mut chunk = vec![0u8; chunk_size];
        let mut sent = 0u64;
        loop {
            // Fill the chunk: one file read returns at most 64 KiB in WASI,
            // and each body write and progress report has a cost of its own.
            let n =
                fill(file, &mut chunk).map_err(|e| (sent, format!("reading the artifact: {e}")))?;
            if n == 0 {
                break;
            }
            self.write_all(&chunk[..n])
                .map_err(|e| (sent, stream_error(e)))?;
            sent += n as u64;
            autocollect_sdk::progress(sent, size, "uploading");
        }
        if sent != size {
            return Err((
                0,
                format!(
                    "the artifact changed size while being sent ({sent} bytes, expected {size})"
                ),
            ));
        }
        self.stream
            .blocking_flush()
            .map_err(|e| (sent, stream_error(e)))?;
        Ok(sent)
    }

    fn write_all(&self, mut data: &[u8]) -> Result<(), StreamError> {
        while !data.is_empty() {
            let permitted = self.stream.check_write()?;
            if permitted == 0 {
                self.ready.block();
                continue;
            }
            let n = data.len().min(permitted as usize);
            self.stream.write(&data[..n])?;
            data = &data[n..];
        }
        Ok(())
    }
}

/// Read into `buf` until it is full or the file ends; the bytes read.
fn fill(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn stream_error(e: StreamError) -> String {
    match e {
        StreamError::Closed => "the connection was closed".into(),
        StreamError::LastOperationFailed(error) => {
            match autocollect_sdk::http::types::http_error_code(&error) {
                Some(code) => describe(&code),
                None => error.to_debug_string(),
            }
        }
    }
}

/// A person-readable reason for a transport failure.
fn describe(code: &ErrorCode) -> String {
    match code {
        ErrorCode::DnsTimeout => "DNS lookup timed out".into(),
        ErrorCode::DnsError(e) => format!(
            "DNS lookup failed{}",
            e.rcode
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        ),
        ErrorCode::DestinationNotFound => "host not found".into(),
        ErrorCode::DestinationUnavailable => "host unavailable".into(),
        ErrorCode::DestinationIpUnroutable => "host unreachable".into(),
        ErrorCode::ConnectionRefused => "connection refused".into(),
        ErrorCode::ConnectionTerminated => "connection terminated".into(),
        ErrorCode::ConnectionTimeout => "connection timed out".into(),
        ErrorCode::ConnectionReadTimeout => "connection read timed out".into(),
        ErrorCode::ConnectionWriteTimeout => "connection write timed out".into(),
        ErrorCode::TlsProtocolError => "TLS protocol error".into(),
        ErrorCode::TlsCertificateError => "TLS certificate error".into(),
        ErrorCode::TlsAlertReceived(alert) => format!(
            "TLS alert received{}",
            alert
                .alert_message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        ),
        ErrorCode::InternalError(Some(message)) => message.clone(),
        other => format!("{other:?}"),
    }
}
