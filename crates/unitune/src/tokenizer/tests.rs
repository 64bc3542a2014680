//! Parity with transformers' CLIPTokenizer (fixture from dev/ref_tokenizer.py) and load errors.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use super::ClipTokenizer;
use crate::Error;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(rel)
}

#[derive(Deserialize)]
struct Reference {
    pad_id: u32,
    bos_id: u32,
    eos_id: u32,
    max_length: usize,
    vocab_size: usize,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    prompt: String,
    ids: Vec<u32>,
    untruncated_len: usize,
    tokens: Vec<String>,
    dropped: Option<String>,
}

#[derive(Deserialize)]
struct SpecialConfig {
    name: String,
    special_tokens_map: Option<Value>,
    tokenizer_config: Option<Value>,
    prompt: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Fixture {
    #[serde(rename = "tiny-sd1")]
    sd1: Reference,
    #[serde(rename = "tiny-sd2")]
    sd2: Reference,
    special_configs: Vec<SpecialConfig>,
}

fn reference() -> Fixture {
    crate::error::read_json(&fixture("ref/tokenizer_ids.json")).expect("reference fixture")
}

#[test]
fn matches_transformers_on_both_fixtures() {
    let refs = reference();
    for (dir, reference) in [("tiny-sd1", &refs.sd1), ("tiny-sd2", &refs.sd2)] {
        let tok = ClipTokenizer::from_dir(&fixture(&format!("{dir}/tokenizer"))).unwrap();
        assert_eq!(
            (
                tok.pad_id(),
                tok.bos_id(),
                tok.eos_id(),
                tok.max_length(),
                tok.vocab_size()
            ),
            (
                reference.pad_id,
                reference.bos_id,
                reference.eos_id,
                reference.max_length,
                reference.vocab_size
            ),
            "{dir}"
        );
        assert!(reference.cases.len() >= 35);
        for case in &reference.cases {
            let enc = tok.encode(&case.prompt);
            assert_eq!(enc.ids, case.ids, "{dir}: ids of {:?}", case.prompt);
            assert_eq!(
                tok.tokenize(&case.prompt),
                case.tokens,
                "{dir}: tokens of {:?}",
                case.prompt
            );
            // Cut exactly when bos + tokens + eos do not fit, with the text diffusers reports.
            let cut = case.untruncated_len > reference.max_length;
            assert_eq!(
                enc.truncated.is_some(),
                cut,
                "{dir}: truncation of {:?}",
                case.prompt
            );
            assert_eq!(
                enc.truncated, case.dropped,
                "{dir}: dropped text of {:?}",
                case.prompt
            );
        }
    }
}

#[test]
fn fixture_covers_truncation_both_ways() {
    let cases = &reference().sd1.cases;
    let cut = cases.iter().filter(|c| c.dropped.is_some()).count();
    assert!(cut >= 3 && cut < cases.len());
    // The boundary: 75 one-token words fit, 76 do not.
    assert!(cases
        .iter()
        .any(|c| c.untruncated_len == 77 && c.dropped.is_none()));
    assert!(cases
        .iter()
        .any(|c| c.untruncated_len == 78 && c.dropped.as_deref() == Some("a")));
}

/// A scratch tokenizer folder: the tiny-sd1 vocabulary and merges with `files` written over them.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str, files: &[(&str, Option<String>)]) -> Self {
        let dir =
            std::env::temp_dir().join(format!("unitune-tokenizer-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["vocab.json", "merges.txt"] {
            std::fs::copy(fixture("tiny-sd1/tokenizer").join(f), dir.join(f)).unwrap();
        }
        for (file, text) in files {
            match text {
                Some(text) => std::fs::write(dir.join(file), text).unwrap(),
                None => std::fs::remove_file(dir.join(file)).unwrap(),
            }
        }
        Scratch(dir)
    }

