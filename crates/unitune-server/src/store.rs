//! What the server keeps on disk, under `--data`:
//!
//! ```text
//! sessions/<id>/meta.json            SessionMeta: written last, so a session exists once it is whole
//! sessions/<id>/session.safetensors  the tuned session (unitune's session file)
//! sessions/<id>/source.png           the picture as the tune saw it
//! sessions/<id>/edits/<id>/meta.json EditMeta: the settings, and each finished image
//! sessions/<id>/edits/<id>/<n>.png   the images, sheet-<n>.png the contact sheets
//! ```
//!
//! Every file is written atomically (`unitune::atomic`). Opening the store finishes what a crash
//! interrupted: a session folder without `meta.json` (a tune that never finished) and leftover
//! temporary files are removed, and edits that were running are marked interrupted. Ids are made
//! here (16 hex digits) and checked on the way in, so no request can name a path of its own.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use image::RgbImage;
use rand::Rng;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use unitune::atomic::write_atomic;
use unitune::image_io::save_png;
use unitune::session::Session;
use unitune::train::tune::TuneSettings;
use unitune::{Error, Result};

use crate::params::EditParams;

/// A tuned session as the list shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionMeta {
    pub id: String,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// The uploaded file's name.
    pub name: String,
    pub token: String,
    pub width: u32,
    pub height: u32,
    pub settings: TuneSettings,
    /// The loss of every tune step.
    pub losses: Vec<f32>,
}

/// One image of an edit job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EditImage {
    /// What tells it apart from the job's other images (`-g8-t0.9`), empty for a single edit.
    pub suffix: String,
    pub prompt: String,
    pub seed: u64,
    pub guidance: f64,
    pub start: f64,
    pub file: String,
}

/// An edit job's record: its exact settings and what it made so far.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EditMeta {
    pub id: String,
    pub session: String,
    pub created: u64,
    /// `running`, `done`, `failed`, `cancelled`, or `interrupted` (the server stopped).
    pub status: String,
    pub params: EditParams,
    pub images: Vec<EditImage>,
    /// Contact sheets of sweeps.
    pub sheets: Vec<String>,
    pub error: Option<String>,
}

/// Where sessions and edits are kept: on this machine's disk ([`Store`]), or in NATS for a
/// service of many machines (`crate::nats::NatsStore`). The worker writes through it, the API
/// reads through it.
pub trait Records: Send + Sync {
    /// Every session, newest first.
    fn sessions(&self) -> Result<Vec<SessionMeta>>;
    fn session(&self, id: &str) -> Option<SessionMeta>;
    /// Writes a tuned session; its record goes last, so the session is listed only when whole.
    fn save_session(&self, meta: &SessionMeta, session: &Session) -> Result<()>;
    fn load_session(&self, id: &str) -> Result<Session>;
    /// The picture the session was tuned on, as PNG.
    fn source_png(&self, id: &str) -> Result<Vec<u8>>;
    /// Removes a session and its edits; false when there was none.
    fn delete_session(&self, id: &str) -> Result<bool>;
    /// The session's edits, newest first.
    fn edits(&self, session: &str) -> Result<Vec<EditMeta>>;
    fn edit(&self, session: &str, edit: &str) -> Option<EditMeta>;
    fn write_edit(&self, meta: &EditMeta) -> Result<()>;
    /// Saves an image of an edit as `file`.
    fn save_edit_image(&self, meta: &EditMeta, file: &str, image: &RgbImage) -> Result<()>;
    /// A file the edit's record lists, as PNG.
    fn edit_file(&self, meta: &EditMeta, file: &str) -> Result<Vec<u8>>;
    fn delete_edit(&self, session: &str, edit: &str) -> Result<bool>;
}

/// `image` as PNG bytes, in memory.
pub fn png_bytes(image: &RgbImage) -> Vec<u8> {
    let mut png = vec![];
    image
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .expect("PNG encoding into memory");
    png
}

/// Newest first, ties by id, as both stores list.
pub fn newest_first<T>(items: &mut [T], key: impl Fn(&T) -> (u64, &str)) {
    items.sort_by(|a, b| key(b).cmp(&key(a)));
}

pub struct Store {
    root: PathBuf,
}

/// A fresh id: 16 lowercase hex digits.
pub fn new_id() -> String {
    format!("{:016x}", rand::thread_rng().gen::<u64>())
}

