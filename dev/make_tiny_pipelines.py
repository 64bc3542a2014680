"""Dev-only: build the tiny random Stable Diffusion pipelines used as test fixtures.

Never needed by CI. Run with a venv holding torch, diffusers, transformers, safetensors:

    python dev/make_tiny_pipelines.py /path/to/bpe_simple_vocab_16e6.txt.gz

The BPE merges are CLIP's own (open_clip ships them in its wheel); we keep the first 4000 so the
vocabulary, and with it the text encoder, stays small while the merges stay real.

Writes tests/fixtures/tiny-sd1 (SD 1.x style: epsilon, quick_gelu, integer attention_head_dim)
and tests/fixtures/tiny-sd2 (SD 2.x style: v_prediction, linear projection, per-block head list,
gelu, pad token "!", a sharded UNet and an fp16-only VAE variant).
"""
import gzip
import json
import os
import shutil
import sys

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
N_MERGES = 4000


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_tokenizer_files(bpe_gz, out_dir):
    """vocab.json + merges.txt built the way CLIP's simple tokenizer builds its vocabulary."""
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = [tuple(l.split()) for l in lines[1 : 1 + N_MERGES]]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return len(vocab)


def tokenizer(tmp, pad):
    return CLIPTokenizer(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"), pad_token=pad,
                         model_max_length=77)


def special(content, legacy):
    """SD 1.x folders write special tokens as AddedToken dicts, SD 2.x as plain strings."""
    if not legacy:
        return content
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
            "rstrip": False, "single_word": False}


def write_classic_tokenizer(tmp, out, pad, legacy):
    """Lay out tokenizer/ as real SD folders do (vocab.json, merges.txt, two JSON configs), which
    transformers 5 no longer writes by itself."""
    tok_dir = os.path.join(out, "tokenizer")
    shutil.rmtree(tok_dir)
    os.makedirs(tok_dir)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(tmp, f), tok_dir)
    tokens = {"bos_token": special("<|startoftext|>", legacy), "eos_token": special("<|endoftext|>", legacy),
              "unk_token": special("<|endoftext|>", legacy), "pad_token": special(pad, legacy)}
    with open(os.path.join(tok_dir, "special_tokens_map.json"), "w") as f:
        json.dump(tokens, f, indent=2)
    with open(os.path.join(tok_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"add_prefix_space": False, "do_lower_case": True, "errors": "replace",
                   "model_max_length": 77, "tokenizer_class": "CLIPTokenizer", **tokens}, f, indent=2)


def text_encoder(vocab_size, act, seed):
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act=act, layer_norm_eps=1e-5,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=1, projection_dim=32,
    )
    return CLIPTextModel(cfg).eval()


def vae(seed):
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 16, 16, 16), sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    ).eval()


def randomize_norms(module, seed):
    """Fresh models have norm weights 1 and biases 0, which would hide a swapped weight/bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def save_pipeline(pipe, out):
    if os.path.exists(out):
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)


def main(bpe_gz):
    tmp = os.path.join(ROOT, ".tok-tmp")
    vocab_size = write_tokenizer_files(bpe_gz, tmp)

    # --- SD 1.x style ---
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    ).eval()
    te, v = text_encoder(vocab_size, "quick_gelu", 2), vae(3)
    for i, m in enumerate((unet, te, v)):
        randomize_norms(m, 10 + i)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=v, text_encoder=te, tokenizer=tokenizer(tmp, "<|endoftext|>"),
                                   unet=unet, scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    save_pipeline(pipe, os.path.join(ROOT, "tiny-sd1"))
    write_classic_tokenizer(tmp, os.path.join(ROOT, "tiny-sd1"), "<|endoftext|>", legacy=True)

    # --- SD 2.x style ---
    torch.manual_seed(4)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=[2, 4, 4], use_linear_projection=True,
        upcast_attention=True, norm_num_groups=8,
    ).eval()
    te, v = text_encoder(vocab_size, "gelu", 5), vae(6)
    for i, m in enumerate((unet, te, v)):
        randomize_norms(m, 20 + i)
    # The VAE ships only as an fp16 variant: round it now so references use the same weights.
    v = v.half().float()
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                          prediction_type="v_prediction", timestep_spacing="trailing")
    pipe = StableDiffusionPipeline(vae=v, text_encoder=te, tokenizer=tokenizer(tmp, "!"),
                                   unet=unet, scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    out = os.path.join(ROOT, "tiny-sd2")
    save_pipeline(pipe, out)
    write_classic_tokenizer(tmp, out, "!", legacy=False)
    shutil.rmtree(os.path.join(out, "unet"))
    unet.save_pretrained(os.path.join(out, "unet"), max_shard_size="500KB", safe_serialization=True)
    shutil.rmtree(os.path.join(out, "vae"))
    v.half().save_pretrained(os.path.join(out, "vae"), variant="fp16", safe_serialization=True)

    shutil.rmtree(tmp)
    for name, variant in (("tiny-sd1", None), ("tiny-sd2", "fp16")):
        # Must load back through diffusers exactly as a user's folder would.
        p = StableDiffusionPipeline.from_pretrained(os.path.join(ROOT, name), variant=variant)
        print(name, "loads;", sum(x.numel() for x in p.unet.parameters()), "unet weights")


if __name__ == "__main__":
    main(sys.argv[1])