    fn load(&self) -> crate::Result<ClipTokenizer> {
        ClipTokenizer::from_dir(&self.0)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn special_tokens_resolve_like_transformers() {
    for case in reference().special_configs {
        let files = [
            (
                "special_tokens_map.json",
                case.special_tokens_map.map(|v| v.to_string()),
            ),
            (
                "tokenizer_config.json",
                case.tokenizer_config.map(|v| v.to_string()),
            ),
        ];
        // Only write files the case has; tiny-sd1's vocab and merges come without configs.
        let files: Vec<_> = files
            .into_iter()
            .filter(|(_, text)| text.is_some())
            .collect();
        let tok = Scratch::new(&case.name, &files).load().unwrap();
        assert_eq!(tok.encode(&case.prompt).ids, case.ids, "{}", case.name);
    }
}

#[test]
fn missing_vocab_names_the_path() {
    let scratch = Scratch::new("no-vocab", &[("vocab.json", None)]);
    let err = scratch.load().err().unwrap().to_string();
    assert!(
        err.contains(&scratch.0.join("vocab.json").display().to_string()),
        "{err}"
    );
}

#[test]
fn bad_vocab_json_names_the_file() {
    let scratch = Scratch::new("bad-vocab", &[("vocab.json", Some("{\"a\": 1,".into()))]);
    let err = scratch.load().err().unwrap();
    assert!(
        matches!(&err, Error::Json { path, .. } if path.ends_with("vocab.json")),
        "{err}"
    );
}

#[test]
fn malformed_merges_line_is_named() {
    let merges = "#version: 0.2\ni n\nt  h\n";
    let scratch = Scratch::new("bad-merges", &[("merges.txt", Some(merges.into()))]);
    let err = scratch.load().err().unwrap().to_string();
    assert!(
        err.contains("merges.txt: line 3:") && err.contains("\"t  h\""),
        "{err}"
    );

    let merges = "#version: 0.2\ni n\ni \u{2603}\n";
    let scratch = Scratch::new("unknown-merge", &[("merges.txt", Some(merges.into()))]);
    let err = scratch.load().err().unwrap().to_string();
    assert!(
        err.contains("merges.txt: line 3: `\u{2603}` is not in vocab.json"),
        "{err}"
    );
}

#[test]
fn pad_token_outside_vocab_is_named() {
    let map = r#"{"pad_token": {"content": "<pad>"}}"#;
    let scratch = Scratch::new("bad-pad", &[("special_tokens_map.json", Some(map.into()))]);
    let err = scratch.load().err().unwrap().to_string();
    assert!(
        err.contains("special_tokens_map.json: field `pad_token`: `<pad>` is not in vocab.json"),
        "{err}"
    );

    let config = r#"{"eos_token": 3}"#;
    let scratch = Scratch::new("bad-eos", &[("tokenizer_config.json", Some(config.into()))]);
    let err = scratch.load().err().unwrap().to_string();
    assert!(
        err.contains("tokenizer_config.json: field `eos_token`: expected a string"),
        "{err}"
    );
}

#[test]
fn max_length_must_be_a_usable_integer() {
    // transformers' "unknown length" sentinel.
    let config = r#"{"model_max_length": 1000000000000000019884624838656}"#;
    let scratch = Scratch::new(
        "huge-length",
        &[("tokenizer_config.json", Some(config.into()))],
    );
    let err = scratch.load().err().unwrap().to_string();
    assert!(err.contains("field `model_max_length`"), "{err}");

    let config = r#"{"model_max_length": 8}"#;
    let tok = Scratch::new(
        "short-length",
        &[("tokenizer_config.json", Some(config.into()))],
    )
    .load()
    .unwrap();
    let enc = tok.encode("a photo of a cat, 8k");
    // bos + 6 tokens + eos; "8" "k" are cut.
    assert_eq!(enc.ids.len(), 8);
    assert_eq!((enc.ids[0], enc.ids[7]), (tok.bos_id(), tok.eos_id()));
    assert_eq!(enc.truncated.as_deref(), Some("8 k"));
}

#[test]
fn vocab_without_byte_symbols_is_rejected() {
    let vocab = r#"{"a": 0, "a</w>": 1, "<|startoftext|>": 2, "<|endoftext|>": 3}"#;
    let scratch = Scratch::new(
        "no-bytes",
        &[
            ("vocab.json", Some(vocab.into())),
            ("merges.txt", Some("#version: 0.2\n".into())),
        ],
    );
    let err = scratch.load().err().unwrap().to_string();
    assert!(
        err.contains("vocab.json: byte symbol `Ā` (byte 0x00) missing"),
        "{err}"
    );
}

#[test]
fn accessors_and_decode() {
    let tok = ClipTokenizer::from_dir(&fixture("tiny-sd1/tokenizer")).unwrap();
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(4513));
    assert_eq!(tok.token_to_id("cat</w>"), Some(2368));
    assert_eq!(tok.token_to_id("not a token"), None);
    // Rare words split into several tokens, common ones stay whole.
    assert_eq!(tok.tokenize("cat"), ["cat</w>"]);
    assert!(tok.tokenize("beikkpic").len() > 1);
    let ids = &tok.encode("Hello, Wörld! 🐱").ids;
    let end = ids.iter().position(|&id| id == tok.eos_id()).unwrap();
    assert_eq!(tok.decode(&ids[1..end]), "hello , wörld ! 🐱");
}

/// dev/ref_clip_vocab.py: transformers' CLIPTokenizer on CLIP's full vocabulary, both layouts.
#[derive(Deserialize)]
struct ClipReference {
    pad_id: u32,
    bos_id: u32,
    eos_id: u32,
    vocab_size: usize,
    cases: Vec<ClipCase>,
}

#[derive(Deserialize)]
struct ClipCase {
    prompt: String,
    ids: Vec<u32>,
    dropped: Option<String>,
}

#[test]
fn embedded_clip_tokenizer_matches_transformers_in_both_layouts() {
    use super::embedded::{clip_tokenizer_files, SD1_PAD, SD2_PAD};
    let refs: std::collections::HashMap<String, ClipReference> =
        crate::error::read_json(&fixture("ref/clip_tokenizer_ids.json")).unwrap();
    for (layout, pad) in [("sd1", SD1_PAD), ("sd2", SD2_PAD)] {
        let reference = &refs[layout];
        let files = clip_tokenizer_files(pad);
        let tok = ClipTokenizer::from_files(Path::new("embedded"), &files).unwrap();
        assert_eq!(
            (tok.pad_id(), tok.bos_id(), tok.eos_id(), tok.vocab_size()),
            (
                reference.pad_id,
                reference.bos_id,
                reference.eos_id,
                reference.vocab_size
            ),
            "{layout}"
        );
        assert_eq!((tok.vocab_size(), tok.max_length()), (49408, 77));
        assert!(reference.cases.len() >= 40);
        for case in &reference.cases {
            let enc = tok.encode(&case.prompt);
            assert_eq!(enc.ids, case.ids, "{layout}: ids of {:?}", case.prompt);
            assert_eq!(enc.truncated, case.dropped, "{layout}: {:?}", case.prompt);
        }
    }
}

#[test]
fn embedded_vocabulary_gives_the_fixtures_tokens_their_ids() {
    // The fixtures' vocabulary is CLIP's cut after its first merges (ids kept) plus the two
    // special tokens renumbered: every other entry must have the same id in the full one.
    let files = super::embedded::clip_tokenizer_files(super::embedded::SD1_PAD);
    let full = ClipTokenizer::from_files(Path::new("embedded"), &files).unwrap();
    let small: std::collections::HashMap<String, u32> =
        crate::error::read_json(&fixture("tiny-sd1/tokenizer/vocab.json")).unwrap();
    let mut checked = 0;
    for (token, id) in small.iter().filter(|(t, _)| !t.starts_with("<|")) {
        assert_eq!(full.token_to_id(token), Some(*id), "{token}");
        checked += 1;
    }
    assert_eq!(checked, 4512);
    assert_eq!(full.token_to_id("<|startoftext|>"), Some(49406));
    // Written out, the files are a tokenizer folder like any other.
    let dir = std::env::temp_dir().join(format!("unitune-clip-vocab-{}", std::process::id()));
    files.write(&dir).unwrap();
    let read = ClipTokenizer::from_dir(&dir).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(
        read.encode("a photo of a cat").ids,
        full.encode("a photo of a cat").ids
    );
}
