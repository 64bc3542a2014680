//! GroupNorm over `[b, c, ...]`, optionally fused with the SiLU that follows it in every resnet,
//! as a candle custom op with an analytic backward.
//!
//! candle_nn's GroupNorm is composed of about ten elementwise ops and reductions, each writing a
//! full-size tensor that autograd then keeps alive, and its weight gradients go through slow
//! strided sums. Here the forward reads each (sample, group) slice twice for its statistics (the
//! second read from cache at the UNet's sizes) and writes the output once; it keeps only the mean
//! and 1/std of each (sample, group). The backward recomputes the normalised input (and, when
//! fused, the pre-activation) from those rather than storing them. Work is split over (sample,
//! group) with rayon; sums run in short f32 blocks gathered in f64, as accurate as candle's f32
//! composite or better (see the tests).

use std::mem::MaybeUninit;
use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{contiguous, cpu_f32, uninit_vec};
use crate::simd::exp;

/// The name in the errors.
const OP: &str = "group_norm";

/// `torch.nn.GroupNorm(groups, c, eps)` applied to `x` ([b, c, ...]) with per-channel `gamma` and
/// `beta` ([c]), followed by SiLU when `silu`; differentiable with respect to all three.
/// Tensors must be f32 on the CPU (callers fall back to composite ops elsewhere); `x` is made
/// contiguous if it is not.
pub fn group_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 || x.elem_count() == 0 {
        bail!(
            "group_norm: expected a non-empty [b, c, ...] input, got {:?}",
            x.shape()
        )
    }
    let channels = dims[1];
    if groups == 0 || !channels.is_multiple_of(groups) {
        bail!("group_norm: {groups} groups do not divide {channels} channels")
    }
    for (name, t) in [("gamma", gamma), ("beta", beta)] {
        if t.dims() != [channels] {
            bail!(
                "group_norm: {name} has shape {:?}, expected [{channels}]",
                t.shape()
            )
        }
    }
    for t in [x, gamma, beta] {
        if !t.device().is_cpu() || t.dtype() != DType::F32 {
            bail!(
                "group_norm: only f32 CPU tensors, got {:?} on {:?}",
                t.dtype(),
                t.device()
            )
        }
    }
    let op = GroupNormOp {
        groups,
        eps,
        silu,
        stats: Mutex::new(None),
    };
    x.contiguous()?
        .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)
}

struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
    /// `(mean, 1/std)` of each (sample, group), left by the forward for the backward.
    stats: Mutex<Option<Vec<(f32, f32)>>>,
}

/// How a `[b, c, ...]` tensor splits into (sample, group) slices.
#[derive(Clone, Copy)]
struct Dims {
    channels: usize,
    /// Channels per group.
    group_channels: usize,
    /// Elements per channel (the product of the spatial dims).
    spatial: usize,
}

impl Dims {
    fn new(shape: &Shape, groups: usize) -> Self {
        let dims = shape.dims();
        Self {
            channels: dims[1],
            group_channels: dims[1] / groups,
            spatial: dims[2..].iter().product(),
        }
    }

    /// Elements in one (sample, group) slice, which is contiguous in `[b, c, ...]`.
    fn group_len(&self) -> usize {
        self.group_channels * self.spatial
    }

