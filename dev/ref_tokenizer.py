"""Dev-only: reference CLIP token ids for the tokenizer parity test.

Run with the reference venv (transformers 5.24):

    /work/pyref/bin/python dev/ref_tokenizer.py

Writes tests/fixtures/ref/tokenizer_ids.json: for each prompt and each fixture tokenizer (tiny-sd1 pads
with <|endoftext|>, tiny-sd2 with "!"), the ids as diffusers' StableDiffusionPipeline asks for them
(padding="max_length", max_length=model_max_length, truncation=True), the untruncated length, the
BPE tokens of `tokenizer.tokenize`, and the text diffusers reports as dropped when the prompt is cut;
and, for a few ways of writing the special tokens in the JSON configs, the ids of one probe prompt.
"""
import json
import os
import shutil
import tempfile

from transformers import CLIPTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")

LONG = ("a highly detailed photograph of a majestic lion resting on a rock at sunset, golden light, "
        "dramatic clouds in the sky, tall grass swaying in the wind, shot on a telephoto lens with shallow "
        "depth of field, award winning wildlife photography, national geographic, ultra realistic, 8k, "
        "in the style of a renaissance oil painting by an old master with soft brush strokes")

PROMPTS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "",
    "   ",
    "\t\n  \r\n",
    "a  photo\tof\na   dog",
    "  leading and trailing spaces  ",
    "1234 apples and 5.67 pears, 2024",
    "it's a cat's toy, isn't it? they're here; we've been; I'm; you'll; he'd",
    "IT'S THEY'RE WE'VE",
    "'sa 'stop 'tis rock'n'roll",
    "wow!!! really?! ... (parentheses) [brackets] {braces}",
    "hello,world.foo-bar_baz/qux",
    "caf\u00e9 r\u00e9sum\u00e9 na\u00efve",
    "cafe\u0301 and re\u0301sume\u0301 decomposed",
    "Stra\u00dfe STRASSE \u00df",
    "emoji \U0001F431\U0001F680 and \U0001F44D\U0001F3FD family \U0001F468\u200d\U0001F469\u200d\U0001F467",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \u4e2d\u6587",
    "\u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
    "\u039f\u0394\u039f\u03a3 \u03a3\u03af\u03c3\u03c5\u03c6\u03bf\u03c2",
    "\u0130stanbul",
    "Hangul \ud55c\uad6d\uc5b4 and conjoining \u1112\u1161\u11ab",
    "a\u0330b combining mark without a precomposed form",
    "a photo <|endoftext|> of a cat",
    "<|startoftext|>hello<|endoftext|>",
    "<|ENDOFTEXT|> upper <|StartOfText|>",
    "x<|endoftext|>! and <|endoftext|>'s",
    "x<|ENDOFTEXT|>? y<|StartOfText|>.",
    "beikkpic",
    "a photo of beikkpic dog",
    "in the style of beikkpic, highly detailed, 4k",
    "non\u00a0breaking\u3000ideographic\u2003em\u2028line space",
    "zero\u200bwidth space and\u000bvertical\u000cform feed",
    "numbers \u2460\u2461\u2462 \u00bd superscript\u00b2 arabic-indic \u0663\u0664",
    "\u01c4 \u01c5 titlecase and \ufb01 ligature",
    "mixed CaSe WoRdS with \u00dcn\u00efc\u00f6d\u00e9",
    "''' \"quotes\" `backticks` 'single'",
    "e-mail: test@example.com #hashtag $100 50% a&b ~tilde^ |pipe| <angle>",
    LONG,
    "a " * 75,
    "a " * 76,
    "a " * 74 + "\U0001F431 cat",
    "the quick brown fox jumps over the lazy dog " * 5,
    "very " * 100,
]


def reference(tok_dir):
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    n = tok.model_max_length
    cases = []
    for prompt in PROMPTS:
        ids = tok(prompt, padding="max_length", max_length=n, truncation=True)["input_ids"]
        full = tok(prompt)["input_ids"]
        # As StableDiffusionPipeline reports it: the content tokens past the first n - 2.
        dropped = tok.decode(full[n - 1 : -1]) if len(full) > n else None
        cases.append({"prompt": prompt, "ids": ids, "untruncated_len": len(full),
                      "tokens": tok.tokenize(prompt), "dropped": dropped})
    return {"pad_id": tok.pad_token_id, "bos_id": tok.bos_token_id, "eos_id": tok.eos_token_id,
            "max_length": n, "vocab_size": len(tok), "cases": cases}


def added(content, **flags):
    return {"__type": "AddedToken", "content": content, "lstrip": False, "rstrip": False,
            "single_word": False, **flags}


# How transformers resolves special tokens from the two JSON files: which file wins, which tokens
# are cut out of the raw prompt and which after normalization (so "<|ENDOFTEXT|>" matches or not).
SPECIAL_CONFIGS = {
    # runwayml/stable-diffusion-v1-5: dicts with normalized=true, but pad as a plain string.
    "sd15_layout": ({"bos_token": added("<|startoftext|>", normalized=True),
                     "eos_token": added("<|endoftext|>", normalized=True),
                     "unk_token": added("<|endoftext|>", normalized=True), "pad_token": "<|endoftext|>"},
                    {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "!"}),
    "map_pad_normalized": ({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                            "pad_token": added("<|endoftext|>", normalized=True)}, None),
    "config_only_no_flag": (None, {"bos_token": added("<|startoftext|>"), "eos_token": added("<|endoftext|>"),
                                   "pad_token": "!"}),
    "added_tokens_decoder": ({"pad_token": "<|endoftext|>"},
                             {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "!",
                              "added_tokens_decoder": {
                                  "4513": {"content": "<|endoftext|>", "normalized": True, "special": True},
                                  "4512": {"content": "<|startoftext|>", "special": False}}}),
    "no_config_files": (None, None),
}
SPECIAL_PROMPT = "<|ENDOFTEXT|> <|STARTOFTEXT|>!! <|endoftext|>?"


def special_configs(src):
    cases = []
    for name, (special_map, config) in SPECIAL_CONFIGS.items():
        with tempfile.TemporaryDirectory() as d:
            for f in ("vocab.json", "merges.txt"):
                shutil.copy(os.path.join(src, f), d)
            if special_map is not None:
                with open(os.path.join(d, "special_tokens_map.json"), "w") as f:
                    json.dump(special_map, f)
            if config is not None:
                config = {"model_max_length": 77, **config}
                with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
                    json.dump(config, f)
            tok = CLIPTokenizer.from_pretrained(d, model_max_length=77)
            ids = tok(SPECIAL_PROMPT, padding="max_length", max_length=77, truncation=True)["input_ids"]
        cases.append({"name": name, "special_tokens_map": special_map, "tokenizer_config": config,
                      "prompt": SPECIAL_PROMPT, "ids": ids})
    return cases


def main():
    out = {name: reference(os.path.join(ROOT, name, "tokenizer")) for name in ("tiny-sd1", "tiny-sd2")}
    out["special_configs"] = special_configs(os.path.join(ROOT, "tiny-sd1", "tokenizer"))
    path = os.path.join(ROOT, "ref", "tokenizer_ids.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, separators=(",", ":"))
    n_cut = sum(c["dropped"] is not None for c in out["tiny-sd1"]["cases"])
    print(f"wrote {path}: {len(PROMPTS)} prompts, {n_cut} truncated")


if __name__ == "__main__":
    main()
