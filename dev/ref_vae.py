"""Dev-only: reference outputs of diffusers' AutoencoderKL on the tiny fixture VAEs.

    /work/pyref/bin/python dev/ref_vae.py

Writes tests/fixtures/ref/vae.safetensors. Inputs are shared by both fixtures:
  x_square [1, 3, 64, 64], x_wide [1, 3, 40, 56]: images in [-1, 1] to encode;
  z_square [1, 4, 8, 8],   z_wide [1, 4, 5, 7]:   unscaled latents to decode;
  noise [1, 4, 8, 8]: the draw behind `sd1.sample_square`.
Per fixture (`sd1.`, `sd2.`): `mean_*`, `logvar_*` of the posterior for x_*, `decoded_*` for z_*.
The SD2 VAE exists only as the fp16 variant; it is loaded as such and run in float32.
"""
import os

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")


def main():
    g = torch.Generator().manual_seed(0)
    # tanh keeps the images inside [-1, 1] while covering the range.
    inputs = {
        "x_square": torch.tanh(torch.randn(1, 3, 64, 64, generator=g)),
        "x_wide": torch.tanh(torch.randn(1, 3, 40, 56, generator=g)),
        "z_square": torch.randn(1, 4, 8, 8, generator=g) * 3.0,
        "z_wide": torch.randn(1, 4, 5, 7, generator=g) * 3.0,
    }
    out = dict(inputs)
    for name, variant in [("sd1", None), ("sd2", "fp16")]:
        vae = AutoencoderKL.from_pretrained(os.path.join(ROOT, f"tiny-{name}", "vae"), variant=variant)
        vae = vae.float().eval()
        with torch.no_grad():
            for shape in ["square", "wide"]:
                posterior = vae.encode(inputs[f"x_{shape}"]).latent_dist
                out[f"{name}.mean_{shape}"] = posterior.mean
                out[f"{name}.logvar_{shape}"] = posterior.logvar
                out[f"{name}.decoded_{shape}"] = vae.decode(inputs[f"z_{shape}"]).sample
            if name == "sd1":
                posterior = vae.encode(inputs["x_square"]).latent_dist
                # randn_tensor on CPU draws exactly torch.randn with the same generator.
                out["noise"] = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(1))
                out["sd1.sample_square"] = posterior.sample(generator=torch.Generator().manual_seed(1))
    os.makedirs(os.path.join(ROOT, "ref"), exist_ok=True)
    path = os.path.join(ROOT, "ref", "vae.safetensors")
    save_file({k: v.contiguous() for k, v in out.items()}, path)
    print(path, os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main()
