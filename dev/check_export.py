"""Dev-only: check that a folder written by `unitune pretrain` is a real diffusers pipeline.

    /work/pyref/bin/python dev/check_export.py MODEL_DIR [UNITUNE_BINARY]

1. Loads MODEL_DIR with diffusers' StableDiffusionPipeline.from_pretrained and reports any
   missing or unexpected weights (from_pretrained's loading info, per component).
2. For a few prompts, draws initial latents with torch, runs diffusers' txt2img (DDIM, from the
   folder's scheduler config) and `unitune generate --init-noise` with the same latents, steps and
   guidance, and compares the two PNGs pixel by pixel (0..255).

Needs no fixture; prints one line per prompt and exits non-zero if a difference exceeds 2 levels.
"""
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import save_file

PROMPTS = [
    "a red circle on a blue background",
    "a small yellow star left of a green square on a striped purple background",
    "",
]
STEPS = 20
GUIDANCE = 4.0
TOLERANCE = 2  # 8-bit levels


def main():
    model = sys.argv[1]
    binary = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(__file__), "..", "target", "release", "unitune")
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    report_loading(model)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    print(f"loaded {model}: {type(pipe.scheduler).__name__}, {size}x{size}, "
          f"scaling_factor {pipe.vae.config.scaling_factor:.5f}, dtypes unet {pipe.unet.dtype} text {pipe.text_encoder.dtype}")
    worst = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, prompt in enumerate(PROMPTS):
            g = torch.Generator().manual_seed(i)
            latents = torch.randn((1, pipe.unet.config.in_channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor), generator=g)
            noise_path = os.path.join(tmp, f"latents{i}.safetensors")
            save_file({"latents": latents.contiguous()}, noise_path)
            ours_path = os.path.join(tmp, f"ours{i}.png")
            subprocess.run([binary, "generate", "--model", model, "--prompt", prompt, "--steps", str(STEPS),
                            "--guidance", str(GUIDANCE), "--init-noise", noise_path, "--output", ours_path],
                           check=True, capture_output=True)
            theirs = pipe(prompt, latents=latents, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np").images[0]
            theirs = (theirs * 255).round().astype(np.int32)
            ours = np.asarray(Image.open(ours_path).convert("RGB")).astype(np.int32)
            diff = np.abs(ours - theirs)
            worst = max(worst, int(diff.max()))
            print(f"{prompt!r}: max |diff| {diff.max()} levels, mean {diff.mean():.4f}")
    print("OK" if worst <= TOLERANCE else f"FAIL: {worst} > {TOLERANCE}")
    sys.exit(0 if worst <= TOLERANCE else 1)


def report_loading(model):
    """Missing / unexpected keys per component, as from_pretrained reports them."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    for name, cls in [("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)]:
        _, info = cls.from_pretrained(os.path.join(model, name), output_loading_info=True)
        missing = info.get("missing_keys", [])
        unexpected = info.get("unexpected_keys", [])
        mismatched = info.get("mismatched_keys", [])
        print(f"{name}: {len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} mismatched"
              + (f" e.g. {list(missing)[:3]} {list(unexpected)[:3]}" if missing or unexpected else ""))
        if missing or unexpected or mismatched:
            sys.exit(1)


if __name__ == "__main__":
    main()
