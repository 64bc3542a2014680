"""PyTorch + diffusers counterpart of `unitune bench`: the same UNet presets, inputs of the same
shapes, the same phases and the same JSON keys, so that the two can be compared on one machine.

    /work/pyref/bin/python dev/bench_torch.py tune-step --preset medium --batch 4 --iters 5 --json
    /work/pyref/bin/python dev/bench_torch.py unet --preset medium --batch 4 --iters 5 --json

Times are medians over --iters iterations after --warmup; peak_rss_mb is VmHWM from
/proc/self/status (MiB), which includes building the model. CPU runs use 2 threads
(torch.set_num_threads(2)), the cores of the machine BENCHMARKS.md was measured on.
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from transformers.optimization import Adafactor

# Each preset: (config overrides, latent size, context tokens); mirrors `Preset` in crates/unitune-lab/src/speed.rs.
PRESETS = {
    "tiny": (
        dict(
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            attention_head_dim=4,
            cross_attention_dim=32,
            norm_num_groups=8,
        ),
        16,
        8,
    ),
    "medium": (
        dict(
            block_out_channels=(128, 256, 512),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=2,
            attention_head_dim=8,
            cross_attention_dim=768,
            norm_num_groups=32,
        ),
        32,
        77,
    ),
    "sd15": (
        dict(
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            layers_per_block=2,
            attention_head_dim=8,
            cross_attention_dim=768,
            norm_num_groups=32,
        ),
        64,
        77,
    ),
}
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def peak_rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", choices=["unet", "tune-step"])
    p.add_argument("--preset", choices=PRESETS, default="medium")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=DTYPES, default="f32")
    p.add_argument("--cuda", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--optimizer", choices=["adafactor", "adamw"], default="adafactor")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--gradient-checkpointing", action="store_true", help="tune-step only")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.iters < 1 or args.batch < 1:
        p.error("--iters and --batch must be at least 1")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.cuda else "cpu")
    dtype = DTYPES[args.dtype]
    overrides, size, tokens = PRESETS[args.preset]
    unet = UNet2DConditionModel(**overrides).to(device)
    if dtype != torch.float32:
        unet = unet.to(dtype)
    # diffusers' default attention processor: F.scaled_dot_product_attention (a fused kernel on CPU too).
    params = sum(p.numel() for p in unet.parameters())
    b = args.batch
    randn = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)
    sample = randn(b, 4, size, size)
    context = randn(b, tokens, overrides["cross_attention_dim"])
    target = randn(b, 4, size, size)
    timesteps = torch.randint(0, 1000, (b,), device=device)

    sync = torch.cuda.synchronize if args.cuda else (lambda: None)
    loss_fn = lambda: F.mse_loss(unet(sample, timesteps, context).sample.float(), target.float())

    if args.bench == "unet":
        names = ["forward_s", "forward_backward_s"]
    else:
        names = ["forward_s", "backward_s", "optimizer_s", "step_s"]
        if args.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if args.optimizer == "adafactor":
            opt = Adafactor(
                unet.parameters(), lr=args.lr, relative_step=False, scale_parameter=False, warmup_init=False
            )
        else:
            opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    samples = {name: [] for name in names}
    for i in range(args.warmup + args.iters):
        if args.bench == "unet":
            t0 = time.perf_counter()
            with torch.no_grad():
                unet(sample, timesteps, context)
            sync()
            t1 = time.perf_counter()
            loss_fn().backward()
            sync()
            t2 = time.perf_counter()
            unet.zero_grad(set_to_none=True)
            times = [t1 - t0, t2 - t1]
        else:
            t0 = time.perf_counter()
            loss = loss_fn()
            sync()
            t1 = time.perf_counter()
            loss.backward()
            sync()
            t2 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            t3 = time.perf_counter()
            times = [t1 - t0, t2 - t1, t3 - t2, t3 - t0]
        if i >= args.warmup:
            for name, t in zip(names, times):
                samples[name].append(t)

    report = {"bench": args.bench, "impl": "torch", "preset": args.preset, "batch": b, "iters": args.iters}
    report["params"] = params
    report.update({name: round(statistics.median(s), 4) for name, s in samples.items()})
    rss = peak_rss_mb()
    report["peak_rss_mb"] = round(rss) if rss is not None else None
    if args.json:
        print(json.dumps(report, separators=(",", ":")))
    else:
        print(f"{args.bench} bench (torch), preset {args.preset}, batch {b}, {params / 1e6:.1f} M weights, median of {args.iters}:")
        for name in names + ["peak_rss_mb"]:
            print(f"  {name:<20} {report[name]:>8}")


if __name__ == "__main__":
    main()
