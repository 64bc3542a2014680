//! Models in the Hugging Face cache, offline: `--model stabilityai/stable-diffusion-2-1-base` is the
//! snapshot that diffusers' `from_pretrained` downloaded, found without any network.
//!
//! The cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`) keeps a repo
//! as `models--<owner>--<name>/`, with `refs/<branch>` holding a commit hash and
//! `snapshots/<commit>/` the files of that commit.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The folder or file `model` names: an existing path or a single-file checkpoint's name as it
/// is, else a Hugging Face repo id (`owner/name`) in the cache at `revision` (a branch or tag,
/// whose ref names the commit, or a commit hash; default `main`).
pub fn resolve_model(model: &str, revision: Option<&str>) -> Result<PathBuf> {
    let path = Path::new(model);
    if path.exists() || !is_repo_id(model) || super::single_file::is_single_file(path) {
        if revision.is_some() {
            return Err(Error::argument(
                "revision",
                format!("`{model}` is a path, not a Hugging Face repo id; --revision applies to repo ids"),
            ));
        }
        return Ok(path.to_path_buf());
    }
    let cache = hub_cache().ok_or_else(|| {
        Error::argument(
            "model",
            format!("`{model}` is not a folder, and there is no Hugging Face cache to look in (set HF_HOME)"),
        )
    })?;
    resolve_in(&cache, model, revision.unwrap_or("main"))
}

/// `owner/name` with the characters the Hub allows, and not a path that merely fails to exist.
fn is_repo_id(model: &str) -> bool {
    let mut parts = model.split('/');
    let (Some(owner), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let ok = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    ok(owner) && ok(name)
}

fn hub_cache() -> Option<PathBuf> {
    let var = |name| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("HF_HUB_CACHE")
        .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("huggingface/hub")))
        .or_else(|| var("HOME").map(|h| h.join(".cache/huggingface/hub")))
}

fn resolve_in(cache: &Path, repo: &str, revision: &str) -> Result<PathBuf> {
    let root = cache.join(format!("models--{}", repo.replace('/', "--")));
    let missing = |looked: &Path, what: &str| {
        Error::weights(
            looked,
            format!(
                "`{repo}` is no folder, and {what} of the repo `{repo}` is not in the Hugging Face cache; unitune never downloads. Get it with `huggingface-cli download {repo}` (or diffusers' `from_pretrained`), or pass a folder"
            ),
        )
    };
    if !root.is_dir() {
        return Err(missing(&root, "no snapshot"));
    }
    let is_commit = revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit());
    let commit = if is_commit {
        revision.to_string()
    } else {
        let reference = root.join("refs").join(revision);
        std::fs::read_to_string(&reference)
            .map_err(|_| missing(&reference, &format!("revision `{revision}`")))?
            .trim()
            .to_string()
    };
    let snapshot = root.join("snapshots").join(&commit);
    if !snapshot.is_dir() {
        return Err(missing(&snapshot, &format!("commit {commit}")));
    }
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_resolve_to_their_snapshot_and_misses_say_where_they_looked() {
        let cache = std::env::temp_dir().join(format!("unitune-hub-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&cache);
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let root = cache.join("models--owner--model-1.5");
        std::fs::create_dir_all(root.join("snapshots").join(commit)).unwrap();
        std::fs::create_dir_all(root.join("refs")).unwrap();
        std::fs::write(root.join("refs/main"), format!("{commit}\n")).unwrap();

        let snapshot = root.join("snapshots").join(commit);
        assert_eq!(
            resolve_in(&cache, "owner/model-1.5", "main").unwrap(),
            snapshot
        );
        assert_eq!(
            resolve_in(&cache, "owner/model-1.5", commit).unwrap(),
            snapshot
        );
        let err = resolve_in(&cache, "owner/model-1.5", "fp16")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("refs/fp16") && err.contains("huggingface-cli download owner/model-1.5"),
            "{err}"
        );
        let err = resolve_in(&cache, "other/model", "main")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("models--other--model") && err.contains("no folder"),
            "{err}"
        );

        assert!(is_repo_id("stabilityai/stable-diffusion-2-1-base"));
        for not in [
            "./a/b",
            "/abs/path",
            "a/b/c",
            "sd15",
            "a/../b",
            "../b",
            "a/.b",
        ] {
            assert!(!is_repo_id(not), "{not}");
        }
        // An existing folder is taken as it is, even when it looks like a repo id, and so is a
        // single file's name, there or not (a missing one is then a missing file).
        let here = cache.join("owner/name");
        std::fs::create_dir_all(&here).unwrap();
        assert_eq!(resolve_model(here.to_str().unwrap(), None).unwrap(), here);
        assert!(resolve_model(here.to_str().unwrap(), Some("main")).is_err());
        let file = "models/sd15.safetensors";
        assert!(is_repo_id(file));
        assert_eq!(resolve_model(file, None).unwrap(), Path::new(file));
    }
}
