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

mod put;

use std::time::Duration;

use autocollect_sdk::{Error, Options, UploadReceipt, UploadRequest, Uploader};
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

impl Settings {
    fn from_options(options: &Options) -> Result<Self, Error> {
        options.check_known(&[
            "attempts",
            "initial-backoff-ms",
            "max-backoff-ms",
            "chunk-size",
            "connect-timeout-ms",
            "content-type",
        ])?;
        let ms = |key: &str, default: Duration| -> Result<Duration, Error> {
            Ok(options
                .parse(key, "milliseconds")?
                .map_or(default, Duration::from_millis))
        };
        let attempts = options
            .parse("attempts", "a whole number of attempts")?
            .unwrap_or(3);
        if attempts == 0 {
            return Err(Error::invalid_option("attempts", "must be at least 1"));
        }
        let chunk_size = options
            .parse("chunk-size", "a size in bytes")?
            .unwrap_or(256 << 10);
        if !(4 << 10..=1 << 20).contains(&chunk_size) {
            return Err(Error::invalid_option(
                "chunk-size",
                "must be between 4096 and 1048576 bytes",
            ));
        }
        Ok(Settings {
            attempts,
            initial_backoff: ms("initial-backoff-ms", Duration::from_secs(1))?,
            max_backoff: ms("max-backoff-ms", Duration::from_secs(30))?,
            chunk_size,
            connect_timeout: ms("connect-timeout-ms", Duration::from_secs(30))?,
            content_type: options
                .get("content-type")
                .unwrap_or("application/zip")
                .to_string(),
        })
    }
}

/// What the last failed attempt ended with, for the final report.
enum LastFailure {
    ServerError(Answer),
    Transport(String),
}

impl Uploader for HttpUploader {
    fn validate_options(options: &Options) -> Result<(), Error> {
        Settings::from_options(options).map(|_| ())
    }

    fn upload(request: UploadRequest) -> Result<UploadReceipt, Error> {
        let settings = Settings::from_options(&request.options())?;
        let target = Target::parse(&request.url).map_err(Error::Internal)?;
        let url = &request.url;
        let mut backoff = settings.initial_backoff;
        let mut last = LastFailure::Transport("no attempt made".into());

        for attempt in 1..=settings.attempts {
            match put::attempt(&settings, &target, &request) {
                Ok(answer) if (200..300).contains(&answer.status) => {
                    autocollect_sdk::info!(
                        "uploaded {} bytes to {url}: HTTP {} (attempt {attempt})",
                        answer.bytes_sent,
                        answer.status
                    );
                    return Ok(UploadReceipt {
                        url: url.clone(),
                        status: answer.status,
                        bytes_sent: answer.bytes_sent,
                        attempts: attempt,
                    });
                }
                Ok(answer) if answer.status >= 500 => {
                    autocollect_sdk::warn!(
                        "attempt {attempt}: {url} answered HTTP {}",
                        answer.status
                    );
                    last = LastFailure::ServerError(answer);
                }
                Ok(answer) => return Err(refused(answer)),
                Err(AttemptError::Denied) => {
                    return Err(Error::internal(format!(
                        "the host refused the request to {url}: HTTP-request-denied"
                    )));
                }
                Err(AttemptError::Transport(reason)) => {
                    autocollect_sdk::warn!("attempt {attempt}: {reason}");
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
            LastFailure::Transport(reason) => Error::internal(format!(
                "upload to {url} failed after {} attempts: {reason}",
                settings.attempts
            )),
        })
    }
}

/// The server answered and did not accept the upload: its status and what
/// it said.
fn refused(answer: Answer) -> Error {
    Error::failed(
        i32::from(answer.status),
        String::from_utf8_lossy(&answer.body_tail),
    )
}

autocollect_sdk::export_uploader!(HttpUploader);