    /// The channel range of the `i`-th (sample, group) slice.
    fn channel_range(&self, i: usize) -> std::ops::Range<usize> {
        let start = (i * self.group_channels) % self.channels;
        start..start + self.group_channels
    }
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        if self.silu {
            "group-norm-silu"
        } else {
            "group-norm"
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, gamma, beta) = (
            contiguous(OP, (s1, l1), "x")?,
            contiguous(OP, (s2, l2), "gamma")?,
            contiguous(OP, (s3, l3), "beta")?,
        );
        let d = Dims::new(l1.shape(), self.groups);
        let mut stats = vec![(0f32, 0f32); x.len() / d.group_len()];
        let fill = |out: &mut [MaybeUninit<f32>]| {
            out.par_chunks_mut(d.group_len())
                .zip(stats.par_iter_mut())
                .enumerate()
                .for_each(|(i, (out, stats))| {
                    let x = &x[i * d.group_len()..][..d.group_len()];
                    let ch = d.channel_range(i);
                    let group = Group {
                        x,
                        gamma: &gamma[ch.clone()],
                        beta: &beta[ch],
                        spatial: d.spatial,
                    };
                    *stats = group.forward(out, self.eps, self.silu);
                });
        };
        // SAFETY: the groups cover the output, and `forward` writes each whole.
        let out = unsafe { uninit_vec(x.len(), fill) };
        if let Ok(mut saved) = self.stats.lock() {
            *saved = Some(stats);
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let d = Dims::new(x.shape(), self.groups);
        let (xs, xl) = x.storage_and_layout();
        let (gs, gl) = gamma.storage_and_layout();
        let (bs, bl) = beta.storage_and_layout();
        let (dys, dyl) = grad.storage_and_layout();
        let xv = cpu_f32(OP, &xs, xl, "x")?;
        let (gamma_v, beta_v) = (
            cpu_f32(OP, &gs, gl, "gamma")?,
            cpu_f32(OP, &bs, bl, "beta")?,
        );
        let dout = cpu_f32(OP, &dys, dyl, "output gradient")?;
        // The forward always leaves the statistics; recomputing them is only a fallback.
        let stats = self.stats.lock().ok().and_then(|s| s.clone());
        let stats = match stats {
            Some(s) => s,
            None => xv
                .par_chunks(d.group_len())
                .map(|x| group_stats(x, self.eps))
                .collect(),
        };

        // Per (sample, channel): the parts of (d_beta, d_gamma).
        let mut partial = vec![(0f64, 0f64); xv.len() / d.spatial];
        let fill = |dx: &mut [MaybeUninit<f32>]| {
            dx.par_chunks_mut(d.group_len())
                .zip(partial.par_chunks_mut(d.group_channels))
                .enumerate()
                .for_each(|(i, (dx, partial))| {
                    let range = i * d.group_len()..(i + 1) * d.group_len();
                    let ch = d.channel_range(i);
                    let group = Group {
                        x: &xv[range.clone()],
                        gamma: &gamma_v[ch.clone()],
                        beta: &beta_v[ch],
                        spatial: d.spatial,
                    };
                    group.backward(&dout[range], stats[i], self.silu, dx, partial);
                });
        };
        // SAFETY: the groups cover the input, and `backward` writes each group's gradient whole.
        let dx = unsafe { uninit_vec(xv.len(), fill) };

        let mut dgamma = vec![0f64; d.channels];
        let mut dbeta = vec![0f64; d.channels];
        for sample in partial.chunks_exact(d.channels) {
            for ((g, b), &(db, dg)) in dgamma.iter_mut().zip(dbeta.iter_mut()).zip(sample) {
                *g += dg;
                *b += db;
            }
        }
        let to_tensor = |v: Vec<f64>| {
            let v: Vec<f32> = v.into_iter().map(|v| v as f32).collect();
            Tensor::from_vec(v, d.channels, x.device())
        };
        let dx = Tensor::from_vec(dx, x.shape(), x.device())?;
        Ok((Some(dx), Some(to_tensor(dgamma)?), Some(to_tensor(dbeta)?)))
    }
}

/// One (sample, group) slice of the input and its channels' parameters.
struct Group<'a> {
    x: &'a [f32],
    gamma: &'a [f32],
    beta: &'a [f32],
    /// Elements per channel.
    spatial: usize,
}

