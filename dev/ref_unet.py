"""Dev-only: reference outputs and gradients of diffusers' UNet2DConditionModel for the Rust tests.

Run with the dev venv (torch, diffusers 0.42.1, safetensors):

    /work/pyref/bin/python dev/ref_unet.py

Writes tests/fixtures/ref/unet.safetensors. For each tiny pipeline (`sd1`, `sd2`):
  `{m}.sample` [2, 4, 8, 8], `{m}.timesteps` [2] (one per sample, as in training),
  `{m}.encoder_hidden_states` [2, 77, 32] and the UNet's output `{m}.out`;
  `{m}.odd.*` the same for a latent whose size is not divisible by 2^num_upsamplers
  (diffusers' forward_upsample_size path).
For `sd1` also a training step: `sd1.grad.target`, the loss mean((unet(x, t, c) - target)^2) as
`sd1.grad.loss`, and torch's gradient of that loss for every parameter as `sd1.grad.<name>`
(computed in float64 so the reference is exact to f32 precision; stored as f32).
`sd1.odd_grad.*`: a [1, 4, 6, 9] training step (height even, width odd) with the gradients of the
input (`d_sample`) and of `conv_in.weight` (`d_conv_in.weight`), which flow back through every
downsampler.
"""
import os

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
ODD_SIZES = {"sd1": (5, 7), "sd2": (6, 10)}


def load(name):
    unet = UNet2DConditionModel.from_pretrained(os.path.join(ROOT, f"tiny-{name}", "unet"))
    return unet.eval().float()


def main():
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name in ["sd1", "sd2"]:
        unet = load(name)
        sample = torch.randn(2, 4, 8, 8, generator=gen)
        timesteps = torch.tensor([981.0, 1.0])
        context = torch.randn(2, 77, 32, generator=gen)
        h, w = ODD_SIZES[name]
        odd_sample = torch.randn(1, 4, h, w, generator=gen)
        odd_timesteps = torch.tensor([500.0])
        odd_context = torch.randn(1, 77, 32, generator=gen)
        with torch.no_grad():
            out[f"{name}.out"] = unet(sample, timesteps, context).sample
            out[f"{name}.odd.out"] = unet(odd_sample, odd_timesteps, odd_context).sample
        out.update({
            f"{name}.sample": sample,
            f"{name}.timesteps": timesteps,
            f"{name}.encoder_hidden_states": context,
            f"{name}.odd.sample": odd_sample,
            f"{name}.odd.timesteps": odd_timesteps,
            f"{name}.odd.encoder_hidden_states": odd_context,
        })
        if name == "sd1":
            target = torch.randn(2, 4, 8, 8, generator=gen)
            unet = unet.double()
            pred = unet(sample.double(), timesteps.double(), context.double()).sample
            loss = ((pred - target.double()) ** 2).mean()
            loss.backward()
            out["sd1.grad.target"] = target
            out["sd1.grad.loss"] = loss.detach().reshape(1)
            for pname, param in unet.named_parameters():
                out[f"sd1.grad.{pname}"] = param.grad
            # Height even, width odd: the downsampler's input gradient at mixed parities.
            unet.zero_grad()
            x = torch.randn(1, 4, 6, 9, generator=gen).double().requires_grad_()
            t = torch.tensor([250.0])
            c = torch.randn(1, 77, 32, generator=gen)
            target = torch.randn(1, 4, 6, 9, generator=gen)
            loss = ((unet(x, t.double(), c.double()).sample - target.double()) ** 2).mean()
            loss.backward()
            out.update({
                "sd1.odd_grad.sample": x.detach(),
                "sd1.odd_grad.timesteps": t,
                "sd1.odd_grad.encoder_hidden_states": c,
                "sd1.odd_grad.target": target,
                "sd1.odd_grad.loss": loss.detach().reshape(1),
                "sd1.odd_grad.d_sample": x.grad,
                "sd1.odd_grad.d_conv_in.weight": unet.conv_in.weight.grad,
            })
    out = {k: v.detach().float().contiguous() for k, v in out.items()}
    os.makedirs(os.path.join(ROOT, "ref"), exist_ok=True)
    path = os.path.join(ROOT, "ref", "unet.safetensors")
    save_file(out, path)
    print(f"wrote {path}: {len(out)} tensors, {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
