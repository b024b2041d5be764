//! A minimal autocollect uploader plugin: one HTTP `PUT` of the artifact
//! to the URL the host gives, its body streamed from the file. Copy this
//! crate to start a new uploader; `plugins/sdk/README.md` is the quick
//! start, `plugins/README.md` explains the contract and the sandbox.
//! `http-uploader` is the complete one (retries, backoff, timeouts).
//!
//! Options (all optional):
//!
//! | key | meaning | default |
//! | --- | --- | --- |
//! | `content-type` | the request's `content-type` | `application/zip` |

use std::fs::File;
use std::io::Read;

use autocollect_sdk::http::outgoing_handler::handle;
use autocollect_sdk::http::types::{
    ErrorCode, Fields, Method, OutgoingBody, OutgoingRequest, Scheme,
};
use autocollect_sdk::{Context, Error, Options, UploadReceipt, UploadRequest, Uploader, progress};

/// Bytes read from the artifact at a time (never the whole artifact: it
/// can be larger than the plugin's memory cap).
const CHUNK: usize = 64 << 10;
/// Most bytes `blocking-write-and-flush` takes at once (a `wasi:io` rule).
const WRITE_MAX: usize = 4096;

struct TemplateUploader;

impl Uploader for TemplateUploader {
    /// Called once when the daemon starts: only check the options.
    fn validate_options(options: &Options) -> Result<(), Error> {
        options.check_known(&["content-type"])
    }

    /// Called once per node and task, in a fresh instance.
    fn upload(request: UploadRequest) -> Result<UploadReceipt, Error> {
        let options = request.options();
        options.check_known(&["content-type"])?;
        let content_type = options.get("content-type").unwrap_or("application/zip");

        // The host built and checked the URL; it refuses any request to
        // another scheme, host or port (`HTTP-request-denied`).
        let (scheme, rest) = request
            .url
            .split_once("://")
            .ok_or_else(|| Error::internal(format!("not an absolute URL: {}", request.url)))?;
        let scheme = match scheme {
            "https" => Scheme::Https,
            _ => Scheme::Http,
        };
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));

        let headers = Fields::from_list(&[
            ("content-type".into(), content_type.as_bytes().to_vec()),
            (
                "content-length".into(),
                request.artifact_size.to_string().into_bytes(),
            ),
        ])
        .map_err(|e| Error::internal(format!("bad request header: {e:?}")))?;
        let outgoing = OutgoingRequest::new(headers);
        let refused = |what: &str| Error::internal(format!("the host rejected the {what}"));
        outgoing
            .set_method(&Method::Put)
            .map_err(|_| refused("method"))?;
        outgoing
            .set_scheme(Some(&scheme))
            .map_err(|_| refused("scheme"))?;
        outgoing
            .set_authority(Some(authority))
            .map_err(|_| refused("authority"))?;
        outgoing
            .set_path_with_query(Some(if path.is_empty() { "/" } else { path }))
            .map_err(|_| refused("path"))?;
        let body = outgoing.body().map_err(|_| refused("body"))?;

        // The request goes out now; the body follows as it is written.
        let response = handle(outgoing, None).map_err(transport)?;
        let mut file = File::open(&request.artifact_path).context("opening the artifact")?;
        let mut sent = 0u64;
        {
            let stream = body.write().map_err(|_| refused("body stream"))?;
            let mut chunk = vec![0u8; CHUNK];
            loop {
                let n = file.read(&mut chunk).context("reading the artifact")?;
                if n == 0 {
                    break;
                }
                for piece in chunk[..n].chunks(WRITE_MAX) {
                    stream
                        .blocking_write_and_flush(piece)
                        .map_err(|e| Error::internal(format!("sending the artifact: {e:?}")))?;
                }
                sent += n as u64;
                // Uploaders report progress in bytes.
                progress(sent, request.artifact_size, "uploading");
            }
        } // The stream goes before the body is finished.
        OutgoingBody::finish(body, None).map_err(transport)?;

        response.subscribe().block();
        let answer = match response.get() {
            Some(Ok(Ok(answer))) => answer,
            Some(Ok(Err(code))) => return Err(transport(code)),
            _ => return Err(Error::internal("no response")),
        };
        let status = answer.status();
        if !(200..300).contains(&status) {
            // The server answered and said no: its status and body become
            // `uploadStatusCode` and `uploadOutput`.
            let mut text = Vec::new();
            if let Ok(body) = answer.consume()
                && let Ok(stream) = body.stream()
            {
                while let Ok(bytes) = stream.blocking_read(4096) {
                    text.extend_from_slice(&bytes);
                }
            }
            return Err(Error::failed(
                i32::from(status),
                String::from_utf8_lossy(&text),
            ));
        }
        autocollect_sdk::info!("uploaded {sent} bytes to {}: HTTP {status}", request.url);
        Ok(UploadReceipt {
            url: request.url.clone(),
            status,
            bytes_sent: sent,
            attempts: 1,
        })
    }
}

/// No answer (connection, TLS, a request the host refused): `internal`,
/// which the operator sees as `plugin error: ...`.
fn transport(code: ErrorCode) -> Error {
    Error::internal(format!("PUT failed: {code:?}"))
}

// Register `TemplateUploader` as the implementation of the `upload` export.
autocollect_sdk::export_uploader!(TemplateUploader);
