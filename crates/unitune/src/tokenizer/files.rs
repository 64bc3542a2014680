//! Reading a diffusers `tokenizer/` folder's files: `vocab.json`, `merges.txt` and the special
//! tokens of `tokenizer_config.json` / `special_tokens_map.json`, resolved the way transformers 5
//! does it. The files are parsed from memory (read from a folder, or made by [`super::embedded`]);
//! errors name the file they would have in their folder.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::parse_json;
use crate::{Error, Result};

/// A merge rule: the pair of token ids it joins, and (rank, id of the joined token).
pub(super) type Merges = HashMap<(u32, u32), (u32, u32)>;

/// The named special tokens transformers knows, in the order it registers them with the backend:
/// when two share a content, the later one decides whether that content is matched before or
/// after normalization.
const SPECIAL_KEYS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// CLIP's context length; used when `tokenizer_config.json` does not give `model_max_length`.
const DEFAULT_MAX_LENGTH: usize = 77;
/// Every prompt is padded to `model_max_length`: far beyond any text encoder's context (CLIP's
/// is 77) it is a broken config, and padding to it would exhaust memory.
const MAX_MAX_LENGTH: usize = 1 << 16;

/// A token matched as a whole in the prompt before BPE (transformers' `AddedToken`).
#[derive(Debug, Clone)]
struct AddedToken {
    content: String,
    /// Matched in the normalized (NFC, lowercased) text rather than in the raw prompt; when not
    /// given, `tokenizers` takes `!special` at the time of matching.
    normalized: Option<bool>,
    special: bool,
}

impl AddedToken {
    fn is_normalized(&self) -> bool {
        self.normalized.unwrap_or(!self.special)
    }
}

/// What the JSON configs say about special tokens, checked against the vocabulary.
pub(super) struct SpecialTokens {
    pub bos_id: u32,
    pub eos_id: u32,
    pub pad_id: u32,
    pub max_length: usize,
    /// Whole tokens matched in the raw prompt, with their ids.
    pub raw: Vec<(String, u32)>,
    /// Whole tokens matched after normalization, with their ids.
    pub normalized: Vec<(String, u32)>,
}

pub(super) fn parse_vocab(path: &Path, text: &str) -> Result<HashMap<String, u32>> {
    parse_json(path, text)
}

/// Parses `merges.txt` as the `tokenizers` crate does: lines starting with `#version` are skipped,
/// every other line is `left right` separated by one space; a merge's rank is its position.
pub(super) fn parse_merges(
    path: &Path,
    text: &str,
    vocab: &HashMap<String, u32>,
) -> Result<Merges> {
    let mut merges = Merges::new();
    let mut rank = 0u32;
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("#version") {
            continue;
        }
        let bad = |message: String| Error::weights(path, format!("line {}: {message}", i + 1));
        let (left, right) = match line.split(' ').collect::<Vec<_>>()[..] {
            [left, right] if !left.is_empty() && !right.is_empty() => (left, right),
            _ => {
                return Err(bad(format!(
                    "expected two symbols separated by one space, found {line:?}"
                )))
            }
        };
        let id = |token: &str| {
            vocab
                .get(token)
                .copied()
                .ok_or_else(|| bad(format!("`{token}` is not in vocab.json")))
        };
        // A later duplicate overrides the earlier rank, as in `tokenizers`.
        merges.insert(
            (id(left)?, id(right)?),
            (rank, id(&format!("{left}{right}"))?),
        );
        rank += 1;
    }
    Ok(merges)
}