/// Whether `id` could have come from [`new_id`]: nothing else reaches a path.
pub fn valid_id(id: &str) -> bool {
    id.len() == 16
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Store {
    /// Opens (creating) the store at `root` and cleans up after a crash.
    pub fn open(root: &Path) -> Result<Self> {
        let store = Self {
            root: root.to_path_buf(),
        };
        std::fs::create_dir_all(store.sessions_dir()).map_err(|e| Error::io(root, e))?;
        store.recover()?;
        Ok(store)
    }

    fn sessions_dir(&self) -> PathBuf {
        self.root.join("sessions")
    }

    fn session_dir(&self, id: &str) -> PathBuf {
        self.sessions_dir().join(id)
    }

    fn edit_dir(&self, session: &str, edit: &str) -> PathBuf {
        self.session_dir(session).join("edits").join(edit)
    }

    fn recover(&self) -> Result<()> {
        for dir in subdirs(&self.sessions_dir())? {
            if !dir.join("meta.json").is_file() {
                remove_dir(&dir)?;
                continue;
            }
            remove_temporaries(&dir)?;
            for edit in subdirs(&dir.join("edits"))? {
                remove_temporaries(&edit)?;
                let Ok(mut meta) = read_json::<EditMeta>(&edit.join("meta.json")) else {
                    remove_dir(&edit)?;
                    continue;
                };
                if meta.status == "running" {
                    meta.status = "interrupted".into();
                    self.write_edit(&meta)?;
                }
            }
        }
        Ok(())
    }

    fn session_path(&self, id: &str) -> PathBuf {
        self.session_dir(id).join("session.safetensors")
    }

    fn source_path(&self, id: &str) -> PathBuf {
        self.session_dir(id).join("source.png")
    }
}

impl Records for Store {
    fn sessions(&self) -> Result<Vec<SessionMeta>> {
        let mut all: Vec<SessionMeta> = subdirs(&self.sessions_dir())?
            .iter()
            .filter_map(|d| read_json(&d.join("meta.json")).ok())
            .collect();
        newest_first(&mut all, |m| (m.created, &m.id));
        Ok(all)
    }

    fn session(&self, id: &str) -> Option<SessionMeta> {
        valid_id(id)
            .then(|| read_json(&self.session_dir(id).join("meta.json")).ok())
            .flatten()
    }

    fn save_session(&self, meta: &SessionMeta, session: &Session) -> Result<()> {
        let dir = self.session_dir(&meta.id);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        session.save(
            &self.session_path(&meta.id),
            session.settings.delta_encoding,
        )?;
        save_png(&session.image, &self.source_path(&meta.id))?;
        write_json(&dir.join("meta.json"), meta)
    }

    fn load_session(&self, id: &str) -> Result<Session> {
        Session::load(&self.session_path(id))
    }

    fn source_png(&self, id: &str) -> Result<Vec<u8>> {
        let path = self.source_path(id);
        std::fs::read(&path).map_err(|e| Error::io(&path, e))
    }

    /// Renamed away first, so a half-removed session is never listed.
    fn delete_session(&self, id: &str) -> Result<bool> {
        if self.session(id).is_none() {
            return Ok(false);
        }
        let dir = self.session_dir(id);
        let gone = self.sessions_dir().join(format!(".deleted-{id}"));
        std::fs::rename(&dir, &gone).map_err(|e| Error::io(&dir, e))?;
        remove_dir(&gone)?;
        Ok(true)
    }

    fn edits(&self, session: &str) -> Result<Vec<EditMeta>> {
        let mut all: Vec<EditMeta> = subdirs(&self.session_dir(session).join("edits"))?
            .iter()
            .filter_map(|d| read_json(&d.join("meta.json")).ok())
            .collect();
        newest_first(&mut all, |m| (m.created, &m.id));
        Ok(all)
    }

    fn edit(&self, session: &str, edit: &str) -> Option<EditMeta> {
        (valid_id(session) && valid_id(edit))
            .then(|| read_json(&self.edit_dir(session, edit).join("meta.json")).ok())
            .flatten()
    }

    fn write_edit(&self, meta: &EditMeta) -> Result<()> {
        let dir = self.edit_dir(&meta.session, &meta.id);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        write_json(&dir.join("meta.json"), meta)
    }

    fn save_edit_image(&self, meta: &EditMeta, file: &str, image: &RgbImage) -> Result<()> {
        save_png(image, &self.edit_dir(&meta.session, &meta.id).join(file))
    }

    fn edit_file(&self, meta: &EditMeta, file: &str) -> Result<Vec<u8>> {
        let path = self.edit_dir(&meta.session, &meta.id).join(file);
        std::fs::read(&path).map_err(|e| Error::io(&path, e))
    }

    fn delete_edit(&self, session: &str, edit: &str) -> Result<bool> {
        if self.edit(session, edit).is_none() {
            return Ok(false);
        }
        remove_dir(&self.edit_dir(session, edit))?;
        Ok(true)
    }
}

fn subdirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut dirs = vec![];
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".deleted-") {
            remove_dir(&entry.path())?;
        } else if entry.path().is_dir() && valid_id(&name) {
            dirs.push(entry.path());
        }
    }
    Ok(dirs)
}

/// Removes the temporary files of writes a crash interrupted (`.name.pid.tmp`).
fn remove_temporaries(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if name.is_some_and(|n| n.starts_with('.') && n.ends_with(".tmp")) && path.is_file() {
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

fn remove_dir(dir: &Path) -> Result<()> {
    std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    unitune::error::read_json(path)
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_vec_pretty(value).expect("records serialize");
    write_atomic(path, |tmp| {
        std::fs::write(tmp, &text).map_err(|e| Error::io(path, e))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_hex_and_nothing_else_passes() {
        let id = new_id();
        assert!(valid_id(&id), "{id}");
        for bad in [
            "",
            "../../etc/passwd",
            "0123456789ABCDEF",
            "0123456789abcde",
            "0123456789abcdef0",
            "0123456789abcde/",
        ] {
            assert!(!valid_id(bad), "{bad}");
        }
    }

    #[test]
    fn opening_removes_what_a_crash_left() {
        let root = std::env::temp_dir().join(format!("unitune-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let half = root.join("sessions").join(new_id());
        std::fs::create_dir_all(&half).unwrap();
        std::fs::write(half.join("session.safetensors"), b"half").unwrap();
        let store = Store::open(&root).unwrap();
        assert!(!half.exists());
        assert!(store.sessions().unwrap().is_empty());
        assert!(store.session("../sessions").is_none());
    }
}