impl Group<'_> {
    /// Writes the normalised group (through SiLU when `silu`) to all of `out`; returns
    /// `(mean, rstd)`.
    fn forward(&self, out: &mut [MaybeUninit<f32>], eps: f64, silu: bool) -> (f32, f32) {
        #[cfg(target_arch = "x86_64")]
        if crate::simd::has_avx2() {
            // Safety: the CPU has the features `forward_avx2` is compiled for.
            return unsafe { self.forward_avx2(out, eps, silu) };
        }
        self.forward_impl(out, eps, silu)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn forward_avx2(
        &self,
        out: &mut [MaybeUninit<f32>],
        eps: f64,
        silu: bool,
    ) -> (f32, f32) {
        self.forward_impl(out, eps, silu)
    }

    #[inline(always)]
    fn forward_impl(&self, out: &mut [MaybeUninit<f32>], eps: f64, silu: bool) -> (f32, f32) {
        let stats = group_stats(self.x, eps);
        if silu {
            self.normalise::<true>(out, stats)
        } else {
            self.normalise::<false>(out, stats)
        }
        stats
    }

    /// Normalise, scale and shift (then SiLU when `SILU`), channel by channel.
    #[inline(always)]
    fn normalise<const SILU: bool>(&self, out: &mut [MaybeUninit<f32>], (mean, rstd): (f32, f32)) {
        let s = self.spatial;
        let channels = self.x.chunks_exact(s).zip(out.chunks_exact_mut(s));
        for ((x, out), (&g, &b)) in channels.zip(self.gamma.iter().zip(self.beta)) {
            let scale = g * rstd;
            let shift = b - mean * scale;
            for (o, &v) in out.iter_mut().zip(x) {
                let y = v * scale + shift;
                o.write(if SILU { y / (1.0 + exp(-y)) } else { y });
            }
        }
    }

    /// Writes the input gradient to all of `dx` and each channel's `(d_beta, d_gamma)` part to
    /// `partial`, given the gradient `dout` of the output and the forward's `(mean, rstd)`.
    fn backward(
        &self,
        dout: &[f32],
        stats: (f32, f32),
        silu: bool,
        dx: &mut [MaybeUninit<f32>],
        partial: &mut [(f64, f64)],
    ) {
        #[cfg(target_arch = "x86_64")]
        if crate::simd::has_avx2() {
            // Safety: the CPU has the features `backward_avx2` is compiled for.
            return unsafe { self.backward_avx2(dout, stats, silu, dx, partial) };
        }
        self.backward_impl(dout, stats, silu, dx, partial)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn backward_avx2(
        &self,
        dout: &[f32],
        stats: (f32, f32),
        silu: bool,
        dx: &mut [MaybeUninit<f32>],
        partial: &mut [(f64, f64)],
    ) {
        self.backward_impl(dout, stats, silu, dx, partial)
    }

    /// With `p = gamma * x_hat + beta` and `dp` its gradient (`dout` through the SiLU, if fused):
    /// `dx = rstd * (gamma * dp - mean(gamma * dp) - x_hat * mean(gamma * dp * x_hat))`, means
    /// over the group. The first pass stores `dp` in `dx` and sums `dp` and `dp * x_hat` per
    /// channel (the parts of d_beta and d_gamma); the second turns `dp` into `dx` in place.
    #[inline(always)]
    fn backward_impl(
        &self,
        dout: &[f32],
        stats: (f32, f32),
        silu: bool,
        dx: &mut [MaybeUninit<f32>],
        partial: &mut [(f64, f64)],
    ) {
        let s = self.spatial;
        let (mut sum_gdp, mut sum_gdp_xhat) = (0f64, 0f64);
        let per_channel = self.x.chunks_exact(s).zip(dout.chunks_exact(s));
        let per_channel = per_channel.zip(dx.chunks_exact_mut(s));
        let params = self.gamma.iter().zip(self.beta).zip(partial.iter_mut());
        for (((x, dout), dp), ((&g, &b), part)) in per_channel.zip(params) {
            *part = if silu {
                channel_dp::<true>(x, dout, dp, g, b, stats)
            } else {
                channel_dp::<false>(x, dout, dp, g, b, stats)
            };
            sum_gdp += g as f64 * part.0;
            sum_gdp_xhat += g as f64 * part.1;
        }
        // SAFETY: `channel_dp` wrote each channel's `dp` whole, and the channels tile `dx`.
        let dx = unsafe { dx.assume_init_mut() };
        let n = self.x.len() as f64;
        let (mean_gdp, mean_gdp_xhat) = ((sum_gdp / n) as f32, (sum_gdp_xhat / n) as f32);
        let (mean, rstd) = stats;
        for ((x, dx), &g) in self
            .x
            .chunks_exact(s)
            .zip(dx.chunks_exact_mut(s))
            .zip(self.gamma)
        {
            let k = g * rstd;
            for (d, &v) in dx.iter_mut().zip(x) {
                let x_hat = (v - mean) * rstd;
                *d = k * *d - rstd * (mean_gdp + x_hat * mean_gdp_xhat);
            }
        }
    }
}

/// Independent accumulators, so that the compiler vectorises the sums.
const LANES: usize = 16;
/// Elements summed in f32 lanes before the lanes go into f64: 32 terms per lane keep the f32
/// rounding near 1e-6 relative, while the inner loops stay f32 and full width.
const BLOCK: usize = 32 * LANES;

/// Sum of `f(v)` over `xs`, accumulated as described at [`BLOCK`].
#[inline(always)]
fn sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut total = 0f64;
    for block in xs.chunks(BLOCK) {
        let mut acc = [0f32; LANES];
        let chunks = block.chunks_exact(LANES);
        let rest: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
        for c in chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += f(v);
            }
        }
        total += acc.iter().map(|&a| a as f64).sum::<f64>() + rest as f64;
    }
    total
}

