"""PyTorch + diffusers counterpart of `unitune bench`: the same UNet presets, inputs of the same
shapes, the same phases and the same JSON keys, so that the two can be compared on one machine.

    /work/pyref/bin/python dev/bench_torch.py tune-step --preset medium --batch 4 --iters 5 --json
    /work/pyref/bin/python dev/bench_torch.py unet --preset medium --batch 4 --iters 5 --json

Times are medians over --iters iterations after --warmup; peak_rss_mb is VmHWM from
/proc/self/status (MiB), which includes building the model. CPU runs use 2 threads
(torch.set_num_threads(2)), the cores of the machine BENCHMARKS.md was measured on.
`tune-step --master-weights` trains f32 weights under autocast in --dtype (with a GradScaler in
f16): PyTorch's mixed precision, the counterpart of unitune's half-precision weights with f32
master copies.

The whole pipeline, for `unitune tune` and `unitune edit` (dev/gpu-check.sh runs both sides):

    dev/bench_torch.py make-model --preset sd15 --output DIR --cuda   # random weights, SD 1.5's shapes
    dev/bench_torch.py tune --model DIR --steps 128 --size 512 --dtype f16 --master-weights --cuda --json
    dev/bench_torch.py edit --model DIR --steps 50 --size 512 --dtype f16 --cuda --json

make-model writes a diffusers folder that unitune loads too: random UNet, VAE and CLIP text
encoder of the preset's shapes (sd15: Stable Diffusion 1.5's), the tiny fixture's tokenizer and
DDIM scheduler. `tune` is UniTune's tune as `unitune tune` runs it (the image and the token's
prompt encoded once, then --steps steps of batch --batch on copies of the latents with their own
noise and timesteps, Adafactor on every UNet weight but norms and the timestep MLP); `edit` is a
DDIM sampling with classifier-free guidance, run twice (the second is timed). Both print
seconds: load_s (building the pipeline), then the work (first_step_s and the median step_s,
loop_s; first_edit_s and edit_s).
"""

import argparse
import json
import os
import shutil
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
FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "tiny-sd1")
# The rest of a pipeline per preset: VAE (block channels, layers per block, norm groups) and CLIP
# text encoder (hidden, MLP, layers, heads, vocabulary); the text encoder's width is the UNet's
# cross_attention_dim. sd15 has Stable Diffusion 1.5's shapes (CLIP ViT-L/14's text tower); the
# vocabulary is CLIP's size, of which the fixture's tokenizer uses the first 4514 ids.
PIPELINES = {
    "tiny": dict(vae=((8, 16, 16, 16), 1, 8), text=(32, 37, 2, 4, 4514)),
    "medium": dict(vae=((128, 256, 512, 512), 2, 32), text=(768, 3072, 12, 12, 49408)),
    "sd15": dict(vae=((128, 256, 512, 512), 2, 32), text=(768, 3072, 12, 12, 49408)),
}


