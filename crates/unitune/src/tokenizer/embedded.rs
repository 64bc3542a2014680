//! CLIP's tokenizer for models that come without one: single-file checkpoints hold the networks
//! only, and the tokenizer of SD 1.x (OpenAI CLIP ViT-L/14) and SD 2.x (OpenCLIP ViT-H/14) is
//! CLIP's BPE. Shipped as OpenAI CLIP's `bpe_simple_vocab_16e6.txt.gz` (MIT licence, see
//! `CLIP-LICENSE` beside it) and turned into the files of a diffusers `tokenizer/` folder the way
//! CLIP's `simple_tokenizer.py` builds its vocabulary, so that one reader serves both.

use serde_json::{json, Map, Value};

use super::bpe::{byte_to_char, END_OF_WORD};
use crate::weights::export::TokenizerFiles;

/// OpenAI CLIP's merge list, gzipped: a header line, then one merge (`left right`) per line.
const BPE_GZ: &[u8] = include_bytes!("bpe_simple_vocab_16e6.txt.gz");
/// CLIP keeps the first 49152 - 256 - 2 merges: 256 byte symbols (twice: inside a word and at its
/// end) + the merges + 2 special tokens = the 49408 ids of its token embedding.
const MERGES: usize = 49152 - 256 - 2;
const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";

/// The pad token of Stable Diffusion 1.x's tokenizer (OpenAI's CLIP pads with end-of-text).
pub const SD1_PAD: &str = EOS;
/// The pad token of Stable Diffusion 2.x's tokenizer (OpenCLIP pads with id 0, which is `!`).
pub const SD2_PAD: &str = "!";

/// `vocab.json`, `merges.txt`, `special_tokens_map.json` and `tokenizer_config.json` of CLIP's
/// tokenizer padding with `pad` ([`SD1_PAD`] or [`SD2_PAD`]), laid out as the Stable Diffusion
/// repos on the Hugging Face hub have them (special tokens matched after normalization, 77
/// tokens).
pub fn clip_tokenizer_files(pad: &str) -> TokenizerFiles {
    let merges = merges();
    // The vocabulary in id order, as simple_tokenizer.py lists it: the byte symbols (printable
    // bytes first, then the shifted ones, i.e. by code point), the same with `</w>`, each merge
    // joined, then the two special tokens.
    let mut bytes: Vec<char> = byte_to_char().to_vec();
    bytes.sort_unstable();
    let symbols = bytes.iter().map(|c| c.to_string());
    let ends = bytes.iter().map(|c| format!("{c}{END_OF_WORD}"));
    let joined = merges.iter().map(|(l, r)| format!("{l}{r}"));
    let specials = [BOS, EOS].map(String::from);
    let vocab: Map<String, Value> = symbols
        .chain(ends)
        .chain(joined)
        .chain(specials)
        .enumerate()
        .map(|(id, token)| (token, json!(id)))
        .collect();
    let mut merges_txt = String::from("#version: 0.2\n");
    for (l, r) in &merges {
        merges_txt.push_str(&format!("{l} {r}\n"));
    }
    let added = |content: &str| {
        json!({"__type": "AddedToken", "content": content, "lstrip": false, "normalized": true,
               "rstrip": false, "single_word": false})
    };
    let special_map = json!({
        "bos_token": added(BOS), "eos_token": added(EOS), "unk_token": added(EOS), "pad_token": pad,
    });
    let config = json!({
        "add_prefix_space": false, "bos_token": added(BOS), "do_lower_case": true,
        "eos_token": added(EOS), "errors": "replace", "model_max_length": 77, "pad_token": pad,
        "tokenizer_class": "CLIPTokenizer", "unk_token": added(EOS),
    });
    let to_bytes = |v: &Value| serde_json::to_vec_pretty(v).expect("JSON values serialize");
    TokenizerFiles(vec![
        ("merges.txt".into(), merges_txt.into_bytes()),
        ("special_tokens_map.json".into(), to_bytes(&special_map)),
        ("tokenizer_config.json".into(), to_bytes(&config)),
        ("vocab.json".into(), to_bytes(&Value::Object(vocab))),
    ])
}

/// The merges CLIP uses, in rank order: lines 1..=MERGES of the file.
fn merges() -> Vec<(String, String)> {
    use std::io::Read;
    let mut text = String::new();
    flate2::read::GzDecoder::new(BPE_GZ)
        .read_to_string(&mut text)
        .expect("the embedded CLIP vocabulary is valid gzipped UTF-8 (checked by the tests)");
    text.split('\n')
        .skip(1)
        .take(MERGES)
        .map(|line| {
            let (l, r) = line
                .split_once(' ')
                .expect("every CLIP merge is two symbols (checked by the tests)");
            (l.to_string(), r.to_string())
        })
        .collect()
}
