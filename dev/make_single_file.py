"""Dev-only: the tiny fixture pipelines as single-file checkpoints, in the original CompVis /
Stability layout that the AUTOMATIC1111 web UI and ComfyUI load, written with diffusers' own
conversion and checked with diffusers' own single-file loader.

Run with the reference venv (torch, diffusers 0.42, transformers 5) and the diffusers mirror:

    /work/pyref/bin/python dev/make_single_file.py [--diffusers-repo /work/.mirror/huggingface+diffusers/repo]

Writes tests/fixtures/tiny-sd1.safetensors, tests/fixtures/tiny-sd1-fp16.safetensors (every float
tensor in f16, like the `*-fp16` / `emaonly` files people share) and tests/fixtures/tiny-sd2.safetensors
(each tensor in its folder's dtype: f32, the VAE f16).

The conversion is diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py, run from
the mirror, with two adaptations for the tiny shapes:
- its UNet name map is written for SD's four blocks of two resnets; the same loops are run with
  the fixture's block count, resnets per block and attention blocks;
- it recognises SD 2 by a 23rd text encoder layer, which a 2-layer encoder lacks: its OpenCLIP
  conversion (`convert_text_enc_state_dict_v20`) is called directly for tiny-sd2.
The tiny folders were saved by transformers 5, whose CLIPTextModel names lack the `text_model.`
prefix of transformers 4; published checkpoints have it, so it is added first.

Published files also hold tensors Stable Diffusion does not use, which a loader has to skip: the
text encoder's int64 `position_ids` and the DDPM buffers and EMA counters of the training code (SD
1.x files), OpenCLIP's `text_projection` and `logit_scale` (SD 2.x files). A few of each are added.

Checks, for each file: diffusers' `StableDiffusionPipeline.from_single_file(file, config=...)` with
a config folder holding the tiny folder's JSON and text files only (so no component can come from
the folder's weights) gives every network the folder's tensors exactly (the f16 file: the folder's
tensors in f16), and the same image as `from_pretrained(folder)` (f32 files: bit for bit).
"""
import argparse
import os
import shutil
import subprocess
import tempfile
import types

import torch
from diffusers import StableDiffusionPipeline
from diffusers.loaders.single_file_utils import infer_diffusers_model_type, is_clip_model, is_open_clip_model
from safetensors.torch import load_file, save_file

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
PROMPT = "a photo of a red circle on a blue background"


def diffusers_script(repo):
    path = "scripts/convert_diffusers_to_original_stable_diffusion.py"
    source = subprocess.run(["git", "-C", repo, "show", f"HEAD:{path}"], check=True, capture_output=True,
                            text=True).stdout
    module = types.ModuleType("convert_diffusers_to_original_stable_diffusion")
    exec(compile(source, path, "exec"), module.__dict__)
    return module


