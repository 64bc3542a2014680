//! Byte-level BPE as CLIP uses it: a word's UTF-8 bytes become printable symbols (GPT-2's
//! byte-to-unicode table), the last one carrying the `</w>` end-of-word suffix, and adjacent symbols
//! are merged by merge rank until no known pair is left.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use super::files::Merges;
use crate::{Error, Result};

pub(super) const END_OF_WORD: &str = "</w>";

/// Words kept in the cache before it is emptied: prompts repeat few words, but a long-lived
/// process should not grow without bound.
const CACHE_CAPACITY: usize = 10_000;

/// GPT-2's table: printable Latin-1 bytes stand for themselves, the others are shifted to 256+ so
/// that every byte is a visible, non-space character.
pub(super) fn byte_to_char() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut table = ['\0'; 256];
    let mut shifted = 256u32;
    for b in 0..=255u8 {
        table[b as usize] = if printable(b) {
            char::from(b)
        } else {
            shifted += 1;
            char::from_u32(shifted - 1).expect("256..512 are valid chars")
        };
    }
    table
}

pub(super) struct Bpe {
    merges: Merges,
    /// Id of each byte's symbol, inside a word and at its end (with `</w>`).
    byte_ids: [u32; 256],
    end_byte_ids: [u32; 256],
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

impl Bpe {
    /// Checks that the vocabulary holds all 512 byte symbols, which makes encoding infallible.
    pub fn new(merges: Merges, vocab: &HashMap<String, u32>, vocab_path: &Path) -> Result<Self> {
        let (mut byte_ids, mut end_byte_ids) = ([0; 256], [0; 256]);
        for (b, c) in byte_to_char().into_iter().enumerate() {
            for (ids, symbol) in [
                (&mut byte_ids, c.to_string()),
                (&mut end_byte_ids, format!("{c}{END_OF_WORD}")),
            ] {
                ids[b] = *vocab.get(&symbol).ok_or_else(|| {
                    Error::weights(
                        vocab_path,
                        format!("byte symbol `{symbol}` (byte {b:#04x}) missing: not a CLIP BPE vocabulary"),
                    )
                })?;
            }
        }
        Ok(Self {
            merges,
            byte_ids,
            end_byte_ids,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The token ids of one pre-tokenized word (not empty).
    pub fn encode_word(&self, word: &str) -> Vec<u32> {
        // A panic elsewhere cannot leave the map half-written, so a poisoned lock is still usable.
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ids) = cache.get(word) {
            return ids.clone();
        }
        let ids = self.merge(word.as_bytes());
        if cache.len() >= CACHE_CAPACITY {
            cache.clear();
        }
        cache.insert(word.to_string(), ids.clone());
        ids
    }

    /// Repeatedly joins every occurrence (left to right) of the lowest-ranked adjacent pair; this
    /// is quadratic in the word length, hence the cache.
    fn merge(&self, bytes: &[u8]) -> Vec<u32> {
        let Some((&last, init)) = bytes.split_last() else {
            return Vec::new();
        };
        let mut symbols: Vec<u32> = init.iter().map(|&b| self.byte_ids[b as usize]).collect();
        symbols.push(self.end_byte_ids[last as usize]);
        loop {
            let best = symbols
                .windows(2)
                .filter_map(|w| {
                    self.merges
                        .get(&(w[0], w[1]))
                        .map(|&(rank, id)| (rank, (w[0], w[1]), id))
                })
                .min_by_key(|&(rank, ..)| rank);
            let Some((_, pair, joined)) = best else {
                return symbols;
            };
            let mut merged = Vec::with_capacity(symbols.len());
            let mut i = 0;
            while i < symbols.len() {
                if i + 1 < symbols.len() && (symbols[i], symbols[i + 1]) == pair {
                    merged.push(joined);
                    i += 2;
                } else {
                    merged.push(symbols[i]);
                    i += 1;
                }
            }
            symbols = merged;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_gpt2s() {
        let table = byte_to_char();
        assert_eq!(table[b'a' as usize], 'a');
        assert_eq!(table[b' ' as usize], 'Ġ'); // 256 + 32
        assert_eq!(table[0], 'Ā'); // the first shifted byte
        assert_eq!(table[0xAD], 'Ń'); // soft hyphen, the last shifted byte
        let distinct: std::collections::HashSet<_> = table.iter().collect();
        assert_eq!(distinct.len(), 256);
    }
}
