"""Dev-only: references for unitune's tuning stage (crates/unitune/tests/tune.rs).

Run with the dev venv (torch, diffusers 0.42.1, transformers, safetensors):

    /work/pyref/bin/python dev/ref_tune_step.py

1. Training-step parity, written to tests/fixtures/ref/tune_step.safetensors. For each tiny pipeline
   `m` in (sd1: epsilon, sd2: v_prediction), in float64 so that the reference is exact to f32
   precision: latents = vae.encode(img).latent_dist.mean * scaling_factor of
   tests/fixtures/ref/img2img-input.png (64x48, pixels / 127.5 - 1) repeated to batch 4, the text
   embedding of "beikkpic" (padding to 77), then two steps of DreamBooth's loop: add_noise, target by
   prediction_type, F.mse_loss, backward, transformers' Adafactor (lr LR, relative_step=False,
   scale_parameter=False, warmup_init=False) on the UNet weights unitune's `TrainableLayers::Most`
   selects (all but norms and time_embedding). Weights are compared after one step only: from the
   second step on, Adafactor divides each entry of an unfactored (1-D) weight's gradient by its own
   running RMS, so its tiniest gradient entries, whose f32 error is large relative to themselves, get
   full-size updates, and f32 cannot match float64 there to 1e-5 (measured: up to 8e-5 of the change).
   transformers' optimizer state over several steps is checked on its own by dev/ref_adafactor.py. Keys:
     {m}.noise.{k} [4, 4, 6, 8] f32, {m}.timesteps.{k} [4] i64   inputs of step k (1-based)
     {m}.loss.{k} [1] f64                                          loss of step k (before its update)
   and the weights after step 1 (step 2's loss checks that they are the ones the UNet then uses):
     {m}.delta.{name}                                              tuned minus base, whole tensor, for FULL
     {m}.stats.{name} [2] f64, {m}.picks.{name} [<=16] f64         for every trainable tensor: the L2 norm
                                                                   and largest magnitude of its change, and
                                                                   the change at flat indices
                                                                   i * (n - 1) // 15, i = 0..15
2. Loss falls: 128 steps, batch 4, on tests/fixtures/ref/tune-input.png (64x64, written here from
   img2img-input.png), layers Most, in float32 as a real tune runs, with torch's own noise. Prints the
   mean loss of the first and last 16 steps for the paper's lr 1e-4 and for CURVE_LR, under transformers'
   factoring and under unitune's default (`TwoLargest { min_dim_size: 128 }`: no weight of the tiny UNet
   has two dims >= 128, so every second moment is unfactored, emulated by stepping flattened copies),
   and writes them to tests/fixtures/ref/tune_loss.json for the record.
"""
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer
from transformers.optimization import Adafactor

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
TOKEN = "beikkpic"
BATCH = 4
LR = 1e-3
# Per-sample timesteps of each parity step: both ends of the schedule and the middle.
TIMESTEPS = [[17, 999, 503, 250], [0, 742, 121, 888]]
FULL = [
    "conv_in.weight",
    "down_blocks.0.resnets.0.conv1.weight",
    "down_blocks.0.attentions.0.proj_in.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
    "mid_block.resnets.0.time_emb_proj.weight",
    "up_blocks.0.resnets.0.conv_shortcut.weight",
    "conv_out.bias",
]
CURVE_STEPS = 128
CURVE_LR = 1e-3
WINDOW = 16


def most(name):
    """unitune's TrainableLayers::Most."""
    return not name.startswith("time_embedding.") and not any("norm" in part for part in name.split("."))


