//! The typed errors of flashattn. Every message names the bad field and its value.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// An invalid spec field: `field` is its name, `value` what was given, `reason` the rule.
    #[error("invalid {field} = {value}: {reason}")]
    InvalidSpec {
        field: &'static str,
        value: String,
        reason: String,
    },
    /// A bad argument that is not a spec field: a device pointer, a backend name, a path.
    #[error("invalid argument {argument} = {value}: {reason}")]
    InvalidArgument {
        argument: &'static str,
        value: String,
        reason: String,
    },
    /// A buffer whose length does not match the spec.
    #[error("{tensor} has {actual} elements but the spec needs {expected} ({shape})")]
    BufferLength {
        tensor: &'static str,
        expected: usize,
        actual: usize,
        shape: String,
    },
    /// A buffer of another dtype than the spec's.
    #[error("{tensor} is {actual} but the spec's dtype is {expected}")]
    DTypeMismatch {
        tensor: &'static str,
        expected: crate::DType,
        actual: crate::DType,
    },
    /// The backend cannot run this spec; the reason says why.
    #[error("backend {backend} does not support this problem: {reason}")]
    Unsupported {
        backend: &'static str,
        reason: String,
    },
    /// The backend is not usable on this machine.
    #[error("backend {backend} is unavailable: {reason}")]
    Unavailable {
        backend: &'static str,
        reason: String,
    },
    /// A failure inside a backend (driver, compiler, device).
    #[error("backend {backend} failed: {message}")]
    Backend {
        backend: &'static str,
        message: String,
    },
}

impl Error {
    pub fn invalid(field: &'static str, value: impl ToString, reason: impl Into<String>) -> Self {
        Error::InvalidSpec {
            field,
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    pub fn argument(
        argument: &'static str,
        value: impl ToString,
        reason: impl Into<String>,
    ) -> Self {
        Error::InvalidArgument {
            argument,
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    pub fn unsupported(backend: &'static str, reason: impl Into<String>) -> Self {
        Error::Unsupported {
            backend,
            reason: reason.into(),
        }
    }

    pub fn backend(backend: &'static str, message: impl ToString) -> Self {
        Error::Backend {
            backend,
            message: message.to_string(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
