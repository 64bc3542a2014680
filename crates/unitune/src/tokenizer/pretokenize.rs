//! From prompt text to the words BPE works on, as transformers' CLIPTokenizer sets up its
//! `tokenizers` pipeline: special tokens are cut out whole (some from the raw text, some after
//! normalization), the rest is normalized (NFC, whitespace runs to one space, lowercase) and split
//! by CLIP's pattern, then by the byte-level pre-tokenizer's GPT-2 pattern.

use regex::Regex;
use unicode_normalization::UnicodeNormalization;

/// CLIP's split pattern; text between matches (whitespace) is dropped.
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// The byte-level pre-tokenizer's GPT-2 pattern, less its whitespace alternatives: CLIP's pieces
/// hold no whitespace. It only splits further the `<|startoftext|>` / `<|endoftext|>` texts that
/// were not cut out as special tokens (into `<|`, the word, `|>`).
const GPT2_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+";

/// A piece of the prompt: a special token's id, or text still to be tokenized.
#[derive(Debug, PartialEq)]
pub(super) enum Segment<'a> {
    Added(u32),
    Text(&'a str),
}

pub(super) struct PreTokenizer {
    clip: Regex,
    gpt2: Regex,
    whitespace: Regex,
}

impl PreTokenizer {
    pub fn new() -> Self {
        // The patterns are constants, covered by the tests.
        let compile = |p: &str| Regex::new(p).expect("constant tokenizer pattern compiles");
        Self {
            clip: compile(CLIP_PATTERN),
            gpt2: compile(GPT2_PATTERN),
            whitespace: compile(r"\s+"),
        }
    }

    /// NFC, every whitespace run to one space, then lowercase char by char (as `tokenizers` does:
    /// a final `Σ` becomes `σ`, not `ς`).
    pub fn normalize(&self, text: &str) -> String {
        let nfc: String = text.nfc().collect();
        self.whitespace
            .replace_all(&nfc, " ")
            .chars()
            .flat_map(char::to_lowercase)
            .collect()
    }

    /// The words of normalized `text`, each to be BPE-encoded on its own.
    pub fn words<'t>(&'t self, text: &'t str) -> impl Iterator<Item = &'t str> + 't {
        self.clip
            .find_iter(text)
            .flat_map(|m| self.gpt2.find_iter(m.as_str()).map(|w| w.as_str()))
    }
}

/// Cuts the tokens of `added` out of `text`, leftmost first and the longest where several start at
/// the same place (the `tokenizers` trie's order). Empty text between tokens is left out.
pub(super) fn split_added<'a>(text: &'a str, added: &[(String, u32)]) -> Vec<Segment<'a>> {
    let mut segments = Vec::new();
    let mut start = 0; // start of the text not yet emitted
    let mut pos = 0;
    while pos < text.len() {
        let rest = &text[pos..];
        let found = added
            .iter()
            .filter(|(content, _)| !content.is_empty() && rest.starts_with(content.as_str()))
            .max_by_key(|(content, _)| content.len());
        match found {
            Some((content, id)) => {
                if start < pos {
                    segments.push(Segment::Text(&text[start..pos]));
                }
                segments.push(Segment::Added(*id));
                pos += content.len();
                start = pos;
            }
            None => pos += rest.chars().next().map_or(1, char::len_utf8),
        }
    }
    if start < text.len() {
        segments.push(Segment::Text(&text[start..]));
    }
    segments
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_like_tokenizers() {
        let pre = PreTokenizer::new();
        // Combining acute composes; tabs, newlines and NBSP fold; İ lowercases to i + U+0307.
        assert_eq!(
            pre.normalize("Cafe\u{301}\t\n\u{a0}İ ΟΔΟΣ"),
            "café i\u{307} οδοσ"
        );
    }

    #[test]
    fn splits_words_and_special_texts() {
        let pre = PreTokenizer::new();
        let words: Vec<_> = pre.words(" it's 1234 x<|endoftext|>? ok!! ").collect();
        let expected = [
            "it",
            "'s",
            "1",
            "2",
            "3",
            "4",
            "x",
            "<|",
            "endoftext",
            "|>",
            "?",
            "ok",
            "!!",
        ];
        assert_eq!(words, expected);
    }

    #[test]
    fn cuts_added_tokens_longest_first() {
        let added = [
            ("!".to_string(), 0),
            ("!!x".to_string(), 7),
            ("<|e|>".to_string(), 9),
        ];
        let segments = split_added("a!!x!<|e|>é", &added);
        use Segment::*;
        assert_eq!(
            segments,
            [Text("a"), Added(7), Added(0), Added(9), Text("é")]
        );
    }
}