def load(name, dtype):
    d = os.path.join(ROOT, f"tiny-{name}")
    variant = "fp16" if name == "sd2" else None  # tiny-sd2 has its VAE only as fp16
    unet = UNet2DConditionModel.from_pretrained(d, subfolder="unet", torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(d, subfolder="vae", variant=variant, torch_dtype=dtype)
    text_encoder = CLIPTextModel.from_pretrained(d, subfolder="text_encoder", dtype=dtype)
    tokenizer = CLIPTokenizer.from_pretrained(d, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(d, subfolder="scheduler")
    return unet, vae, text_encoder, tokenizer, scheduler


def frozen_inputs(vae, text_encoder, tokenizer, image_path, dtype):
    """Latent mean of the image and the token's embedding, each repeated to the batch."""
    pixels = np.array(Image.open(image_path).convert("RGB"))
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].to(dtype) / 127.5 - 1
    ids = tokenizer(TOKEN, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        latents = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        text = text_encoder(ids)[0]
    return latents.repeat(BATCH, 1, 1, 1), text.repeat(BATCH, 1, 1)


def trainable(unet):
    params = {}
    for name, p in unet.named_parameters():
        p.requires_grad_(most(name))
        if most(name):
            params[name] = p
    return params


def train_step(unet, scheduler, latents, text, noise, timesteps):
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = scheduler.get_velocity(latents, noise, timesteps)
    pred = unet(noisy, timesteps, text).sample
    loss = F.mse_loss(pred, target, reduction="mean")
    loss.backward()
    return loss


def pick_indices(n):
    """Up to 16 evenly spaced flat indices, in integer arithmetic (the Rust test computes the same)."""
    k = min(16, n)
    return torch.arange(k) * (n - 1) // max(k - 1, 1)


def dump_changes(out, name, params, base):
    for n, p in params.items():
        delta = (p.detach() - base[n]).flatten()
        out[f"{name}.stats.{n}"] = torch.stack([delta.norm(), delta.abs().max()])
        out[f"{name}.picks.{n}"] = delta[pick_indices(delta.numel())]
        if n in FULL:
            out[f"{name}.delta.{n}"] = (p.detach() - base[n]).float()


def adafactor(params, lr):
    return Adafactor(params, lr=lr, relative_step=False, scale_parameter=False, warmup_init=False)


def parity(out):
    gen = torch.Generator().manual_seed(0)
    image = os.path.join(ROOT, "ref", "img2img-input.png")
    for name in ["sd1", "sd2"]:
        unet, vae, text_encoder, tokenizer, scheduler = load(name, torch.float64)
        latents, text = frozen_inputs(vae, text_encoder, tokenizer, image, torch.float64)
        params = trainable(unet)
        base = {n: p.detach().clone() for n, p in params.items()}
        opt = adafactor(list(params.values()), LR)
        for k, ts in enumerate(TIMESTEPS, start=1):
            noise = torch.randn(latents.shape, generator=gen)  # f32, as the Rust test feeds it
            timesteps = torch.tensor(ts)
            loss = train_step(unet, scheduler, latents, text, noise.double(), timesteps)
            opt.step()
            opt.zero_grad()
            out[f"{name}.noise.{k}"] = noise
            out[f"{name}.timesteps.{k}"] = timesteps
            out[f"{name}.loss.{k}"] = loss.detach().reshape(1)
            print(f"{name} step {k}: loss {loss.item():.6f}")
            if k == 1:
                dump_changes(out, name, params, base)


class FlatAdafactor:
    """transformers' Adafactor stepping flattened copies of the parameters: every second moment
    unfactored, which is what unitune's default factoring gives on the tiny UNet."""

    def __init__(self, params, lr):
        self.params = params
        self.flat = [torch.nn.Parameter(p.detach().reshape(-1).clone()) for p in params]
        self.opt = adafactor(self.flat, lr)

    def step(self):
        for p, f in zip(self.params, self.flat):
            f.grad = p.grad.reshape(-1).clone()
        self.opt.step()
        with torch.no_grad():
            for p, f in zip(self.params, self.flat):
                p.copy_(f.reshape(p.shape))

    def zero_grad(self):
        for p in self.params:
            p.grad = None


def curve(name, lr, flat):
    torch.manual_seed(0)
    unet, vae, text_encoder, tokenizer, scheduler = load(name, torch.float32)
    latents, text = frozen_inputs(vae, text_encoder, tokenizer, os.path.join(ROOT, "ref", "tune-input.png"), torch.float32)
    params = list(trainable(unet).values())
    opt = FlatAdafactor(params, lr) if flat else adafactor(params, lr)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(CURVE_STEPS):
        noise = torch.randn(latents.shape, generator=gen)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (BATCH,), generator=gen)
        losses.append(train_step(unet, scheduler, latents, text, noise, timesteps).item())
        opt.step()
        opt.zero_grad()
    first, last = np.mean(losses[:WINDOW]), np.mean(losses[-WINDOW:])
    return {"first": float(first), "last": float(last), "ratio": float(last / first)}


def main():
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead (and spin against other jobs)
    out = {}
    parity(out)
    path = os.path.join(ROOT, "ref", "tune_step.safetensors")
    save_file({k: v.contiguous() for k, v in out.items()}, path)
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")

    src = Image.open(os.path.join(ROOT, "ref", "img2img-input.png")).convert("RGB")
    src.resize((64, 64), Image.BICUBIC).save(os.path.join(ROOT, "ref", "tune-input.png"))
    record = {"steps": CURVE_STEPS, "batch": BATCH, "layers": "most", "window": WINDOW, "runs": []}
    for name in ["sd1", "sd2"]:
        for lr in [1e-4, CURVE_LR]:
            for factoring, flat in [("last-two (transformers)", False), ("unfactored (unitune default here)", True)]:
                r = curve(name, lr, flat)
                record["runs"].append({"model": name, "lr": lr, "factoring": factoring, **r})
                print(f"{name} lr {lr:g} {factoring}: loss {r['first']:.4f} -> {r['last']:.4f} (x{r['ratio']:.3f})")
    path = os.path.join(ROOT, "ref", "tune_loss.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
