//! Library errors. Each variant names the file, field or tensor at fault so the binary can tell the
//! user what to fix.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },

    /// A config value we do not support, or that is inconsistent with the rest of the config.
    #[error("{path}: field `{field}`: {message}")]
    Config {
        path: PathBuf,
        field: String,
        message: String,
    },

    /// A weights file that cannot be used: wrong format, corrupt, missing or unexpected tensors.
    #[error("{path}: {message}")]
    Weights { path: PathBuf, message: String },

    #[error("{path}: {message}")]
    Image { path: PathBuf, message: String },

    /// A caller-supplied argument is out of range; `name` is the argument as the user knows it.
    #[error("invalid {name}: {message}")]
    Argument { name: String, message: String },

    /// The user asked to stop (Ctrl-C); nothing was written.
    #[error("interrupted")]
    Interrupted,

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn config(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Error::Config {
            path: path.into(),
            field: field.into(),
            message: message.into(),
        }
    }
    pub fn weights(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Weights {
            path: path.into(),
            message: message.into(),
        }
    }
    pub fn argument(name: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Argument {
            name: name.into(),
            message: message.into(),
        }
    }
}

/// Reads a JSON file into `T`, with the path in any error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.into(),
        source,
    })
}
