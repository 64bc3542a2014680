"""Dev-only: check that a LoRA written by `unitune export --format lora` loads in diffusers
(`load_lora_weights`, kohya naming) and gives the tuned model: its UNet weights against the
base plus the session's deltas, and one edit's image against the exported tuned folder's.

    cargo run --release -- tune --model tests/fixtures/tiny-sd1 --image tests/fixtures/ref/tune-input.png \
        --steps 4 --lr 1e-3 --delta-encoding f32 -o /tmp/t.session
    cargo run --release -- export --model tests/fixtures/tiny-sd1 --session /tmp/t.session -o /tmp/tuned
    cargo run --release -- export --model tests/fixtures/tiny-sd1 --session /tmp/t.session \
        --format lora --rank 64 -o /tmp/t-lora.safetensors
    python dev/check_lora.py tests/fixtures/tiny-sd1 /tmp/t.session /tmp/tuned /tmp/t-lora.safetensors

Needs torch, diffusers, peft, safetensors (see the README); never run by CI.
"""
import sys

import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

base_dir, session_path, exported_dir, lora_path = sys.argv[1:5]
pipe = StableDiffusionPipeline.from_pretrained(base_dir, safety_checker=None)
base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
with safe_open(session_path, "pt") as f:
    deltas = {k[len("delta."):]: f.get_tensor(k) for k in f.keys()
              if k.startswith("delta.") and not k.endswith(".scale")}

pipe.load_lora_weights(lora_path)
pipe.fuse_lora()
pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers
fused = pipe.unet.state_dict()
changed = total = 0.0
worst = (0.0, "")
for name, delta in deltas.items():
    if delta.dim() == 1:
        continue  # biases: no LoRA form
    got = fused[name] - base[name]
    err = (got - delta).pow(2).sum().item()
    changed += err
    total += delta.pow(2).sum().item()
    worst = max(worst, ((err / max(delta.pow(2).sum().item(), 1e-30)) ** 0.5, name))
print(f"worst layer: {worst[1]} relative error {worst[0]:.2e}")
weight_error = (changed / total) ** 0.5
print(f"UNet weight deltas through diffusers' load_lora_weights: relative error {weight_error:.2e}")

tuned = StableDiffusionPipeline.from_pretrained(exported_dir, safety_checker=None)
run = lambda p: p("beikkpic a red circle", num_inference_steps=4, height=64, width=64,
                  output_type="np", generator=torch.Generator().manual_seed(0)).images[0]
base_pipe = StableDiffusionPipeline.from_pretrained(base_dir, safety_checker=None)
with_lora, full, untuned = run(pipe), run(tuned), run(base_pipe)
image_error = abs(with_lora - full).max()
print(f"image, LoRA vs full tuned model: max |diff| {image_error:.2e} "
      f"(tuned vs base: {abs(full - untuned).max():.2e})")
assert weight_error < 1e-2, weight_error
