//! The built-in model (`models/shapes-64`, trained by `unitune pretrain`), embedded in the binary
//! and used when no `--model` is given. It is unpacked once into the user's cache folder, keyed by
//! a hash of its contents, through a temporary folder and a rename so that an interrupted unpack
//! is never mistaken for a complete one.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/builtin_model.rs"));
}

/// The folder of `model`, or of the built-in model (unpacked) when it is `None`.
pub fn model_dir(model: Option<&Path>) -> Result<PathBuf> {
    match model {
        Some(dir) => Ok(dir.to_path_buf()),
        None => unpack(),
    }
}

fn unpack() -> Result<PathBuf> {
    if embedded::FILES.is_empty() {
        bail!("this build has no built-in model (models/shapes-64 was missing at build time): pass --model DIR");
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    embedded::FILES.hash(&mut hasher);
    let cache = cache_root().join(format!("shapes-64-{:016x}", hasher.finish()));
    if cache.is_dir() {
        return Ok(cache);
    }
    let tmp = cache.with_extension(format!("tmp{}", std::process::id()));
    for (rel, bytes) in embedded::FILES {
        let path = tmp.join(rel);
        std::fs::create_dir_all(path.parent().expect("file in a folder"))
            .and_then(|()| std::fs::write(&path, bytes))
            .with_context(|| format!("unpacking the built-in model to {}", path.display()))?;
    }
    if std::fs::rename(&tmp, &cache).is_err() {
        // Another process unpacked it first; ours is redundant.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    Ok(cache)
}

/// `$XDG_CACHE_HOME/unitune`, `~/.cache/unitune`, or the temp folder.
fn cache_root() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("unitune")
}