def unet_layer_map(cfg):
    """The script's `unet_conversion_map_layer` loops, for this UNet's blocks (it hard-codes SD's:
    four blocks of two resnets, attention in all down blocks but the last and all up blocks but
    the first)."""
    n, r = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    down_attn = [t.startswith("CrossAttn") for t in cfg["down_block_types"]]
    up_attn = [t.startswith("CrossAttn") for t in cfg["up_block_types"]]
    m = []
    for i in range(n):
        for j in range(r):
            m.append((f"input_blocks.{(r + 1) * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if down_attn[i]:
                m.append((f"input_blocks.{(r + 1) * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(r + 1):
            m.append((f"output_blocks.{(r + 1) * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if up_attn[i]:
                m.append((f"output_blocks.{(r + 1) * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < n - 1:
            m.append((f"input_blocks.{(r + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            m.append((f"output_blocks.{(r + 1) * i + r}.{2 if up_attn[i] else 1}.", f"up_blocks.{i}.upsamplers.0."))
    m.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        m.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    return m


def load_component(folder):
    """Every tensor of a component folder (shards, or the fp16 variant when it is all there is)."""
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    state = {}
    for f in files:
        state.update(load_file(os.path.join(folder, f)))
    return state


def convert(script, folder, v2):
    import json

    with open(os.path.join(folder, "unet", "config.json")) as f:
        unet_cfg = json.load(f)
    script.unet_conversion_map_layer = unet_layer_map(unet_cfg)
    unet = script.convert_unet_state_dict(load_component(os.path.join(folder, "unet")))
    vae = script.convert_vae_state_dict(load_component(os.path.join(folder, "vae")))
    text = {("" if k.startswith("text_model.") else "text_model.") + k: v
            for k, v in load_component(os.path.join(folder, "text_encoder")).items()}
    if v2:
        text = script.convert_text_enc_state_dict_v20({"transformer." + k: v for k, v in text.items()})
        text = {"cond_stage_model.model." + k: v for k, v in text.items()}
    else:
        text = {"cond_stage_model.transformer." + k: v
                for k, v in script.convert_text_enc_state_dict(text).items()}
    state = {**{"model.diffusion_model." + k: v for k, v in unet.items()},
             **{"first_stage_model." + k: v for k, v in vae.items()}, **text}
    # Tensors of published checkpoints that Stable Diffusion does not use (see the module doc).
    g = torch.Generator().manual_seed(0)
    if v2:
        width = state["cond_stage_model.model.token_embedding.weight"].shape[1]
        state["cond_stage_model.model.text_projection"] = torch.randn((width, width), generator=g)
        state["cond_stage_model.model.logit_scale"] = torch.tensor(4.6052)
    else:
        state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        state["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.num_updates"] = torch.tensor(470000, dtype=torch.int32)
    return {k: v.contiguous() for k, v in state.items()}


def config_only_copy(folder, out):
    """The folder's JSON and text files: configs, tokenizer and scheduler, no weights."""
    for root, _, files in os.walk(folder):
        for f in files:
            if f.endswith((".json", ".txt")) and not f.endswith(".index.json"):
                rel = os.path.relpath(os.path.join(root, f), folder)
                os.makedirs(os.path.dirname(os.path.join(out, rel)), exist_ok=True)
                shutil.copy(os.path.join(root, f), os.path.join(out, rel))


def image(pipe):
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    return pipe(PROMPT, width=64, height=64, num_inference_steps=4, guidance_scale=7.5,
                latents=latents, output_type="np").images[0]


def check(path, folder, half):
    checkpoint = load_file(path)
    v2 = is_open_clip_model(checkpoint)
    assert v2 or is_clip_model(checkpoint), "diffusers finds no text encoder in the file"
    # diffusers tells SD 2 by its 1024-wide cross-attention, which the tiny one lacks.
    assert v2 or infer_diffusers_model_type(checkpoint) == "v1"
    variant = "fp16" if os.path.basename(folder) == "tiny-sd2" else None
    reference = StableDiffusionPipeline.from_pretrained(folder, variant=variant, torch_dtype=torch.float32)
    with tempfile.TemporaryDirectory() as config:
        config_only_copy(folder, config)
        single = StableDiffusionPipeline.from_single_file(path, config=config, local_files_only=True,
                                                         torch_dtype=torch.float32)
    for name in ("unet", "vae", "text_encoder"):
        want = {k: v for k, v in getattr(reference, name).state_dict().items() if "position_ids" not in k}
        got = getattr(single, name).state_dict()
        for k, v in want.items():
            v = v.half().float() if half else v
            assert torch.equal(got[k], v), f"{path}: {name}.{k} differs"
    a, b = image(reference), image(single)
    diff = abs(a - b).max()
    assert half or diff == 0, f"{path}: image differs by {diff}"
    print(f"{os.path.basename(path)}: diffusers' from_single_file = the folder's weights"
          f"{' in f16' if half else ''}; image max |diff| {diff:.2e}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--diffusers-repo", default="/work/.mirror/huggingface+diffusers/repo")
    args = parser.parse_args()
    script = diffusers_script(args.diffusers_repo)
    for name, half in (("tiny-sd1", False), ("tiny-sd1", True), ("tiny-sd2", False)):
        folder = os.path.join(FIX, name)
        state = convert(script, folder, v2=name == "tiny-sd2")
        if half:
            state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        path = os.path.join(FIX, f"{name}{'-fp16' if half else ''}.safetensors")
        save_file(state, path, metadata={"format": "pt"})
        check(path, folder, half)


if __name__ == "__main__":
    main()
