"""Reference trajectories of transformers' Adafactor (fixed step size) for unitune's train::adafactor tests.

Writes tests/fixtures/ref/adafactor.safetensors with
  init.{name}                    initial parameters
  grad.{step}.{name}             gradient fed at step 1..5 (absent: no gradient that step)
  {case}.step{k}.{name}          parameters after step k
Cases `last_two.*` run transformers as is (it factors the last two dims). Cases `two_largest.*` give the
optimax/T5X rule (factor the two largest dims if the second largest >= MIN_DIM_SIZE) by running the same
optimizer on each parameter permuted so those two dims come last in their original order (or flattened to
1-D when not factored); the results are permuted back. Factored second moments are symmetric in rows and
columns, so only which two dims are factored matters, not their order.

Run: /work/pyref/bin/python dev/ref_adafactor.py
"""

from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers.optimization import Adafactor

LR = 1e-2
STEPS = 5
MIN_DIM_SIZE = 3
SHAPES = {
    "a": (6, 5),
    "b": (4, 3, 3, 3),  # TwoLargest: dims 0 and 3 (ties among the 3s go to the last one)
    "c": (7,),
    "d": (2, 3, 4),
    "e": (5, 2, 6),  # TwoLargest: dims 0 and 2
    "f": (8, 2),  # TwoLargest: second largest 2 < MIN_DIM_SIZE, so unfactored
}
# Gradient scale per step: large and small steps make the RMS clip bite and the running means move.
GRAD_SCALES = [1.0, 0.1, 10.0, 1.0, 0.01]
# (step, name) pairs with no gradient: the optimizer must skip them and not count the step for them.
NO_GRAD = {(3, "c"), (4, "e")}


def two_largest(shape):
    """(lo, hi) dims to factor, or None. A stable sort puts the last of equal sizes at the end."""
    if len(shape) < 2:
        return None
    order = sorted(range(len(shape)), key=lambda d: shape[d])
    second, first = order[-2], order[-1]
    if shape[second] < MIN_DIM_SIZE:
        return None
    return min(second, first), max(second, first)


def to_layout(t, rule):
    """The parameter as the optimizer sees it under `rule`, and the inverse map."""
    if rule == "last_two":
        return t, lambda x: x
    dims = two_largest(t.shape)
    if dims is None:
        return t.reshape(-1), lambda x: x.reshape(t.shape)
    perm = [d for d in range(t.dim()) if d not in dims] + list(dims)
    inv = [perm.index(d) for d in range(t.dim())]
    return t.permute(perm), lambda x: x.permute(inv)


def run(rule, beta1, weight_decay, init, grads):
    params, back = {}, {}
    for name, value in init.items():
        laid, back[name] = to_layout(value.clone(), rule)
        params[name] = torch.nn.Parameter(laid.contiguous())
    opt = Adafactor(
        list(params.values()),
        lr=LR,
        beta1=beta1,
        weight_decay=weight_decay,
        relative_step=False,
        scale_parameter=False,
        warmup_init=False,
    )
    out = {}
    for step in range(1, STEPS + 1):
        for name, p in params.items():
            g = grads.get((step, name))
            p.grad = None if g is None else to_layout(g, rule)[0].contiguous()
        opt.step()
        for name, p in params.items():
            out[f"step{step}.{name}"] = back[name](p.detach()).clone()  # a copy: p changes in place
    return out


def main():
    torch.manual_seed(0)
    init = {name: torch.randn(shape) for name, shape in SHAPES.items()}
    grads = {}
    for step, scale in enumerate(GRAD_SCALES, start=1):
        for name, shape in SHAPES.items():
            g = torch.randn(shape) * scale
            if (step, name) not in NO_GRAD:
                grads[(step, name)] = g
    grads[(2, "a")][1] = 0.0  # a zero row: eps1 keeps its running mean positive

    tensors = {f"init.{n}": v for n, v in init.items()}
    tensors.update({f"grad.{s}.{n}": g for (s, n), g in grads.items()})
    cases = [
        ("last_two", None, 0.0),
        ("last_two", None, 0.01),
        ("last_two", 0.9, 0.0),
        ("last_two", 0.9, 0.01),
        ("two_largest", None, 0.0),
        ("two_largest", 0.9, 0.01),
    ]
    for rule, beta1, wd in cases:
        case = f"{rule}.b1_{beta1 or 0}.wd_{wd}"
        for key, value in run(rule, beta1, wd, init, grads).items():
            tensors[f"{case}.{key}"] = value

    path = Path(__file__).resolve().parent.parent / "tests/fixtures/ref/adafactor.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    print(f"wrote {len(tensors)} tensors to {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
