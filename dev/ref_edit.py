"""Dev-only: references for the edit pipeline (crates/unitune/tests/edit.rs) on tiny-sd1.

    python dev/ref_edit.py

Writes tests/fixtures/ref/edit.safetensors:
- one guided step: the UNet's outputs for the unconditional, baseline and edit prompts at one
  DDIM timestep (`step_eps_uncond`, `step_eps_baseline`, `step_eps_edit`), the guided predictions
  of classifier-free guidance, prompt guidance and both (`step_guided_{cfg,prompt,both}`), and the
  DDIM step taken with each (`step_prev_{cfg,prompt,both}`);
- two whole edits written out by hand (diffusers has no UniTune pipeline), as unitune defines them:
  `late_*`: late start from the VAE latent mean of tests/fixtures/ref/img2img-input.png, both
  guidances, a latent mask with per-step latent blend (diffusers' inpainting replacement);
  `noise_*`: from pure noise, prompt guidance alone, no mask. Each records its initial noise and
  the decoded sample (before any pixel compositing).

Prompts as unitune builds them: the token goes in front of the edit and baseline prompts.
Guidance, one UNet batch of 3: eps = eps_u + g (eps_b - eps_u) + w (eps_e - eps_b).
"""
import os

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
MODEL = os.path.join(FIX, "tiny-sd1")
OUT = os.path.join(FIX, "ref")
NEGATIVE = "blurry"
BASELINE = "beikkpic a photo"
EDIT = "beikkpic a red circle on a blue background"

tokenizer = CLIPTokenizer.from_pretrained(MODEL, subfolder="tokenizer")
text_encoder = CLIPTextModel.from_pretrained(MODEL, subfolder="text_encoder").eval()
unet = UNet2DConditionModel.from_pretrained(MODEL, subfolder="unet").eval()
vae = AutoencoderKL.from_pretrained(MODEL, subfolder="vae").eval()
SF = vae.config.scaling_factor


def embed(prompt):
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def combine(eps, g, w):
    """eps: (uncond, baseline, edit) predictions; g <= 1 drops uncond, w None drops the baseline."""
    u, b, e = eps
    if w is None:
        return u + g * (e - u)
    if g <= 1.0:
        return b + w * (e - b)
    return u + g * (b - u) + w * (e - b)


def unet_eps(x, t, prompts):
    emb = torch.cat([embed(p) for p in prompts])
    out = unet(torch.cat([x] * len(prompts)), t, encoder_hidden_states=emb).sample
    return out.chunk(len(prompts))


def one_step(t):
    sched = DDIMScheduler.from_pretrained(MODEL, subfolder="scheduler")
    sched.set_timesteps(10)
    ts = sched.timesteps[3]
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(11))
    u, b, e = unet_eps(x, ts, [NEGATIVE, BASELINE, EDIT])
    t["step_latents"], t["step_timestep"] = x, ts.reshape(1).float()
    t["step_eps_uncond"], t["step_eps_baseline"], t["step_eps_edit"] = u, b, e
    for name, (g, w) in {"cfg": (7.5, None), "prompt": (1.0, 9.0), "both": (6.0, 9.0)}.items():
        guided = combine((u, b, e), g, w)
        t[f"step_guided_{name}"] = guided
        t[f"step_prev_{name}"] = sched.step(guided, ts, x).prev_sample


def edit_loop(base, noise, steps, start, g, w, latent_keep):
    """unitune's edit loop; latent_keep: [1, 1, h/8, w/8] keep weight k, or None."""
    sched = DDIMScheduler.from_pretrained(MODEL, subfolder="scheduler")
    sched.set_timesteps(steps)
    prompts = ([NEGATIVE] if g > 1.0 else []) + [BASELINE, EDIT]
    base_latents = vae.encode(base).latent_dist.mean * SF
    if start >= 1.0:
        timesteps = sched.timesteps
        x = noise * sched.init_noise_sigma
    else:
        init = min(int(steps * start), steps)
        timesteps = sched.timesteps[steps - init:]
        x = sched.add_noise(base_latents, noise, timesteps[:1])
    for i, ts in enumerate(timesteps):
        out = unet_eps(x, ts, prompts)
        eps = combine(out if g > 1.0 else (None,) + tuple(out), g, w)
        x = sched.step(eps, ts, x).prev_sample
        if latent_keep is not None:
            base_t = sched.add_noise(base_latents, noise, timesteps[i + 1:i + 2]) if i + 1 < len(timesteps) else base_latents
            x = latent_keep * base_t + (1 - latent_keep) * x
    return vae.decode(x / SF).sample


def main():
    t = {}
    with torch.no_grad():
        one_step(t)
        image = np.asarray(Image.open(os.path.join(OUT, "img2img-input.png")).convert("RGB"), dtype=np.float32)
        base = torch.from_numpy(image / 127.5 - 1.0).permute(2, 0, 1).unsqueeze(0)  # [1, 3, 48, 64]
        # The mask x in 16..40, y in 8..32 feathered by 8 frees latent columns 1..=5, rows 0..=4
        # (unitune's mask test checks it); latent blend 0.1 inside: keep = 1 - m (1 - 0.1).
        m = torch.zeros((1, 1, 6, 8))
        m[:, :, 0:5, 1:6] = 1.0
        keep = 1.0 - m * (1.0 - 0.1)
        g = torch.Generator().manual_seed(12)
        t["late_noise"] = torch.randn((1, 4, 6, 8), generator=g)
        t["late_sample"] = edit_loop(base, t["late_noise"], 6, 0.7, 6.0, 9.0, keep)
        t["noise_noise"] = torch.randn((1, 4, 6, 8), generator=g)
        t["noise_sample"] = edit_loop(base, t["noise_noise"], 3, 1.0, 1.0, 9.0, None)
    save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(OUT, "edit.safetensors"))
    for k, v in t.items():
        print(k, tuple(v.shape), float(v.float().abs().mean()))


if __name__ == "__main__":
    main()
