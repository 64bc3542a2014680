"""Fits the coefficients of the vectorisable f32 `erf` in crates/unitune-kernels/src/simd.rs.

Two pieces, each a minimax fit (Lawson's iteratively reweighted least squares) of the absolute
error of erf, against mpmath at 30 digits:
- |x| < T: erf(x) = x * P(x^2), P of degree 5 (P(0) is left free: it comes out one f32 step
  below 2/sqrt(pi), which makes up for the rounding of the other terms);
- T <= |x| <= C: erf(x) = 1 - exp(-x^2) * N(|x|) / D(|x|), N of degree 2, D of degree 3 with
  D(0) = 1 (the rational approximates erfcx = erfc * exp(x^2), which is smooth and bounded there).
Prints the coefficients rounded to f32 (shortest round-trip form) and the fit errors; the f32
evaluation error is measured by the Rust test `simd::tests::fast_erf_is_accurate`.

Dev only: /work/pyref/bin/python dev/fit_erf.py (about a second).
"""

import mpmath
import numpy as np

mpmath.mp.dps = 30
T = 0.875
C = 4.0


def lawson(design, target, weight, iters):
    """Minimax of weight * (design @ c - target) by iteratively reweighted least squares."""
    w = np.ones_like(target)
    best = None
    for _ in range(iters):
        sw = np.sqrt(w) * weight
        c, *_ = np.linalg.lstsq(design * sw[:, None], target * sw, rcond=None)
        err = (design @ c - target) * weight
        worst = np.abs(err).max()
        if best is None or worst < best[0]:
            best = (worst, c)
        w = np.maximum(w * np.abs(err) / np.sum(w * np.abs(err)), 1e-14)
    return best


def small_piece():
    x = np.linspace(1e-4, T, 3000)
    f = np.array([float(mpmath.erf(v) / v) for v in x])
    design = np.vander(x * x, 6, increasing=True)
    # Weight x: the error of erf = x * P(x^2) is x times that of P.
    return lawson(design, f, x, 200)


def large_piece():
    x = np.linspace(T, C, 4000)
    f = np.array([float(mpmath.erfc(v) * mpmath.exp(v * v)) for v in x])
    weight = np.exp(-x * x)  # absolute error of erfc
    num_deg, den_deg = 2, 3
    q_prev = np.ones_like(x)
    best = None
    # Linearised rational fit: N - f * (D - 1) = f, divided by the previous D (Loeb's method).
    for _ in range(30):
        design = np.concatenate(
            [
                np.vander(x, num_deg + 1, increasing=True),
                -f[:, None] * np.vander(x, den_deg + 1, increasing=True)[:, 1:],
            ],
            axis=1,
        )
        worst, c = lawson(design / q_prev[:, None], f / q_prev, weight, 100)
        num = c[: num_deg + 1]
        den = np.concatenate([[1.0], c[num_deg + 1 :]])
        q_prev = np.polyval(den[::-1], x)
        err = np.abs((np.polyval(num[::-1], x) / q_prev - f) * weight).max()
        if best is None or err < best[0]:
            best = (err, num, den)
    return best


def f32(values):
    return ", ".join(str(np.float32(v)) for v in values)


if __name__ == "__main__":
    err, p = small_piece()
    print(f"|x| < {T}: max error {err:.2e}, P = {f32(p)}")
    err, num, den = large_piece()
    print(f"{T} <= |x| <= {C}: max error {err:.2e}, N = {f32(num)}, D = {f32(den)}")
