//! Atomic writes, the one way unitune writes what a user keeps: a file goes to a temporary file
//! beside its target, is flushed to disk and renamed into place ([`write_atomic`]); a folder is
//! filled as `DIR.tmp` and swapped in ([`replace_dir`]). Readers, and a run that crashed or was
//! interrupted, only ever see the old file or folder or the complete new one.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Writes `path` through `write`, which fills a temporary file in the same folder; the file is
/// then synced and renamed over `path`. On any error the temporary file is removed and `path` is
/// untouched.
pub fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().ok_or_else(|| {
        Error::argument("output", format!("{} is not a file path", path.display()))
    })?;
    let name = name.to_string_lossy();
    remove_stale_temps(&dir, &name);
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = write(&tmp)
        .and_then(|()| sync_file(&tmp))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Removes the temporary files `.NAME.PID.tmp` of `name` that a run of unitune killed between
/// writing and renaming them (SIGKILL, a power cut) left behind: those whose process is gone.
/// Only Linux can tell (`/proc`); elsewhere they are kept.
fn remove_stale_temps(dir: &Path, name: &str) {
    let prefix = format!(".{name}.");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let pid = file
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|rest| rest.strip_suffix(".tmp"))
            .and_then(|pid| pid.parse::<u32>().ok());
        let gone =
            |pid: u32| cfg!(target_os = "linux") && !Path::new(&format!("/proc/{pid}")).exists();
        if pid.is_some_and(gone) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Flushes a written file to disk, so that the rename never publishes a file whose data a power
/// cut could still lose.
fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// Replaces folder `dir` by one that `fill` writes, so that `dir` is always either the old folder
/// or the complete new one. `fill` writes into `DIR.tmp`; entries of the old folder that `fill`
/// did not write (a README, notes) are moved over; then `dir` becomes `DIR.old`, `DIR.tmp`
/// becomes `dir`, and `DIR.old` is removed. [`recover_replace`] finishes or undoes a swap that a
/// crash interrupted.
pub fn replace_dir(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    recover_replace(dir)?;
    let (tmp, old) = (sibling(dir, "tmp")?, sibling(dir, "old")?);
    if tmp.exists() {
        remove_dir(&tmp)?;
    }
    create_dir(&tmp)?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let entry = entry.map_err(|e| Error::io(dir, e))?;
            let target = tmp.join(entry.file_name());
            if !target.exists() {
                std::fs::rename(entry.path(), &target).map_err(|e| Error::io(entry.path(), e))?;
            }
        }
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(&tmp, e))?;
    if old.exists() {
        remove_dir(&old)?;
    }
    Ok(())
}

/// Cleans up after a [`replace_dir`] that did not finish. `DIR.old` only exists once `DIR.tmp`
/// is complete, so: `dir` missing with `DIR.old` present means the new folder is `DIR.tmp`;
/// otherwise `DIR.tmp` is a half-written folder and `DIR.old` a leftover.
pub fn recover_replace(dir: &Path) -> Result<()> {
    let (tmp, old) = (sibling(dir, "tmp")?, sibling(dir, "old")?);
    if !dir.exists() && old.exists() && tmp.exists() {
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(&tmp, e))?;
    }
    if !dir.exists() && old.exists() {
        std::fs::rename(&old, dir).map_err(|e| Error::io(&old, e))?;
    }
    for leftover in [tmp, old] {
        if leftover.exists() {
            remove_dir(&leftover)?;
        }
    }
    Ok(())
}

/// `DIR.<suffix>` next to `dir`.
fn sibling(dir: &Path, suffix: &str) -> Result<PathBuf> {
    let name = dir.file_name().ok_or_else(|| {
        Error::argument("output", format!("{} is not a folder name", dir.display()))
    })?;
    Ok(dir.with_file_name(format!("{}.{suffix}", name.to_string_lossy())))
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

fn remove_dir(dir: &Path) -> Result<()> {
    std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("unitune-atomic-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_killed_runs_temporary_file_is_removed_by_the_next_write() {
        let dir = tempdir("stale");
        create_dir(&dir).unwrap();
        // pid 0 is never a user process: its temporary file is a dead run's leftover.
        let stale = dir.join(".out.png.0.tmp");
        let foreign = dir.join(".other.png.0.tmp");
        std::fs::write(&stale, "half").unwrap();
        std::fs::write(&foreign, "half").unwrap();
        let path = dir.join("out.png");
        write_atomic(&path, |tmp| {
            std::fs::write(tmp, "whole").map_err(|e| Error::io(tmp, e))
        })
        .unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "whole");
        assert!(!stale.exists(), "the dead run's temporary file is left");
        assert!(
            foreign.exists(),
            "another file's temporary file was removed"
        );
    }

    #[test]
    fn replace_dir_swaps_whole_folders_and_keeps_foreign_files() {
        let dir = tempdir("swap");
        let write = |name: &'static str, text: &'static str| {
            move |d: &Path| -> Result<()> {
                std::fs::write(d.join(name), text).map_err(|e| Error::io(d, e))
            }
        };
        replace_dir(&dir, write("a.txt", "one")).unwrap();
        std::fs::write(dir.join("README.md"), "mine").unwrap();
        replace_dir(&dir, write("a.txt", "two")).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("a.txt")).unwrap(), "two");
        assert_eq!(
            std::fs::read_to_string(dir.join("README.md")).unwrap(),
            "mine"
        );
        // A failing fill leaves the old folder as it was.
        let err = replace_dir(&dir, |_| Err(Error::argument("x", "boom"))).unwrap_err();
        assert!(err.to_string().contains("boom"));
        assert_eq!(std::fs::read_to_string(dir.join("a.txt")).unwrap(), "two");
        assert!(!sibling(&dir, "tmp").unwrap().exists());

        // A crash between the two renames: dir gone, DIR.old and a complete DIR.tmp left.
        let (tmp, old) = (sibling(&dir, "tmp").unwrap(), sibling(&dir, "old").unwrap());
        std::fs::rename(&dir, &old).unwrap();
        create_dir(&tmp).unwrap();
        std::fs::write(tmp.join("a.txt"), "three").unwrap();
        recover_replace(&dir).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("a.txt")).unwrap(), "three");
        assert!(!old.exists() && !tmp.exists());
        // A crash while filling: DIR.tmp is dropped, dir kept.
        create_dir(&tmp).unwrap();
        recover_replace(&dir).unwrap();
        assert!(!tmp.exists());
        assert_eq!(std::fs::read_to_string(dir.join("a.txt")).unwrap(), "three");
    }
}
