"""PyTorch's `F.scaled_dot_product_attention` at the medium UNet's attention shapes, as diffusers'
`AttnProcessor2_0` calls it: q, k, v projected to [b, n, heads * d], viewed as [b, heads, n, d]
(no copy), the output merged back to [b, n, heads * d]. Prints median forward and forward +
backward (of sum(out * w)) wall and CPU times on 2 threads, the counterpart of
crates/unitune-kernels/examples/attention_bench.rs (run with `--times` for our wall times). The
CPU times include the spinning of torch's idle OpenMP threads, so compare wall times, from runs
close together on a quiet machine.

    /work/pyref/bin/python dev/bench_attention_torch.py [--reps 21]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

CASES = [
    ("self 32x32", 4, 8, 1024, 1024, 16),
    ("self 16x16", 4, 8, 256, 256, 32),
    ("cross 32x32", 4, 8, 1024, 77, 16),
    ("cross 16x16", 4, 8, 256, 77, 32),
]


def attention(q, k, v, heads):
    b, n, hd = q.shape
    d = hd // heads
    split = lambda x: x.view(b, -1, heads, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, n, hd)


def median_ms(fn, reps):
    """Median wall and CPU (all threads) milliseconds of `fn()`, after one warm-up call."""
    fn()
    wall, cpu = [], []
    for _ in range(reps):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=21)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    for name, b, h, nq, nk, d in CASES:
        q = torch.randn(b, nq, h * d, requires_grad=True)
        k = torch.randn(b, nk, h * d, requires_grad=True)
        v = torch.randn(b, nk, h * d, requires_grad=True)
        w = torch.randn(b, nq, h * d)

        def forward():
            with torch.no_grad():
                attention(q, k, v, h)

        def forward_backward():
            (attention(q, k, v, h) * w).sum().backward()

        (fwd, fwd_cpu), (both, both_cpu) = (
            median_ms(forward, args.reps),
            median_ms(forward_backward, args.reps),
        )
        print(
            f"{name:<12} [{b}, {nq}, {h}x{d}] x {nk} keys: fwd {fwd:7.3f} ms (CPU {fwd_cpu:7.3f}),"
            f" f+b {both:7.3f} ms (CPU {both_cpu:7.3f})"
        )


if __name__ == "__main__":
    main()
