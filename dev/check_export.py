"""Dev-only: check that a folder written by `unitune export` loads in diffusers and is the base
model with the session's deltas applied.

    cargo run --release -- tune --model tests/fixtures/tiny-sd1 --image tests/fixtures/ref/tune-input.png \
        --steps 4 --lr 1e-3 --delta-encoding f32 -o /tmp/t.session
    cargo run --release -- export --model tests/fixtures/tiny-sd1 --session /tmp/t.session -o /tmp/tuned
    python dev/check_export.py tests/fixtures/tiny-sd1 /tmp/t.session /tmp/tuned

Needs torch, diffusers, safetensors (see the README); never run by CI.
"""
import sys

import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

base_dir, session_path, exported_dir = sys.argv[1:4]
base = StableDiffusionPipeline.from_pretrained(base_dir, safety_checker=None).unet.state_dict()
tuned = StableDiffusionPipeline.from_pretrained(exported_dir, safety_checker=None)
state = tuned.unet.state_dict()

with safe_open(session_path, "pt") as f:
    deltas = {k[len("delta."):]: f.get_tensor(k) for k in f.keys()
              if k.startswith("delta.") and not k.endswith(".scale")}
    if f.metadata().get("delta_encoding") != "f32":
        sys.exit("tune with --delta-encoding f32 for an exact comparison")

worst = 0.0
for name, weight in state.items():
    expected = base[name] + deltas[name].to(base[name].dtype) if name in deltas else base[name]
    worst = max(worst, (weight - expected).abs().max().item())
print(f"{len(deltas)} tuned tensors of {len(state)}; largest difference from base + delta: {worst:.2e}")
assert worst <= 1e-6, worst

image = tuned(f"beikkpic", num_inference_steps=2, height=64, width=64, output_type="np",
              generator=torch.Generator().manual_seed(0)).images[0]
print("diffusers sampled the exported model:", image.shape)