/// Resolves the special tokens and `model_max_length` from the two optional JSON files of `dir`
/// (`config` is `tokenizer_config.json`'s text, `map` is `special_tokens_map.json`'s).
///
/// transformers reads `tokenizer_config.json`; without an `added_tokens_decoder` there, each
/// token given in `special_tokens_map.json` overrides the config's. A special token written as a
/// plain string is matched in the raw prompt; a `{"content": ..}` object may say `normalized`.
pub(super) fn parse_special_tokens(
    dir: &Path,
    config: Option<&str>,
    map: Option<&str>,
    vocab: &HashMap<String, u32>,
) -> Result<SpecialTokens> {
    let config_path = dir.join("tokenizer_config.json");
    let map_path = dir.join("special_tokens_map.json");
    let map_text = map;
    let config = parse_optional_object(&config_path, config)?;
    let decoder = match config.get("added_tokens_decoder") {
        None => None,
        Some(Value::Object(entries)) => Some(entries),
        Some(_) => {
            return Err(Error::config(
                &config_path,
                "added_tokens_decoder",
                "expected an object",
            ))
        }
    };
    let map = match decoder {
        Some(_) => Map::new(),
        None => parse_optional_object(&map_path, map_text)?,
    };

    // Every added token by content; named special tokens registered last override flags.
    let mut added: Vec<AddedToken> = Vec::new();
    for (id, entry) in decoder.into_iter().flatten() {
        let field = format!("added_tokens_decoder.{id}");
        let mut token = parse_token(entry).ok_or_else(|| bad_token(&config_path, &field))?;
        token.special = entry
            .get("special")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        register(&mut added, token);
    }
    let decoded = added.clone();

    let mut ids = HashMap::new();
    for key in SPECIAL_KEYS {
        let given = [(&map, &map_path), (&config, &config_path)]
            .into_iter()
            .find_map(|(json, path)| json.get(key).filter(|v| !v.is_null()).map(|v| (v, path)));
        let (mut token, path) = match given {
            Some((value, path)) => (
                parse_token(value).ok_or_else(|| bad_token(path, key))?,
                path,
            ),
            None => match clip_default(key) {
                Some(content) => (
                    AddedToken {
                        content: content.into(),
                        normalized: None,
                        special: true,
                    },
                    &config_path,
                ),
                None => continue,
            },
        };
        // With an `added_tokens_decoder`, the names only point at its entries.
        if let Some(entry) = decoded.iter().find(|t| t.content == token.content) {
            token.normalized = entry.normalized;
        }
        token.special = true;
        let id = vocab.get(&token.content).copied().ok_or_else(|| {
            Error::config(
                path,
                key,
                format!("`{}` is not in vocab.json", token.content),
            )
        })?;
        ids.insert(key, id);
        register(&mut added, token);
    }

    let (mut raw, mut normalized) = (Vec::new(), Vec::new());
    for token in added {
        let id = vocab.get(&token.content).copied().ok_or_else(|| {
            Error::config(
                &config_path,
                "added_tokens_decoder",
                format!("`{}` is not in vocab.json", token.content),
            )
        })?;
        let list = if token.is_normalized() {
            &mut normalized
        } else {
            &mut raw
        };
        list.push((token.content, id));
    }
    let max_length = read_max_length(&config_path, &config)?;
    // bos, eos and pad always have an id: given, or CLIP's default.
    Ok(SpecialTokens {
        bos_id: ids["bos_token"],
        eos_id: ids["eos_token"],
        pad_id: ids["pad_token"],
        max_length,
        raw,
        normalized,
    })
}

/// Adds `token`, or replaces the flags of an earlier token with the same content.
fn register(added: &mut Vec<AddedToken>, token: AddedToken) {
    match added.iter_mut().find(|t| t.content == token.content) {
        Some(t) => *t = token,
        None => added.push(token),
    }
}

/// CLIPTokenizer's defaults, for folders that leave a token out.
fn clip_default(key: &str) -> Option<&'static str> {
    match key {
        "bos_token" => Some("<|startoftext|>"),
        "eos_token" | "unk_token" | "pad_token" => Some("<|endoftext|>"),
        _ => None,
    }
}

/// A JSON object from a file that may be absent (`None`).
fn parse_optional_object(path: &Path, text: Option<&str>) -> Result<Map<String, Value>> {
    let Some(text) = text else {
        return Ok(Map::new());
    };
    match parse_json::<Value>(path, text)? {
        Value::Object(map) => Ok(map),
        _ => Err(Error::config(path, "(root)", "expected a JSON object")),
    }
}

/// A token written as a string, or as an object with `content` and optionally `normalized`.
fn parse_token(value: &Value) -> Option<AddedToken> {
    let (content, normalized) = match value {
        Value::String(s) => (s.clone(), None),
        Value::Object(o) => (
            o.get("content")?.as_str()?.to_string(),
            match o.get("normalized") {
                None | Some(Value::Null) => None,
                Some(v) => Some(v.as_bool()?),
            },
        ),
        _ => return None,
    };
    Some(AddedToken {
        content,
        normalized,
        special: false,
    })
}

fn bad_token(path: &Path, field: &str) -> Error {
    Error::config(
        path,
        field,
        "expected a string or an object with a string `content`",
    )
}

fn read_max_length(path: &Path, config: &Map<String, Value>) -> Result<usize> {
    let Some(value) = config.get("model_max_length") else {
        return Ok(DEFAULT_MAX_LENGTH);
    };
    // transformers writes a 1e30 sentinel when the length is unknown; that cannot be padded to.
    value
        .as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .filter(|&n| (2..=MAX_MAX_LENGTH).contains(&n))
        .ok_or_else(|| {
            Error::config(
                path,
                "model_max_length",
                format!("expected an integer in 2..={MAX_MAX_LENGTH}, found {value}"),
            )
        })
}
