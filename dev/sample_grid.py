"""Dev-only: a contact sheet of a model's txt2img samples, each under its caption, to judge a
pretrained model by eye.

    /work/pyref/bin/python dev/sample_grid.py MODEL_DIR OUT.png [--binary target/release/unitune]
        [--steps 30] [--guidance 4] [--seeds 2] [--scale 3] [--prompts FILE]

Runs `unitune generate` once per prompt and seed (our pipeline, not diffusers'), upscales each
image `scale` times (nearest) and writes one row per prompt. Needs only Pillow.
"""
import argparse
import os
import subprocess
import tempfile

from PIL import Image, ImageDraw

PROMPTS = [
    "a red circle on a blue background",
    "a yellow square on a black background",
    "a large green triangle on a white background",
    "a small white star on a purple background",
    "a blue ring on an orange background",
    "an orange circle on a striped green background",
    "a purple square on a checkered yellow background",
    "a black triangle on a dotted white background",
    "a red circle left of a blue square on a white background",
    "a yellow star above a green ring on a black background",
    "a white square right of an orange triangle on a purple background",
    "a blue circle below a red star on a yellow background",
    "a striped red background",
    "",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--binary", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "unitune"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--scale", type=int, default=3)
    ap.add_argument("--prompts")
    args = ap.parse_args()
    prompts = PROMPTS if not args.prompts else [l.rstrip("\n") for l in open(args.prompts)]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, prompt in enumerate(prompts):
            images = []
            for seed in range(args.seeds):
                path = os.path.join(tmp, f"{i}-{seed}.png")
                subprocess.run([args.binary, "generate", "--model", args.model, "--prompt", prompt, "--steps", str(args.steps),
                                "--guidance", str(args.guidance), "--seed", str(seed), "--output", path],
                               check=True, capture_output=True)
                img = Image.open(path).convert("RGB")
                images.append(img.resize((img.width * args.scale, img.height * args.scale), Image.NEAREST))
            rows.append((prompt or "(empty prompt)", images))

    w, h = rows[0][1][0].size
    text_w = 400
    sheet = Image.new("RGB", (text_w + args.seeds * (w + 4), len(rows) * (h + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (prompt, images) in enumerate(rows):
        y = r * (h + 4)
        draw.text((4, y + h // 2 - 6), prompt, fill="black")
        for c, img in enumerate(images):
            sheet.paste(img, (text_w + c * (w + 4), y))
    sheet.save(args.out)
    print(f"wrote {args.out} ({len(rows)} prompts x {args.seeds} seeds)")


if __name__ == "__main__":
    main()
