"""Dev-only: reference outputs of transformers' CLIPTextModel for the tiny fixtures.

    /work/pyref/bin/python dev/ref_clip.py

Writes tests/fixtures/ref/clip.safetensors, read by the tests in crates/unitune/src/models/clip.rs.
For each fixture (`sd1`: quick_gelu, `sd2`: gelu) and one batch of two 77-token prompts:
  {fx}.last_hidden_state   [2, 77, hidden]  the model's last_hidden_state
  {fx}.clip_skip1          [2, 77, hidden]  what StableDiffusionPipeline uses for clip_skip=1:
                                            hidden_states[-2] through final_layer_norm
  {fx}.grad_rows           [k, hidden]      d loss / d token_embedding.weight at the rows in `grad_ids`
                                            (every other row of the gradient is zero),
                                            loss = sum(last_hidden_state * loss_weight)
Shared: input_ids [2, 77] (i64), grad_ids [k] (i64, the distinct ids in input_ids, sorted),
loss_weight [2, 77, hidden].
"""
import os

import torch
from safetensors.torch import save_file
from transformers import CLIPTextModel

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
BOS, EOS, BANG = 4512, 4513, 0  # "<|startoftext|>", "<|endoftext|>" (SD1's pad), "!" (SD2's pad)


def prompts():
    # Row 0: a short prompt padded with EOS (SD1 tokenizer); ids near the vocabulary's end.
    a = [BOS, 320, 1125, 539, 4511, 4510, 4000, EOS]
    a += [EOS] * (77 - len(a))
    # Row 1: a longer prompt padded with "!" (SD2 tokenizer), truncated form ending in EOS.
    g = torch.Generator().manual_seed(0)
    body = torch.randint(1, 4512, (30,), generator=g).tolist()
    b = [BOS] + body + [EOS]
    b += [BANG] * (77 - len(b))
    return torch.tensor([a, b], dtype=torch.int64)


def main():
    torch.manual_seed(0)
    input_ids = prompts()
    grad_ids = torch.unique(input_ids)  # sorted
    out = {"input_ids": input_ids, "grad_ids": grad_ids}
    loss_weight = None
    for name in ["sd1", "sd2"]:
        model = CLIPTextModel.from_pretrained(os.path.join(ROOT, f"tiny-{name}", "text_encoder"))
        model.eval()
        if loss_weight is None:
            loss_weight = torch.randn(2, 77, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
            out["loss_weight"] = loss_weight
        res = model(input_ids, output_hidden_states=True)
        assert len(res.hidden_states) == model.config.num_hidden_layers + 1
        # The last entry is the encoder output before final_layer_norm.
        assert not torch.allclose(res.hidden_states[-1], res.last_hidden_state)
        skip1 = model.final_layer_norm(res.hidden_states[-2])
        loss = (res.last_hidden_state * loss_weight).sum()
        loss.backward()
        grad = model.embeddings.token_embedding.weight.grad
        mask = torch.ones(grad.shape[0], dtype=torch.bool)
        mask[grad_ids] = False
        assert grad[mask].abs().max() == 0
        out[f"{name}.last_hidden_state"] = res.last_hidden_state.detach()
        out[f"{name}.clip_skip1"] = skip1.detach()
        out[f"{name}.grad_rows"] = grad[grad_ids].clone()
    os.makedirs(os.path.join(ROOT, "ref"), exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(ROOT, "ref", "clip.safetensors"))


if __name__ == "__main__":
    main()
