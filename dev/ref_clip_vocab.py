"""Dev-only: reference ids of CLIP's full tokenizer, for the parity test of the tokenizer unitune
embeds for single-file checkpoints (crates/unitune/src/tokenizer/embedded.rs).

Run with the reference venv (transformers 5.x) and the openai/CLIP mirror:

    /work/pyref/bin/python dev/ref_clip_vocab.py [--clip-repo /work/.mirror/openai+CLIP/repo]

Builds the vocab.json / merges.txt that transformers' CLIPTokenizer reads from the gzipped merge
list unitune ships (crates/unitune/src/tokenizer/bpe_simple_vocab_16e6.txt.gz), checks that the
vocabulary is the one CLIP's own clip/simple_tokenizer.py derives from it (run from the mirror,
with a stand-in for ftfy, which only its text cleaning uses), then writes
tests/fixtures/ref/clip_tokenizer_ids.json: for every prompt of dev/ref_tokenizer.py and each of the
two layouts (SD 1 pads with <|endoftext|>, SD 2 with "!"), the ids diffusers' StableDiffusionPipeline
asks for and the text it reports as dropped.
"""
import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import types

from transformers import CLIPTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
GZ = os.path.join(ROOT, "crates", "unitune", "src", "tokenizer", "bpe_simple_vocab_16e6.txt.gz")
OUT = os.path.join(ROOT, "tests", "fixtures", "ref", "clip_tokenizer_ids.json")

sys.path.insert(0, HERE)
from make_tiny_pipelines import bytes_to_unicode  # noqa: E402
from ref_tokenizer import PROMPTS  # noqa: E402

PADS = {"sd1": "<|endoftext|>", "sd2": "!"}


def hf_files(d, pad):
    """The tokenizer folder as the SD repos on the hub lay it out."""
    lines = gzip.open(GZ).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = list(bytes_to_unicode().values())  # CLIP's order: printable bytes first
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(d, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(d, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    added = lambda c: {"__type": "AddedToken", "content": c, "lstrip": False, "normalized": True,
                       "rstrip": False, "single_word": False}
    special = {"bos_token": added("<|startoftext|>"), "eos_token": added("<|endoftext|>"),
               "unk_token": added("<|endoftext|>"), "pad_token": pad}
    with open(os.path.join(d, "special_tokens_map.json"), "w") as f:
        json.dump(special, f)
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"add_prefix_space": False, "do_lower_case": True, "errors": "replace",
                   "model_max_length": 77, "tokenizer_class": "CLIPTokenizer", **special}, f)
    return {t: i for i, t in enumerate(vocab)}


def simple_tokenizer_vocab(clip_repo):
    """The encoder of CLIP's SimpleTokenizer, run from the mirror on our copy of the file."""
    source = subprocess.run(["git", "-C", clip_repo, "show", "HEAD:clip/simple_tokenizer.py"],
                            check=True, capture_output=True, text=True).stdout
    sys.modules.setdefault("ftfy", types.SimpleNamespace(fix_text=lambda t: t))
    module = types.ModuleType("simple_tokenizer")
    module.__file__ = GZ  # its default argument, default_bpe(), looks beside __file__
    exec(compile(source, "simple_tokenizer.py", "exec"), module.__dict__)
    return module.SimpleTokenizer(GZ).encoder


def reference(d):
    tok = CLIPTokenizer.from_pretrained(d)
    n = tok.model_max_length
    cases = []
    for prompt in PROMPTS:
        ids = tok(prompt, padding="max_length", max_length=n, truncation=True)["input_ids"]
        full = tok(prompt)["input_ids"]
        dropped = tok.decode(full[n - 1 : -1]) if len(full) > n else None
        cases.append({"prompt": prompt, "ids": ids, "dropped": dropped})
    return {"pad_id": tok.pad_token_id, "bos_id": tok.bos_token_id, "eos_id": tok.eos_token_id,
            "vocab_size": len(tok), "cases": cases}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--clip-repo", default="/work/.mirror/openai+CLIP/repo")
    args = parser.parse_args()
    out = {}
    for name, pad in PADS.items():
        with tempfile.TemporaryDirectory() as d:
            vocab = hf_files(d, pad)
            out[name] = reference(d)
    assert vocab == simple_tokenizer_vocab(args.clip_repo), "vocabulary differs from CLIP's"
    assert len(vocab) == 49408
    # A well-known anchor: "a photo of a cat" in every SD 1.x/2.x tokenizer.
    assert out["sd1"]["cases"][0]["ids"][:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, separators=(",", ":"))
    print(f"wrote {OUT}: {len(PROMPTS)} prompts x {len(PADS)} layouts; vocabulary = simple_tokenizer.py's")


if __name__ == "__main__":
    main()