/// `(mean, 1/sqrt(var + eps))` of one group, with the biased variance as torch.
#[inline(always)]
fn group_stats(x: &[f32], eps: f64) -> (f32, f32) {
    let n = x.len() as f64;
    let mean = (sum(x, |v| v) / n) as f32;
    // Two passes (squared deviations) rather than E[x^2] - mean^2, which cancels when the mean is
    // large; the group is in cache by now.
    let var = sum(x, |v| (v - mean) * (v - mean)) / n;
    (mean, (1.0 / (var + eps).sqrt()) as f32)
}

/// For one channel: writes `dp` (the gradient before the affine output's SiLU when `SILU`, else
/// `dout`) to all of `dp`, and returns the sums of `dp` and `dp * x_hat`.
#[inline(always)]
fn channel_dp<const SILU: bool>(
    x: &[f32],
    dout: &[f32],
    dp: &mut [MaybeUninit<f32>],
    gamma: f32,
    beta: f32,
    (mean, rstd): (f32, f32),
) -> (f64, f64) {
    let scale = gamma * rstd;
    let shift = beta - mean * scale;
    let element = |v: f32, go: f32| {
        let d = if SILU {
            let p = v * scale + shift;
            let sig = 1.0 / (1.0 + exp(-p));
            go * sig * (1.0 + p * (1.0 - sig))
        } else {
            go
        };
        (d, d * ((v - mean) * rstd))
    };
    let (mut sum_dp, mut sum_dp_xhat) = (0f64, 0f64);
    let blocks = x
        .chunks(BLOCK)
        .zip(dout.chunks(BLOCK))
        .zip(dp.chunks_mut(BLOCK));
    for ((x, dout), dp) in blocks {
        let (mut acc_dp, mut acc_dp_xhat) = ([0f32; LANES], [0f32; LANES]);
        let chunks = x.chunks_exact(LANES).zip(dout.chunks_exact(LANES));
        for ((x, go), dp) in chunks.zip(dp.chunks_exact_mut(LANES)) {
            for l in 0..LANES {
                let (d, d_xhat) = element(x[l], go[l]);
                dp[l].write(d);
                acc_dp[l] += d;
                acc_dp_xhat[l] += d_xhat;
            }
        }
        let tail = x.len() - x.len() % LANES;
        for (i, d) in dp.iter_mut().enumerate().skip(tail) {
            let (e, e_xhat) = element(x[i], dout[i]);
            d.write(e);
            acc_dp[0] += e;
            acc_dp_xhat[0] += e_xhat;
        }
        sum_dp += acc_dp.iter().map(|&a| a as f64).sum::<f64>();
        sum_dp_xhat += acc_dp_xhat.iter().map(|&a| a as f64).sum::<f64>();
    }
    (sum_dp, sum_dp_xhat)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// candle_nn's GroupNorm forward (composite ops), then SiLU when asked: the reference.
    fn composite(
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> Tensor {
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let x3 = x.reshape((b, groups, ())).unwrap();
        let len = x3.dim(2).unwrap() as f64;
        let mean = (x3.sum_keepdim(2).unwrap() / len).unwrap();
        let centred = x3.broadcast_sub(&mean).unwrap();
        let var = (centred.sqr().unwrap().sum_keepdim(2).unwrap() / len).unwrap();
        let normed = centred
            .broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
            .unwrap();
        let mut w = vec![1; dims.len()];
        w[1] = c;
        let y = normed
            .reshape(dims)
            .unwrap()
            .broadcast_mul(&gamma.reshape(w.clone()).unwrap())
            .unwrap()
            .broadcast_add(&beta.reshape(w).unwrap())
            .unwrap();
        if silu {
            y.silu().unwrap()
        } else {
            y
        }
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap();
        d.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    fn max_abs_value(a: &Tensor) -> f32 {
        a.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Forward values and the gradients of `sum(out * w)` (w fixed random) w.r.t. x, gamma and
    /// beta, from our op (f32) and from the composite ops in f32 and in f64. Returns the worst
    /// errors relative to the largest value of each tensor: (ours vs f64, candle f32 vs f64).
    fn compare(shape: &[usize], groups: usize, silu: bool) -> (f32, f32) {
        let dev = Device::Cpu;
        let c = shape[1];
        // An offset mean, as real activations have, exercises the variance's accuracy.
        let x = (Tensor::randn(0f64, 2.0, shape, &dev).unwrap() + 0.7).unwrap();
        let gamma = (Tensor::randn(0f64, 0.5, c, &dev).unwrap() + 1.0).unwrap();
        let beta = Tensor::randn(0f64, 0.5, c, &dev).unwrap();
        let w = Tensor::randn(0f64, 1.0, shape, &dev).unwrap();
        let run = |dtype: DType, ours: bool| {
            let vars: Vec<Var> = [&x, &gamma, &beta]
                .iter()
                .map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap())
                .collect();
            let (xv, gv, bv) = (
                vars[0].as_tensor(),
                vars[1].as_tensor(),
                vars[2].as_tensor(),
            );
            let out = if ours {
                group_norm(xv, gv, bv, groups, 1e-5, silu).unwrap()
            } else {
                composite(xv, gv, bv, groups, 1e-5, silu)
            };
            let grads = (&out * w.to_dtype(dtype).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let mut all = vec![out];
            all.extend(
                vars.iter()
                    .map(|v| grads.get(v.as_tensor()).expect("no gradient").clone()),
            );
            all
        };
        let (reference, ours, candle) = (
            run(DType::F64, false),
            run(DType::F32, true),
            run(DType::F32, false),
        );
        let worst = |other: &[Tensor]| {
            reference
                .iter()
                .zip(other)
                .map(|(r, o)| max_abs(r, o) / max_abs_value(&r.to_dtype(DType::F32).unwrap()))
                .fold(0f32, f32::max)
        };
        (worst(&ours), worst(&candle))
    }

    #[test]
    fn matches_composite_group_norm_and_its_gradients() {
        let cases: &[(&[usize], usize)] = &[
            (&[1, 64, 8, 8], 32),
            (&[2, 64, 5, 7], 32),
            (&[3, 16, 6, 6], 8),
            // Groups of a few elements only: with two, 1/std reaches 1/sqrt(eps) and the
            // gradients are ill-conditioned in f32 whatever the algorithm (candle's included).
            (&[2, 64, 1, 1], 8),
            (&[2, 32, 9], 8),
            (&[2, 24, 3, 4], 8),
            // Channels longer than a summation block.
            (&[1, 64, 24, 24], 32),
        ];
        for &(shape, groups) in cases {
            for silu in [false, true] {
                let (ours, candle) = compare(shape, groups, silu);
                assert!(
                    ours < 2e-6,
                    "{shape:?} groups {groups} silu {silu}: ours {ours:e}, candle {candle:e}"
                );
            }
        }
    }

    /// The dispatched kernels (AVX2 where the CPU has it) agree with the baseline build.
    #[test]
    fn kernel_versions_agree() {
        let randn = |n: usize| -> Vec<f32> {
            Tensor::randn(0.2f32, 1.3, n, &Device::Cpu)
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let (spatial, channels) = (600, 3);
        let (x, dout) = (randn(spatial * channels), randn(spatial * channels));
        let (gamma, beta) = (randn(channels), randn(channels));
        let group = Group {
            x: &x,
            gamma: &gamma,
            beta: &beta,
            spatial,
        };
        for silu in [false, true] {
            let (mut stats, mut stats_b) = ((0.0, 0.0), (0.0, 0.0));
            // SAFETY (all four): each writes its whole output.
            let a = unsafe { uninit_vec(x.len(), |out| stats = group.forward(out, 1e-5, silu)) };
            let b =
                unsafe { uninit_vec(x.len(), |out| stats_b = group.forward_impl(out, 1e-5, silu)) };
            assert_eq!(stats, stats_b);
            let close = |a: &[f32], b: &[f32]| {
                a.iter()
                    .zip(b)
                    .all(|(a, b)| (a - b).abs() <= 1e-6 * (1.0 + b.abs()))
            };
            assert!(close(&a, &b));
            let (mut pa, mut pb) = (vec![(0f64, 0f64); channels], vec![(0f64, 0f64); channels]);
            let a = unsafe {
                uninit_vec(x.len(), |dx| {
                    group.backward(&dout, stats, silu, dx, &mut pa)
                })
            };
            let b = unsafe {
                uninit_vec(x.len(), |dx| {
                    group.backward_impl(&dout, stats, silu, dx, &mut pb)
                })
            };
            assert!(close(&a, &b));
            for (pa, pb) in pa.iter().zip(&pb) {
                assert!(
                    (pa.0 - pb.0).abs() < 1e-4 && (pa.1 - pb.1).abs() < 1e-4,
                    "{pa:?} {pb:?}"
                );
            }
        }
    }

    #[test]
    fn rejects_bad_arguments() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 6, 4), DType::F32, &dev).unwrap();
        let g = Tensor::ones(6, DType::F32, &dev).unwrap();
        assert!(group_norm(&x, &g, &g, 4, 1e-5, false).is_err());
        assert!(group_norm(&x, &g.narrow(0, 0, 3).unwrap(), &g, 3, 1e-5, false).is_err());
        assert!(group_norm(&x.to_dtype(DType::F64).unwrap(), &g, &g, 3, 1e-5, false).is_err());
        // A transposed (non-contiguous) input is copied first, and gives the same result.
        let xt = Tensor::randn(0f32, 1.0, (2, 4, 6), &dev)
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let a = group_norm(&xt, &g, &g, 3, 1e-5, true).unwrap();
        let b = group_norm(&xt.contiguous().unwrap(), &g, &g, 3, 1e-5, true).unwrap();
        assert_eq!(max_abs(&a, &b), 0.0);
    }
}
