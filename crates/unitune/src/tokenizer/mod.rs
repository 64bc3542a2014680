//! CLIP's byte-level BPE tokenizer, giving the same ids as transformers' `CLIPTokenizer` called
//! the way diffusers' StableDiffusionPipeline calls it: `<|startoftext|>`, the prompt's tokens cut
//! to `model_max_length - 2`, `<|endoftext|>`, then the pad token up to `model_max_length`.
//!
//! Reads a diffusers `tokenizer/` folder, or the same files in memory ([`embedded`] makes CLIP's
//! for single-file checkpoints). SD 1.x pads with `<|endoftext|>`, SD 2.x with `!`; the folder's
//! special tokens are also cut out of the prompt whole, as transformers does.

mod bpe;
pub mod embedded;
mod files;
mod pretokenize;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::Path;

use bpe::{Bpe, END_OF_WORD};
use pretokenize::{split_added, PreTokenizer, Segment};

use crate::error::{read_text, MAX_TEXT_FILE_BYTES};
use crate::weights::export::TokenizerFiles;
use crate::{Error, Result};

/// The files a tokenizer is made of; the last two are optional.
const VOCAB: &str = "vocab.json";
const MERGES: &str = "merges.txt";
const CONFIG: &str = "tokenizer_config.json";
const SPECIAL_MAP: &str = "special_tokens_map.json";

/// A prompt's token ids, ready for the text encoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoding {
    /// bos, prompt tokens, eos, padding: always `max_length()` long.
    pub ids: Vec<u32>,
    /// The decoded text of the tokens cut off a prompt longer than `max_length() - 2` tokens.
    pub truncated: Option<String>,
}

pub struct ClipTokenizer {
    vocab: HashMap<String, u32>,
    id_to_token: HashMap<u32, String>,
    bpe: Bpe,
    pre: PreTokenizer,
    /// Special tokens cut out of the raw prompt, and those cut out after normalization.
    raw_added: Vec<(String, u32)>,
    normalized_added: Vec<(String, u32)>,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_length: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    /// The ids and sizes; the vocabulary itself is too long to print.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.vocab.len())
            .field("max_length", &self.max_length)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .finish_non_exhaustive()
    }
}

impl ClipTokenizer {
    /// Loads `vocab.json`, `merges.txt` and the special tokens and `model_max_length` (77 when
    /// absent) of `tokenizer_config.json` / `special_tokens_map.json` (both optional).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let mut files = Vec::new();
        for name in [VOCAB, MERGES, CONFIG, SPECIAL_MAP] {
            let path = dir.join(name);
            if [VOCAB, MERGES].contains(&name) || path.exists() {
                files.push((
                    name.into(),
                    read_text(&path, MAX_TEXT_FILE_BYTES)?.into_bytes(),
                ));
            }
        }
        Self::from_files(dir, &TokenizerFiles(files))
    }

    /// [`Self::from_dir`] on the folder's files in memory; errors name them as files of `dir`.
    pub fn from_files(dir: &Path, files: &TokenizerFiles) -> Result<Self> {
        let text = |name: &str| -> Result<Option<&str>> {
            let Some((_, bytes)) = files.0.iter().find(|(n, _)| n == name) else {
                return Ok(None);
            };
            std::str::from_utf8(bytes).map(Some).map_err(|e| {
                let source = std::io::Error::new(std::io::ErrorKind::InvalidData, e);
                Error::io(dir.join(name), source)
            })
        };
        let required = |name: &str| -> Result<&str> {
            text(name)?
                .ok_or_else(|| Error::io(dir.join(name), std::io::ErrorKind::NotFound.into()))
        };
        let vocab_path = dir.join(VOCAB);
        let vocab = files::parse_vocab(&vocab_path, required(VOCAB)?)?;
        let merges = files::parse_merges(&dir.join(MERGES), required(MERGES)?, &vocab)?;
        let special = files::parse_special_tokens(dir, text(CONFIG)?, text(SPECIAL_MAP)?, &vocab)?;
        let bpe = Bpe::new(merges, &vocab, &vocab_path)?;
        let id_to_token = vocab
            .iter()
            .map(|(token, &id)| (id, token.clone()))
            .collect();
        Ok(Self {
            vocab,
            id_to_token,
            bpe,
            pre: PreTokenizer::new(),
            raw_added: special.raw,
            normalized_added: special.normalized,
            bos_id: special.bos_id,
            eos_id: special.eos_id,
            pad_id: special.pad_id,
            max_length: special.max_length,
        })
    }

    /// bos, the prompt's tokens (at most `max_length() - 2`), eos, and padding to `max_length()`.
    pub fn encode(&self, prompt: &str) -> Encoding {
        let mut content = self.content_ids(prompt);
        let room = self.max_length - 2;
        let truncated = (content.len() > room).then(|| self.decode(&content[room..]));
        content.truncate(room);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend(content);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Encoding { ids, truncated }
    }

    /// The prompt's tokens as strings (e.g. `cat</w>`), without bos, eos, padding or truncation.
    /// A word that comes out as one token is common in CLIP's vocabulary.
    pub fn tokenize(&self, text: &str) -> Vec<String> {
        self.content_ids(text)
            .iter()
            .filter_map(|id| self.id_to_token.get(id).cloned())
            .collect()
    }

    /// Text back from ids: byte symbols to UTF-8 (invalid sequences, e.g. half an emoji, become
    /// U+FFFD), `</w>` to a space, trimmed. Unknown ids are skipped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let char_to_byte: HashMap<char, u8> =
            bpe::byte_to_char().into_iter().zip(0..=255).collect();
        let mut bytes = Vec::new();
        for token in ids.iter().filter_map(|id| self.id_to_token.get(id)) {
            // As `tokenizers`' byte-level decoder: a token with characters outside the byte table
            // (only an added token's text can have them) is taken as it is.
            match token
                .chars()
                .map(|c| char_to_byte.get(&c).copied())
                .collect::<Option<Vec<_>>>()
            {
                Some(b) => bytes.extend(b),
                None => bytes.extend(token.as_bytes()),
            }
        }
        String::from_utf8_lossy(&bytes)
            .replace(END_OF_WORD, " ")
            .trim()
            .to_string()
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// `model_max_length`: the length of every `Encoding::ids`.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Entries in `vocab.json`.
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// The largest token id the tokenizer can produce (the text encoder needs that many + 1
    /// embeddings).
    pub fn max_id(&self) -> u32 {
        self.vocab.values().copied().max().unwrap_or(0)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.vocab.get(token).copied()
    }

    /// The prompt's token ids, untruncated and without bos/eos.
    fn content_ids(&self, prompt: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        for raw in split_added(prompt, &self.raw_added) {
            let text = match raw {
                Segment::Added(id) => {
                    ids.push(id);
                    continue;
                }
                Segment::Text(text) => self.pre.normalize(text),
            };
            for piece in split_added(&text, &self.normalized_added) {
                match piece {
                    Segment::Added(id) => ids.push(id),
                    Segment::Text(text) => {
                        for word in self.pre.words(text) {
                            ids.extend(self.bpe.encode_word(word));
                        }
                    }
                }
            }
        }
        ids
    }
}
