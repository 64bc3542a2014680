//! A CLIP tokenizer folder for the world's own text encoder: byte-level BPE whose merges build
//! every grammar word into one token, so a caption has one token per word.
//!
//! The merges are learnt from the vocabulary as BPE is trained (repeatedly join the most frequent
//! adjacent pair, ties to the first pair in byte order) until every word is one symbol; encoding
//! then replays the same joins, since it applies merges in the order they were learnt.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Map, Value};

use super::caption::vocabulary;
use unitune::{Error, Result};

const END_OF_WORD: &str = "</w>";
const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";

/// Writes `vocab.json`, `merges.txt`, `tokenizer_config.json` and `special_tokens_map.json` into
/// `dir` (created if needed), readable by [`unitune::tokenizer::ClipTokenizer::from_dir`] and by
/// transformers' `CLIPTokenizer`. Pads with `<|endoftext|>` to 77 tokens.
pub fn write_tokenizer_files(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let merges = learn_merges(&vocabulary());

    // CLIP's order: the 256 byte symbols, the same with `</w>`, each merge's result, the specials.
    let bytes = byte_symbols();
    let mut tokens: Vec<String> = bytes.clone();
    tokens.extend(bytes.iter().map(|b| format!("{b}{END_OF_WORD}")));
    tokens.extend(merges.iter().map(|(l, r)| format!("{l}{r}")));
    tokens.extend([BOS.to_string(), EOS.to_string()]);
    let mut vocab = Map::new();
    for token in tokens {
        let id = vocab.len();
        vocab.entry(token).or_insert(json!(id));
    }

    let merges_txt: String = std::iter::once("#version: 0.2".to_string())
        .chain(merges.iter().map(|(l, r)| format!("{l} {r}")))
        .map(|line| line + "\n")
        .collect();
    let specials = json!({
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
    });
    let mut config = json!({
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": true,
        "add_prefix_space": false,
        "errors": "replace",
    });
    config
        .as_object_mut()
        .expect("a JSON object")
        .extend(specials.as_object().expect("a JSON object").clone());

    write(&dir.join("vocab.json"), &Value::Object(vocab).to_string())?;
    write(&dir.join("merges.txt"), &merges_txt)?;
    write(&dir.join("tokenizer_config.json"), &pretty(&config))?;
    write(&dir.join("special_tokens_map.json"), &pretty(&specials))
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).expect("JSON values serialize")
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// GPT-2's byte-to-symbol table in CLIP's vocabulary order: printable Latin-1 bytes stand for
/// themselves and come first; the other bytes follow, shifted to 256 and up.
fn byte_symbols() -> Vec<String> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut symbols: Vec<String> = (0..=255u8)
        .filter(|&b| printable(b))
        .map(|b| char::from(b).to_string())
        .collect();
    let shifted = (0..=255u8).filter(|&b| !printable(b)).enumerate();
    symbols.extend(shifted.map(|(i, _)| {
        char::from_u32(256 + i as u32)
            .expect("256..512 are chars")
            .to_string()
    }));
    symbols
}

/// BPE training on `words` (each once) until each is a single symbol. The words are printable
/// ASCII, whose byte symbols are the characters themselves.
fn learn_merges(words: &[String]) -> Vec<(String, String)> {
    let mut split: Vec<Vec<String>> = words
        .iter()
        .map(|w| {
            let mut symbols: Vec<String> = w.chars().map(String::from).collect();
            if let Some(last) = symbols.last_mut() {
                last.push_str(END_OF_WORD);
            }
            symbols
        })
        .collect();
    let mut merges = Vec::new();
    loop {
        let mut counts: BTreeMap<(&str, &str), usize> = BTreeMap::new();
        for pair in split.iter().flat_map(|s| s.windows(2)) {
            *counts.entry((&pair[0], &pair[1])).or_default() += 1;
        }
        // The first pair with the highest count: `max_by_key` would keep the last.
        let Some(best) = counts.iter().fold(
            None,
            |best: Option<(&(&str, &str), usize)>, (pair, &n)| match best {
                Some((_, m)) if m >= n => best,
                _ => Some((pair, n)),
            },
        ) else {
            return merges;
        };
        let (left, right) = (best.0 .0.to_string(), best.0 .1.to_string());
        for symbols in &mut split {
            *symbols = join(symbols, &left, &right);
        }
        merges.push((left, right));
    }
}

/// Joins each non-overlapping occurrence of (left, right), left to right, as BPE encoding does.
fn join(symbols: &[String], left: &str, right: &str) -> Vec<String> {
    let mut joined = Vec::with_capacity(symbols.len());
    let mut i = 0;
    while i < symbols.len() {
        if i + 1 < symbols.len() && symbols[i] == left && symbols[i + 1] == right {
            joined.push(format!("{left}{right}"));
            i += 2;
        } else {
            joined.push(symbols[i].clone());
            i += 1;
        }
    }
    joined
}
