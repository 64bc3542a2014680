"""Dev-only: end-to-end references for txt2img and img2img on the tiny fixture pipelines.

    python dev/ref_pipelines.py

Writes tests/fixtures/ref/pipelines.safetensors (images as float32 HWC in [0, 1], before 8-bit
rounding, and every noise tensor the pipeline drew, so Rust can replay them), the img2img input
image tests/fixtures/ref/img2img-input.png, and tests/fixtures/ref/sd1-init-noise.safetensors, a
`--init-noise` file for the CLI test.
"""
import os

import numpy as np
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import save_file

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
OUT = os.path.join(FIX, "ref")
PROMPT = "a photo of a red circle on a blue background"
NEGATIVE = "blurry, low quality"


def load(name, cls):
    variant = "fp16" if name == "tiny-sd2" else None
    pipe = cls.from_pretrained(os.path.join(FIX, name), variant=variant, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def txt2img(name, width, height, steps, guidance, seed):
    pipe = load(name, StableDiffusionPipeline)
    latents = torch.randn((1, 4, height // 8, width // 8), generator=torch.Generator().manual_seed(seed))
    image = pipe(PROMPT, negative_prompt=NEGATIVE, width=width, height=height, num_inference_steps=steps,
                 guidance_scale=guidance, latents=latents.clone(), output_type="np").images[0]
    return latents, torch.from_numpy(image.astype(np.float32))


def img2img(name, image, strength, steps, guidance, seed):
    pipe = load(name, StableDiffusionImg2ImgPipeline)
    # The pipeline draws the VAE posterior sample first, then the noise it adds: record both.
    g = torch.Generator().manual_seed(seed)
    shape = (1, 4, image.height // 8, image.width // 8)
    sample_noise = torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g)
    out = pipe(PROMPT, image=image, strength=strength, num_inference_steps=steps, guidance_scale=guidance,
               negative_prompt=NEGATIVE, generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
    return sample_noise, noise, torch.from_numpy(out.astype(np.float32))


def main():
    os.makedirs(OUT, exist_ok=True)
    t = {}
    t["sd1_txt2img_latents"], t["sd1_txt2img_image"] = txt2img("tiny-sd1", 64, 64, 8, 7.5, 0)
    # Guidance 1.0: the unconditional pass is skipped.
    t["sd1_noguide_latents"], t["sd1_noguide_image"] = txt2img("tiny-sd1", 64, 64, 4, 1.0, 1)
    # Non-square, and a latent size (9 x 5) that is not a multiple of the UNet's downsampling.
    t["sd2_txt2img_latents"], t["sd2_txt2img_image"] = txt2img("tiny-sd2", 72, 40, 6, 5.0, 2)

    yy, xx = np.mgrid[0:48, 0:64]
    rgb = np.stack([xx * 4, yy * 5, 255 - xx * 3], axis=-1).clip(0, 255).astype(np.uint8)
    rgb[12:36, 20:44] = [250, 40, 30]
    image = Image.fromarray(rgb)
    image.save(os.path.join(OUT, "img2img-input.png"))
    t["sd1_img2img_sample_noise"], t["sd1_img2img_noise"], t["sd1_img2img_image"] = img2img("tiny-sd1", image, 0.6, 10, 7.5, 3)
    t["sd2_img2img_sample_noise"], t["sd2_img2img_noise"], t["sd2_img2img_image"] = img2img("tiny-sd2", image, 0.75, 8, 4.0, 4)

    save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(OUT, "pipelines.safetensors"))
    save_file({"latents": t["sd1_txt2img_latents"].contiguous()}, os.path.join(OUT, "sd1-init-noise.safetensors"))
    for k, v in t.items():
        print(k, tuple(v.shape), float(v.float().abs().mean()))


if __name__ == "__main__":
    main()
