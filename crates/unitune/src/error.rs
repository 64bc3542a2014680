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

/// The largest JSON or text file unitune reads (configs, vocabularies, merges, prompt files):
/// real ones are at most a few MB (CLIP's vocab.json is 1.5 MB), so anything larger is not what
/// it claims to be, and reading it whole could exhaust memory.
pub const MAX_TEXT_FILE_BYTES: u64 = 64 << 20;

/// Reads a JSON file into `T`, with the path in any error, and the field (e.g.
/// `block_out_channels[1]`) when a value has the wrong type.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    parse_json(path, &read_text(path, MAX_TEXT_FILE_BYTES)?)
}

/// [`read_json`] on text already read (or made in memory); `path` names it in errors.
pub fn parse_json<T: serde::de::DeserializeOwned>(path: &std::path::Path, text: &str) -> Result<T> {
    let mut json = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(&mut json).map_err(|err| json_error(path, err))
}

/// [`read_json`] on a JSON value (a config made in memory); `path` names it in errors.
pub fn from_json_value<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
    value: serde_json::Value,
) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|err| json_error(path, err))
}

/// A field's type error names the field; a syntax error is a plain JSON error.
fn json_error(path: &std::path::Path, err: serde_path_to_error::Error<serde_json::Error>) -> Error {
    let field = err.path().to_string();
    let source = err.into_inner();
    let typed = source.classify() == serde_json::error::Category::Data;
    if field == "." || !typed {
        Error::Json {
            path: path.into(),
            source,
        }
    } else {
        Error::config(path, field, source.to_string())
    }
}

/// Reads a UTF-8 text file of at most `limit` bytes; a larger one (or a device that never ends)
/// is an error naming the file, read no further than the limit.
pub fn read_text(path: &std::path::Path, limit: u64) -> Result<String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(Error::Io {
            path: path.into(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("larger than {} MB: not a file of this kind", limit >> 20),
            ),
        });
    }
    String::from_utf8(bytes).map_err(|e| {
        Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to()),
            ),
        )
    })
}
