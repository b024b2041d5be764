//! autocollect's built-in uploader: sends the artifact with one HTTP PUT to
//! the URL the host gives it, as Couchbase's upload does.
//!
//! The body is streamed from the read-only artifact in chunks, so memory
//! does not grow with the artifact. Only a 2xx answer is success.
//! Connection errors and 5xx answers are retried with exponential backoff;
//! a 4xx answer is final (the server understood and said no), and so is a
//! request the host refused (the destination is the host's decision).
//!
//! Options (all optional):
//!
//! | key | meaning | default |
//! | --- | --- | --- |
//! | `attempts` | attempts in all, at least 1 | `3` |
//! | `initial-backoff-ms` | wait before the second attempt; doubles each time | `1000` |
//! | `max-backoff-ms` | longest wait between attempts | `30000` |
//! | `chunk-size` | bytes read and written at a time (4 KiB to 1 MiB) | `262144` |
//! | `connect-timeout-ms` | how long to wait for the connection | `30000` |
//! | `content-type` | the request's `content-type` | `application/zip` |

wit_bindgen::generate!({
    path: "../../wit",
    world: "uploader",
    generate_all,
});

mod put;

use std::time::Duration;

use autocollect::plugin::log::{Level, log};
use autocollect::plugin::types::{Failure, OptionError};
use exports::autocollect::plugin::upload::{
    Guest, Options, PluginError, UploadReceipt, UploadRequest,
};
use put::{Answer, AttemptError, Target};

/// Most of the response body kept for the failure output.
const ANSWER_TAIL_BYTES: usize = 64 << 10;

struct HttpUploader;

/// Parsed, validated options.
pub(crate) struct Settings {
    attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
    pub(crate) chunk_size: usize,
    pub(crate) connect_timeout: Duration,
    pub(crate) content_type: String,
}

fn invalid(key: &str, message: impl Into<String>) -> PluginError {
    PluginError::InvalidOption(OptionError {
        key: key.to_string(),
        message: message.into(),
    })
}

fn parse<T: std::str::FromStr>(key: &str, value: &str, what: &str) -> Result<T, PluginError> {
    value
        .trim()
        .parse()
        .map_err(|_| invalid(key, format!("must be {what}, got {value:?}")))
}

impl Settings {
    fn from_options(options: &Options) -> Result<Self, PluginError> {
        let mut s = Settings {
            attempts: 3,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            chunk_size: 256 << 10,
            connect_timeout: Duration::from_secs(30),
            content_type: "application/zip".into(),
        };
        let ms =
            |key: &str, value: &str| parse(key, value, "milliseconds").map(Duration::from_millis);
        for (key, value) in options {
            match key.as_str() {
                "attempts" => {
                    s.attempts = parse(key, value, "a whole number of attempts")?;
                    if s.attempts == 0 {
                        return Err(invalid(key, "must be at least 1"));
                    }
                }
                "initial-backoff-ms" => s.initial_backoff = ms(key, value)?,
                "max-backoff-ms" => s.max_backoff = ms(key, value)?,
                "connect-timeout-ms" => s.connect_timeout = ms(key, value)?,
                "chunk-size" => {
                    s.chunk_size = parse(key, value, "a size in bytes")?;
                    if !(4 << 10..=1 << 20).contains(&s.chunk_size) {
                        return Err(invalid(key, "must be between 4096 and 1048576 bytes"));
                    }
                }
                "content-type" => s.content_type = value.clone(),
                other => {
                    return Err(invalid(
                        other,
                        "unknown option (known: attempts, initial-backoff-ms, max-backoff-ms, \
                         chunk-size, connect-timeout-ms, content-type)",
                    ));
                }
            }
        }
        Ok(s)
    }
}

/// What the last failed attempt ended with, for the final report.
enum LastFailure {
    ServerError(Answer),
    Transport(String),
}

impl Guest for HttpUploader {
    fn validate_options(options: Options) -> Result<(), PluginError> {
        Settings::from_options(&options).map(|_| ())
    }

    fn upload(request: UploadRequest) -> Result<UploadReceipt, PluginError> {
        let settings = Settings::from_options(&request.options)?;
        let target = Target::parse(&request.url).map_err(PluginError::Internal)?;
        let url = &request.url;
        let mut backoff = settings.initial_backoff;
        let mut last = LastFailure::Transport("no attempt made".into());

        for attempt in 1..=settings.attempts {
            match put::attempt(&settings, &target, &request) {
                Ok(answer) if (200..300).contains(&answer.status) => {
                    log(
                        Level::Info,
                        &format!(
                            "uploaded {} bytes to {url}: HTTP {} (attempt {attempt})",
                            answer.bytes_sent, answer.status
                        ),
                    );
                    return Ok(UploadReceipt {
                        url: url.clone(),
                        status: answer.status,
                        bytes_sent: answer.bytes_sent,
                        attempts: attempt,
                    });
                }
                Ok(answer) if answer.status >= 500 => {
                    log(
                        Level::Warn,
                        &format!("attempt {attempt}: {url} answered HTTP {}", answer.status),
                    );
                    last = LastFailure::ServerError(answer);
                }
                Ok(answer) => return Err(refused(answer)),
                Err(AttemptError::Denied) => {
                    return Err(PluginError::Internal(format!(
                        "the host refused the request to {url}: HTTP-request-denied"
                    )));
                }
                Err(AttemptError::Transport(reason)) => {
                    log(Level::Warn, &format!("attempt {attempt}: {reason}"));
                    last = LastFailure::Transport(reason);
                }
            }
            if attempt < settings.attempts {
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(settings.max_backoff);
            }
        }

        Err(match last {
            LastFailure::ServerError(answer) => refused(answer),
            LastFailure::Transport(reason) => PluginError::Internal(format!(
                "upload to {url} failed after {} attempts: {reason}",
                settings.attempts
            )),
        })
    }
}

/// The server answered and did not accept the upload: its status and what
/// it said.
fn refused(answer: Answer) -> PluginError {
    PluginError::Failed(Failure {
        status_code: i32::from(answer.status),
        output: String::from_utf8_lossy(&answer.body_tail).into_owned(),
    })
}

export!(HttpUploader);
