//! Sessions and edits kept in NATS: records in the `unitune-records` bucket, files in the
//! `unitune-files` object store. Every front end and worker sees the same ones.

use std::path::Path;
use std::sync::Arc;

use futures_util::StreamExt;
use image::RgbImage;
use serde::de::DeserializeOwned;
use tokio::io::AsyncReadExt;
use unitune::session::Session;
use unitune::{Error, Result};

use super::Nats;
use crate::store::{newest_first, png_bytes, valid_id, EditMeta, Records, SessionMeta};

pub struct NatsStore {
    nats: Arc<Nats>,
}

fn session_key(id: &str) -> String {
    format!("session.{id}")
}

fn edit_key(session: &str, edit: &str) -> String {
    format!("edit.{session}.{edit}")
}

fn fail(what: &str, e: impl std::fmt::Display) -> Error {
    Error::io(Path::new(what), std::io::Error::other(e.to_string()))
}

impl NatsStore {
    pub fn new(nats: Arc<Nats>) -> Self {
        Self { nats }
    }

    pub async fn put_file(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let mut reader = bytes;
        self.nats
            .files
            .put(name, &mut reader)
            .await
            .map(|_| ())
            .map_err(|e| fail(name, e))
    }

    pub async fn get_file(&self, name: &str) -> Result<Vec<u8>> {
        let mut object = self.nats.files.get(name).await.map_err(|e| fail(name, e))?;
        let mut bytes = vec![];
        object
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| fail(name, e))?;
        Ok(bytes)
    }

    async fn read<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        let value = self.nats.records.get(key).await.ok()??;
        serde_json::from_slice(&value).ok()
    }

    async fn write<T: serde::Serialize>(&self, key: &str, value: &T) -> Result<()> {
        let bytes = serde_json::to_vec(value).expect("records serialize");
        self.nats
            .records
            .put(key, bytes.into())
            .await
            .map(|_| ())
            .map_err(|e| fail(key, e))
    }

    async fn keys(&self, prefix: &str) -> Result<Vec<String>> {
        let keys = match self.nats.records.keys().await {
            Ok(keys) => keys,
            Err(e) => return Err(fail(super::RECORDS_BUCKET, e)),
        };
        let keys: Vec<_> = keys.collect().await;
        Ok(keys
            .into_iter()
            .filter_map(|k| k.ok())
            .filter(|k| k.starts_with(prefix))
            .collect())
    }

    async fn all<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<T>> {
        let mut all = vec![];
        for key in self.keys(prefix).await? {
            all.extend(self.read(&key).await);
        }
        Ok(all)
    }

    /// Removes every file whose name starts with `prefix`.
    async fn delete_files(&self, prefix: &str) -> Result<()> {
        let mut list = self
            .nats
            .files
            .list()
            .await
            .map_err(|e| fail(super::FILES_BUCKET, e))?;
        let mut names = vec![];
        while let Some(info) = list.next().await {
            let info = info.map_err(|e| fail(super::FILES_BUCKET, e))?;
            if info.name.starts_with(prefix) {
                names.push(info.name);
            }
        }
        for name in names {
            self.nats
                .files
                .delete(&name)
                .await
                .map_err(|e| fail(&name, e))?;
        }
        Ok(())
    }
}

impl Records for NatsStore {
    fn sessions(&self) -> Result<Vec<SessionMeta>> {
        let mut all: Vec<SessionMeta> = self.nats.block(self.all("session."))?;
        newest_first(&mut all, |m| (m.created, &m.id));
        Ok(all)
    }

    fn session(&self, id: &str) -> Option<SessionMeta> {
        valid_id(id).then(|| self.nats.block(self.read(&session_key(id))))?
    }

    fn save_session(&self, meta: &SessionMeta, session: &Session) -> Result<()> {
        let file = format!("{}/session.safetensors", meta.id);
        let bytes = session.to_bytes(Path::new(&file), session.settings.delta_encoding)?;
        self.nats.block(async {
            self.put_file(&file, &bytes).await?;
            self.put_file(
                &format!("{}/source.png", meta.id),
                &png_bytes(&session.image),
            )
            .await?;
            self.write(&session_key(&meta.id), meta).await
        })
    }

    fn load_session(&self, id: &str) -> Result<Session> {
        let file = format!("{id}/session.safetensors");
        let bytes = self.nats.block(self.get_file(&file))?;
        Session::from_bytes(&bytes, Path::new(&file))
    }

    fn source_png(&self, id: &str) -> Result<Vec<u8>> {
        self.nats.block(self.get_file(&format!("{id}/source.png")))
    }

    /// The record goes first, so a half-removed session is never listed.
    fn delete_session(&self, id: &str) -> Result<bool> {
        if self.session(id).is_none() {
            return Ok(false);
        }
        self.nats.block(async {
            let key = session_key(id);
            (self.nats.records.purge(&key).await).map_err(|e| fail(&key, e))?;
            for key in self.keys(&format!("edit.{id}.")).await? {
                (self.nats.records.purge(&key).await).map_err(|e| fail(&key, e))?;
            }
            self.delete_files(&format!("{id}/")).await
        })?;
        Ok(true)
    }

    fn edits(&self, session: &str) -> Result<Vec<EditMeta>> {
        let mut all: Vec<EditMeta> = self.nats.block(self.all(&format!("edit.{session}.")))?;
        newest_first(&mut all, |m| (m.created, &m.id));
        Ok(all)
    }

    fn edit(&self, session: &str, edit: &str) -> Option<EditMeta> {
        (valid_id(session) && valid_id(edit))
            .then(|| self.nats.block(self.read(&edit_key(session, edit))))?
    }

    fn write_edit(&self, meta: &EditMeta) -> Result<()> {
        self.nats
            .block(self.write(&edit_key(&meta.session, &meta.id), meta))
    }

    fn save_edit_image(&self, meta: &EditMeta, file: &str, image: &RgbImage) -> Result<()> {
        let name = format!("{}/edits/{}/{file}", meta.session, meta.id);
        self.nats.block(self.put_file(&name, &png_bytes(image)))
    }

    fn edit_file(&self, meta: &EditMeta, file: &str) -> Result<Vec<u8>> {
        let name = format!("{}/edits/{}/{file}", meta.session, meta.id);
        self.nats.block(self.get_file(&name))
    }

    fn delete_edit(&self, session: &str, edit: &str) -> Result<bool> {
        if self.edit(session, edit).is_none() {
            return Ok(false);
        }
        self.nats.block(async {
            let key = edit_key(session, edit);
            (self.nats.records.purge(&key).await).map_err(|e| fail(&key, e))?;
            self.delete_files(&format!("{session}/edits/{edit}/")).await
        })?;
        Ok(true)
    }
}