def peak_rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def make_model(args):
    """A random pipeline of the preset's shapes in args.output, weights in --dtype."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    device = torch.device("cuda" if args.cuda else "cpu")
    overrides, _, _ = PRESETS[args.preset]
    (channels, layers, groups), (hidden, mlp, n_layers, heads, vocab) = PIPELINES[args.preset].values()
    with open(os.path.join(FIXTURE, "text_encoder", "config.json")) as f:
        text_cfg = json.load(f)
    text_cfg.update(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=n_layers,
                    num_attention_heads=heads, vocab_size=vocab, projection_dim=hidden)
    assert hidden == overrides["cross_attention_dim"], "the text encoder must fit the UNet"
    out = args.output
    os.makedirs(out, exist_ok=True)
    for part in ("tokenizer", "scheduler"):
        shutil.copytree(os.path.join(FIXTURE, part), os.path.join(out, part), dirs_exist_ok=True)
    shutil.copy(os.path.join(FIXTURE, "model_index.json"), out)
    torch.manual_seed(args.seed)
    dtype = DTYPES[args.dtype]
    # Built on the device: initialising SD 1.5's 1.07 G weights on the CPU takes a minute.
    with torch.device(device):
        parts = {
            "unet": UNet2DConditionModel(**overrides),
            "vae": AutoencoderKL(
                block_out_channels=channels,
                down_block_types=("DownEncoderBlock2D",) * len(channels),
                up_block_types=("UpDecoderBlock2D",) * len(channels),
                layers_per_block=layers,
                norm_num_groups=groups,
                latent_channels=4,
                sample_size=PRESETS[args.preset][1] * 8,
            ),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**{k: v for k, v in text_cfg.items()
                                                          if k not in ("architectures", "dtype")})),
        }
    for name, model in parts.items():
        model.to(dtype).save_pretrained(os.path.join(out, name), safe_serialization=True)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()}
    return {"bench": "make-model", "impl": "torch", "preset": args.preset, "params": params}


def load_pipeline(args, dtype):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(args.model, dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cuda" if args.cuda else "cpu")


def tune(args, sync):
    """UniTune's tune, as `unitune tune` runs it; with --master-weights the weights stay f32 and
    the UNet computes in --dtype under autocast."""
    t0 = time.perf_counter()
    amp = args.master_weights and args.dtype != "f32"
    pipe = load_pipeline(args, torch.float32 if amp or args.dtype == "f32" else DTYPES[args.dtype])
    unet, device = pipe.unet, pipe.device
    sync()
    load_s = time.perf_counter() - t0
    # The same layers as `--layers most`: every UNet weight but norms and the timestep MLP.
    trained = []
    for name, p in unet.named_parameters():
        p.requires_grad_(not name.startswith("time_embedding.") and not any("norm" in part for part in name.split(".")))
        if p.requires_grad:
            trained.append(p)
    opt = Adafactor(trained, lr=args.lr, relative_step=False, scale_parameter=False, warmup_init=False)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and args.dtype == "f16")
    autocast = lambda: torch.autocast(device.type, dtype=DTYPES[args.dtype], enabled=amp)
    times, t_start = [], time.perf_counter()
    with torch.no_grad():
        image = torch.rand(1, 3, args.size, args.size, device=device, dtype=pipe.vae.dtype) * 2 - 1
        latents = pipe.vae.encode(image).latent_dist.sample() * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer("beikkpic", padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             return_tensors="pt").input_ids.to(device)
        context = pipe.text_encoder(ids)[0]
    b = args.batch
    latents, context = latents.expand(b, -1, -1, -1).float(), context.expand(b, -1, -1)
    noise_schedule = pipe.scheduler.alphas_cumprod.to(device)
    for _ in range(args.steps):
        noise = torch.randn_like(latents)
        t = torch.randint(0, len(noise_schedule), (b,), device=device)
        a = noise_schedule[t].view(b, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        with autocast():
            pred = unet(noisy.to(unet.dtype), t, context.to(unet.dtype)).sample
        loss = F.mse_loss(pred.float(), noise)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        loss.item()  # waits for the step, as unitune reads each step's loss
        times.append(time.perf_counter() - t_start)
    steps = [b - a for a, b in zip([0.0] + times, times)]
    return {"bench": "tune", "impl": "torch", "batch": b, "steps": args.steps, "size": args.size,
            "load_s": round(load_s, 3), "first_step_s": round(times[0], 3),
            "step_s": round(statistics.median(steps[1:] or steps), 4), "loop_s": round(times[-1], 3)}


def edit(args, sync):
    """DDIM sampling with classifier-free guidance at --size, twice: the second is timed."""
    t0 = time.perf_counter()
    pipe = load_pipeline(args, DTYPES[args.dtype])
    sync()
    load_s = time.perf_counter() - t0
    runs = []
    for prompt in ("beikkpic a dog", "beikkpic a cat"):
        t = time.perf_counter()
        pipe(prompt, height=args.size, width=args.size, num_inference_steps=args.steps,
             guidance_scale=args.guidance, generator=torch.Generator(pipe.device).manual_seed(args.seed))
        sync()
        runs.append(time.perf_counter() - t)
    return {"bench": "edit", "impl": "torch", "steps": args.steps, "size": args.size,
            "load_s": round(load_s, 3), "first_edit_s": round(runs[0], 3), "edit_s": round(runs[1], 3)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", choices=["unet", "tune-step", "make-model", "tune", "edit"])
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
    p.add_argument("--master-weights", action="store_true",
                   help="tune-step, tune: f32 weights, autocast to --dtype (GradScaler in f16)")
    p.add_argument("--output", help="make-model: the folder to write")
    p.add_argument("--model", help="tune, edit: the pipeline folder")
    p.add_argument("--steps", type=int, default=128, help="tune: training steps; edit: DDIM steps")
    p.add_argument("--size", type=int, default=512, help="tune, edit: picture side in pixels")
    p.add_argument("--guidance", type=float, default=10.0, help="edit: classifier-free guidance scale")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.iters < 1 or args.batch < 1 or args.steps < 1:
        p.error("--iters, --batch and --steps must be at least 1")
    if (args.bench == "make-model") != (args.output is not None):
        p.error("--output goes with make-model, and make-model needs it")
    if (args.bench in ("tune", "edit")) != (args.model is not None):
        p.error("--model goes with tune and edit, which need it")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    sync = torch.cuda.synchronize if args.cuda else (lambda: None)
    pipeline_bench = {"make-model": lambda: make_model(args), "tune": lambda: tune(args, sync),
                      "edit": lambda: edit(args, sync)}.get(args.bench)
    if pipeline_bench:
        report = pipeline_bench()
        print(json.dumps(report, separators=(",", ":")) if args.json else report)
        return
    device = torch.device("cuda" if args.cuda else "cpu")
    dtype = DTYPES[args.dtype]
    overrides, size, tokens = PRESETS[args.preset]
    unet = UNet2DConditionModel(**overrides).to(device)
    amp = args.master_weights and dtype != torch.float32
    if dtype != torch.float32 and not amp:
        unet = unet.to(dtype)
    # diffusers' default attention processor: F.scaled_dot_product_attention (a fused kernel on CPU too).
    params = sum(p.numel() for p in unet.parameters())
    b = args.batch
    # Under autocast the inputs stay f32, as the weights: autocast casts what each op computes in.
    randn = lambda *shape: torch.randn(*shape, device=device, dtype=torch.float32 if amp else dtype)
    sample = randn(b, 4, size, size)
    context = randn(b, tokens, overrides["cross_attention_dim"])
    target = randn(b, 4, size, size)
    timesteps = torch.randint(0, 1000, (b,), device=device)

    def loss_fn():
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            pred = unet(sample, timesteps, context).sample
        return F.mse_loss(pred.float(), target.float())

    scaler = torch.amp.GradScaler(device.type, enabled=amp and dtype == torch.float16)

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
            scaler.scale(loss).backward()
            sync()
            t2 = time.perf_counter()
            scaler.step(opt)
            scaler.update()
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
