//! The contract's `plugin-error` as the SDK's error type, and what converts
//! into it.

use std::fmt::Display;

use crate::collector::autocollect::plugin::archive::ArchiveError;
use crate::collector::autocollect::plugin::exec::ExecError;
use crate::collector::autocollect::plugin::types::{Failure, OptionError};

/// Why a plugin call did not succeed: the contract's `plugin-error`
/// (`InvalidOption`, `Failed`, `Internal`), the same type in both worlds.
///
/// What the operator sees: `invalid option "KEY": MESSAGE`; the failure's
/// status code and output (`collectionStatusCode`/`collectionOutput`, or
/// `uploadStatusCode`/`uploadOutput`); `plugin error: MESSAGE`.
pub type Error = crate::collector::autocollect::plugin::types::PluginError;

impl Error {
    /// An option is missing, unknown or malformed.
    pub fn invalid_option(key: impl Into<String>, message: impl Into<String>) -> Error {
        Error::InvalidOption(OptionError {
            key: key.into(),
            message: message.into(),
        })
    }

    /// The work ran and failed the way the wrapped tool reports failure:
    /// its status code (an exit status, an HTTP status) and output.
    pub fn failed(status_code: i32, output: impl Into<String>) -> Error {
        Error::Failed(Failure {
            status_code,
            output: output.into(),
        })
    }

    /// Anything else, with a message for the operator.
    pub fn internal(message: impl Into<String>) -> Error {
        Error::Internal(message.into())
    }
}

/// `internal`, with the I/O error's message. Use [`Context`] to say what
/// was being done.
impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error::Internal(e.to_string())
    }
}

/// `internal`: `archive: denied: ...` and so on.
impl From<ArchiveError> for Error {
    fn from(e: ArchiveError) -> Error {
        let (what, message) = match e {
            ArchiveError::InvalidName(m) => ("invalid name", m),
            ArchiveError::Denied(m) => ("denied", m),
            ArchiveError::Unsupported(m) => ("unsupported", m),
            ArchiveError::Failed(m) => ("failed", m),
        };
        Error::Internal(format!("archive: {what}: {message}"))
    }
}

/// `internal`: `exec denied: ...` for a program the operator did not
/// allow, the reason for one that could not start.
impl From<ExecError> for Error {
    fn from(e: ExecError) -> Error {
        match e {
            ExecError::Denied(m) => Error::Internal(format!("exec denied: {m}")),
            ExecError::Failed(m) => Error::Internal(m),
        }
    }
}

/// Say what failed: `file.sync_all().context("syncing the file")?` gives
/// `internal("syncing the file: <the error>")`.
pub trait Context<T> {
    /// An `internal` error `"{what}: {error}"`.
    fn context(self, what: impl Display) -> Result<T, Error>;

    /// As [`Context::context`], the text made only on error.
    fn with_context<D: Display>(self, what: impl FnOnce() -> D) -> Result<T, Error>;
}

impl<T, E: Display> Context<T> for Result<T, E> {
    fn context(self, what: impl Display) -> Result<T, Error> {
        self.map_err(|e| Error::Internal(format!("{what}: {e}")))
    }

    fn with_context<D: Display>(self, what: impl FnOnce() -> D) -> Result<T, Error> {
        self.map_err(|e| Error::Internal(format!("{}: {e}", what())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        assert_eq!(Error::from(io), Error::internal("gone"));
        let r: Result<(), std::io::Error> = Err(std::io::Error::other("full"));
        assert_eq!(
            r.context("writing x"),
            Err(Error::internal("writing x: full"))
        );
        assert_eq!(
            Error::from(ArchiveError::Denied("logs/x".into())),
            Error::internal("archive: denied: logs/x")
        );
        assert_eq!(
            Error::from(ExecError::Denied("/bin/x".into())),
            Error::internal("exec denied: /bin/x")
        );
        assert_eq!(
            Error::failed(3, "out"),
            Error::Failed(Failure {
                status_code: 3,
                output: "out".into()
            })
        );
    }
}
