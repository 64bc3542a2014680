//! Adafactor (Shazeer & Stern, 2018) with a fixed step size, the optimizer the UniTune paper tunes
//! with (lr 1e-4). It follows transformers' `Adafactor(relative_step=False, scale_parameter=False,
//! warmup_init=False)`; candle-nn only ships SGD and AdamW, so it lives here, behind
//! [`candle_nn::Optimizer`] so that it swaps with [`candle_nn::AdamW`].
//!
//! Per parameter `p` with gradient `g`, at that parameter's step `t` (counted from 1, only on steps
//! where it has a gradient):
//! - `beta2_t = 1 - t^decay_rate`;
//! - second moment of `g`: for a factored parameter, running means of `g² + eps1` over each of its two
//!   factored dims (a "row" and a "col" statistic, `R + C` numbers per slice instead of `R * C`), and
//!   `v̂ = row * col / mean(row)`; otherwise the full running mean `v` of `g² + eps1`;
//! - `u = g / sqrt(v̂)`, then `u /= max(1, rms(u) / clip_threshold)`, then `u *= lr`;
//! - with `beta1`, `u` is replaced by its running mean (of the lr-scaled updates, as transformers does);
//! - `p -= weight_decay * lr * p`, then `p -= u`.
//!
//! Which dims are factored is [`Factoring`]:
//! - [`Factoring::LastTwo`] is transformers' rule: every parameter of two or more dims is factored
//!   over its last two dims. For a conv kernel `[O, I, kh, kw]` those are `kh x kw`, so the state is
//!   `O*I*(kh+kw)` numbers, two thirds of the parameter for 3x3 kernels.
//! - [`Factoring::TwoLargest`] is optax's / T5X's rule: factor the two largest dims, but only when the
//!   second largest has at least `min_dim_size` entries; smaller parameters keep the full `v`. A
//!   `[320, 320, 3, 3]` kernel then needs `(320+320)*9` numbers instead of `320*320*9`. Among dims of
//!   equal size the later one counts as larger (what a stable ascending sort gives; optax uses
//!   `np.argsort`, whose order among ties is unspecified). Since `v̂` is symmetric in the two
//!   factored dims (`mean(row) == mean(col)`), only which two dims are factored matters, not their order.
//!
//! The default is `TwoLargest { min_dim_size: 128 }`, as optax: a Stable Diffusion UNet is mostly 3x3
//! convs, and there `LastTwo` would cost two thirds of the model in optimizer state for no gain.
//!
//! Arithmetic and state are f32 whatever the parameter dtype: an f16/bf16 parameter is upcast, updated
//! and rounded back each step, as transformers does (no persistent f32 master copy, so updates smaller
//! than the half-precision resolution of a weight are lost: train f32 parameters for that).
//!
//! f32 parameters on the CPU step through the fused kernel of [`unitune_kernels::adafactor`] (three
//! reads of each gradient, parameters and momentum written in place, rayon over parameters and
//! over pieces of large ones); every other parameter (CUDA, f16/bf16) through candle ops. The two
//! agree to the rounding of their sums (see the tests).

use std::collections::HashSet;

use candle_core::{backprop::GradStore, DType, Error, Result, Tensor, Var};
use candle_nn::Optimizer;
use unitune_kernels::adafactor as fused;

/// Which dims of a parameter with two or more dims get a factored second moment; see the module doc.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Factoring {
    /// transformers: always the last two dims.
    LastTwo,
    /// optax / T5X: the two largest dims, if the second largest has at least `min_dim_size` entries.
    TwoLargest { min_dim_size: usize },
}

impl Default for Factoring {
    fn default() -> Self {
        Factoring::TwoLargest { min_dim_size: 128 }
    }
}

impl Factoring {
    /// The two dims `(lo, hi)`, `lo < hi`, over which a parameter of shape `dims` has its second
    /// moment factored, or `None` when it keeps the full second moment.
    pub fn factored_dims(self, dims: &[usize]) -> Option<(usize, usize)> {
        let n = dims.len();
        if n < 2 {
            return None;
        }
        match self {
            Factoring::LastTwo => Some((n - 2, n - 1)),
            Factoring::TwoLargest { min_dim_size } => {
                // `sort_by_key` is stable, so the last of equally sized dims ends up last.
                let mut by_size: Vec<usize> = (0..n).collect();
                by_size.sort_by_key(|&d| dims[d]);
                let (second, first) = (by_size[n - 2], by_size[n - 1]);
                (dims[second] >= min_dim_size).then(|| (second.min(first), second.max(first)))
            }
        }
    }
}

/// Hyper-parameters, named and defaulted as transformers' `Adafactor`. Its second epsilon (1e-3)
/// only floors the parameter-RMS scaling of relative step sizes (`scale_parameter=True`), which
/// this fixed-step optimizer does not do, so it has no field here.
#[derive(Clone, Debug, PartialEq)]
pub struct AdafactorConfig {
    /// Fixed step size (UniTune: 1e-4).
    pub lr: f64,
    /// Added to `g²` before averaging, so the second moment never is 0.
    pub eps1: f64,
    /// The update is scaled down so that its RMS is at most this.
    pub clip_threshold: f64,
    /// Exponent of the second-moment decay, `beta2_t = 1 - t^decay_rate`; must be negative.
    pub decay_rate: f64,
    /// Momentum on the update; `None` keeps no first moment (the memory-light default).
    pub beta1: Option<f64>,
    /// Decoupled weight decay: `p -= weight_decay * lr * p` each step.
    pub weight_decay: f64,
    pub factoring: Factoring,
}

impl Default for AdafactorConfig {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            eps1: 1e-30,
            clip_threshold: 1.0,
            decay_rate: -0.8,
            beta1: None,
            weight_decay: 0.0,
            factoring: Factoring::default(),
        }
    }
}

impl AdafactorConfig {
    /// Rejects values that would make the update NaN, infinite or growing (NaN fails every check).
    fn validate(&self) -> Result<()> {
        let checks = [
            ("lr", self.lr >= 0.0, "must be >= 0"),
            ("eps1", self.eps1 >= 0.0, "must be >= 0"),
            ("clip_threshold", self.clip_threshold > 0.0, "must be > 0"),
            (
                "decay_rate",
                self.decay_rate < 0.0,
                "must be < 0 (beta2_t = 1 - t^decay_rate)",
            ),
            (
                "beta1",
                self.beta1.is_none_or(|b| (0.0..1.0).contains(&b)),
                "must be in [0, 1)",
            ),
            ("weight_decay", self.weight_decay >= 0.0, "must be >= 0"),
        ];
        match checks.into_iter().find(|(_, ok, _)| !ok) {
            Some((field, _, why)) => Err(Error::Msg(format!("Adafactor `{field}` {why}"))),
            None => Ok(()),
        }
    }
}

/// Running mean of `g² + eps1`, all f32; empty until the parameter's first gradient.
#[derive(Debug)]
enum SecondMoment {
    /// Factored over dims `lo < hi`: `row` is the mean over `hi` (kept as a size-1 dim), `col` the
    /// mean over `lo`.
    Factored {
        lo: usize,
        hi: usize,
        row_col: Option<(Tensor, Tensor)>,
    },
    Full(Option<Tensor>),
}

#[derive(Debug)]
struct VarState {
    var: Var,
    /// Steps this parameter has been updated (transformers counts per parameter).
    step: u32,
    second_moment: SecondMoment,
    /// Running mean of the lr-scaled updates, when `beta1` is set.
    exp_avg: Option<Tensor>,
}

#[derive(Debug)]
pub struct Adafactor {
    vars: Vec<VarState>,
    config: AdafactorConfig,
}

impl Optimizer for Adafactor {
    type Config = AdafactorConfig;

    /// Non-float vars are dropped, as `candle_nn::AdamW` does, and so are repeats of a var (which
    /// would otherwise be stepped twice per step). State is allocated at a var's first step.
    fn new(vars: Vec<Var>, config: AdafactorConfig) -> Result<Self> {
        config.validate()?;
        let mut seen = HashSet::new();
        let vars = vars
            .into_iter()
            .filter(|var| var.dtype().is_float() && seen.insert(var.id()))
            .map(|var| {
                let second_moment = match config.factoring.factored_dims(var.dims()) {
                    Some((lo, hi)) => SecondMoment::Factored {
                        lo,
                        hi,
                        row_col: None,
                    },
                    None => SecondMoment::Full(None),
                };
                VarState {
                    var,
                    step: 0,
                    second_moment,
                    exp_avg: None,
                }
            })
            .collect();
        Ok(Self { vars, config })
    }

    /// Updates every var that has a gradient in `grads`; the others are left alone and their step
    /// count does not advance.
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let cfg = &self.config;
        let mut kernel_steps = Vec::new();
        for state in self.vars.iter_mut() {
            let Some(grad) = grads.get(&state.var) else {
                continue;
            };
            if fused::supports(state.var.as_tensor(), grad) {
                kernel_steps.push(state.kernel_step(grad, cfg.decay_rate));
            } else {
                update_with_candle_ops(state, grad, cfg)?;
            }
        }
        let hyper = fused::Hyper {
            lr: cfg.lr,
            eps1: cfg.eps1,
            clip_threshold: cfg.clip_threshold,
            beta1: cfg.beta1,
            weight_decay: cfg.weight_decay,
        };
        fused::step(&mut kernel_steps, &hyper)
    }

    fn learning_rate(&self) -> f64 {
        self.config.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.config.lr = lr
    }
}

impl Adafactor {
    pub fn config(&self) -> &AdafactorConfig {
        &self.config
    }
}

impl VarState {
    /// Counts the step and hands the var and its state to the fused CPU kernel.
    fn kernel_step<'a>(&'a mut self, grad: &'a Tensor, decay_rate: f64) -> fused::ParamStep<'a> {
        self.step += 1;
        let second_moment = match &mut self.second_moment {
            SecondMoment::Factored { lo, hi, row_col } => fused::SecondMoment::Factored {
                lo: *lo,
                hi: *hi,
                row_col,
            },
            SecondMoment::Full(v) => fused::SecondMoment::Full(v),
        };
        fused::ParamStep {
            param: self.var.as_tensor(),
            grad,
            beta2t: beta2t(self.step, decay_rate),
            second_moment,
            exp_avg: &mut self.exp_avg,
        }
    }
}

/// `beta2_t = 1 - t^decay_rate` at a parameter's step `t`.
fn beta2t(step: u32, decay_rate: f64) -> f64 {
    1.0 - f64::from(step).powf(decay_rate)
}

/// `beta * prev + (1 - beta) * (mean_sq + eps)`, with the `(1 - beta)` scale and `eps` folded into a
/// single pass; at a parameter's first step `beta` is 0 and there is no `prev`.
fn running_mean_sq(prev: Option<&Tensor>, mean_sq: &Tensor, beta: f64, eps: f64) -> Result<Tensor> {
    let fresh = mean_sq.affine(1.0 - beta, (1.0 - beta) * eps)?;
    match prev {
        Some(prev) => (prev * beta)? + fresh,
        None => Ok(fresh),
    }
}

/// One step of one var from candle ops: the path of every var the fused kernel does not take
/// (CUDA, f16/bf16 parameters), and the reference the kernel is tested against.
fn update_with_candle_ops(
    state: &mut VarState,
    grad: &Tensor,
    cfg: &AdafactorConfig,
) -> Result<()> {
    state.step += 1;
    let beta2t = beta2t(state.step, cfg.decay_rate);
    // Detached so that no autograd graph links one step's state to the next.
    let g = grad.detach().to_dtype(DType::F32)?; // same shape as the var
    let g_sq = g.sqr()?;
    let u = match &mut state.second_moment {
        SecondMoment::Factored { lo, hi, row_col } => {
            let (lo, hi) = (*lo, *hi);
            let prev = row_col.as_ref();
            // eps1 is added to the means rather than to g² (equal up to rounding): one full-size pass less.
            let row = running_mean_sq(
                prev.map(|rc| &rc.0),
                &g_sq.mean_keepdim(hi)?,
                beta2t,
                cfg.eps1,
            )?;
            let col = running_mean_sq(
                prev.map(|rc| &rc.1),
                &g_sq.mean_keepdim(lo)?,
                beta2t,
                cfg.eps1,
            )?;
            // v̂ = row * col / mean(row): normalise the row statistic, then 1/sqrt of each factor.
            let row_factor = row.broadcast_div(&row.mean_keepdim(lo)?)?.sqrt()?.recip()?; // dim hi = 1
            let col_factor = col.sqrt()?.recip()?; // dim lo = 1
            *row_col = Some((row, col));
            g.broadcast_mul(&row_factor)?.broadcast_mul(&col_factor)?
        }
        SecondMoment::Full(v) => {
            let new_v = running_mean_sq(v.as_ref(), &g_sq, beta2t, cfg.eps1)?;
            let u = (&g / new_v.sqrt()?)?;
            *v = Some(new_v);
            u
        }
    };
    drop(g_sq);

    // lr / max(1, rms(u) / clip_threshold), kept on the device as a 0-d tensor so that no parameter
    // waits for a device-to-host copy. The (1 - beta1) of the momentum update is folded in too.
    let n = u.elem_count() as f64;
    let momentum_scale = cfg.beta1.map_or(1.0, |b1| 1.0 - b1);
    let scale = (u.sqr()?.sum_all()? / (n * cfg.clip_threshold * cfg.clip_threshold))?
        .sqrt()?
        .maximum(1.0)?
        .recip()?
        .affine(cfg.lr * momentum_scale, 0.0)?;
    let mut step = u.broadcast_mul(&scale)?;
    if let Some(beta1) = cfg.beta1 {
        step = match state.exp_avg.take() {
            Some(m) => ((m * beta1)? + step)?,
            None => step,
        };
        state.exp_avg = Some(step.clone());
    }

    let p = state.var.as_tensor().detach().to_dtype(DType::F32)?;
    let p = if cfg.weight_decay != 0.0 {
        p.affine(1.0 - cfg.weight_decay * cfg.lr, 0.0)?
    } else {
        p
    };
    state.var.set(&(p - step)?.to_dtype(state.var.dtype())?)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use candle_core::Device;

    use super::*;

    const NAMES: [&str; 6] = ["a", "b", "c", "d", "e", "f"];

    fn reference() -> HashMap<String, Tensor> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/ref/adafactor.safetensors");
        candle_core::safetensors::load(path, &Device::Cpu).unwrap()
    }

    /// Replays the fixture's gradients through our Adafactor and returns the worst error against
    /// transformers' parameters over all steps: `|ours - ref| / max(|ref|, 1e-2)`.
    fn replay(case: &str, cfg: AdafactorConfig) -> f32 {
        let reference = reference();
        let vars: Vec<Var> = NAMES
            .iter()
            .map(|n| Var::from_tensor(&reference[&format!("init.{n}")]).unwrap())
            .collect();
        let mut opt = Adafactor::new(vars.clone(), cfg).unwrap();
        let mut worst = 0f32;
        for step in 1..=5 {
            let mut grads = GradStore::default();
            for (name, var) in NAMES.iter().zip(&vars) {
                if let Some(g) = reference.get(&format!("grad.{step}.{name}")) {
                    grads.insert(var.as_tensor(), g.clone());
                }
            }
            opt.step(&grads).unwrap();
            for (name, var) in NAMES.iter().zip(&vars) {
                let want = &reference[&format!("{case}.step{step}.{name}")];
                let err = (var.as_tensor() - want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .div(&want.abs().unwrap().maximum(1e-2).unwrap())
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                worst = worst.max(err);
            }
        }
        worst
    }

    fn cfg(factoring: Factoring, beta1: Option<f64>, weight_decay: f64) -> AdafactorConfig {
        AdafactorConfig {
            lr: 1e-2,
            beta1,
            weight_decay,
            factoring,
            ..Default::default()
        }
    }

    #[test]
    fn last_two_matches_transformers() {
        for (beta1, wd, case) in [
            (None, 0.0, "last_two.b1_0.wd_0.0"),
            (None, 0.01, "last_two.b1_0.wd_0.01"),
            (Some(0.9), 0.0, "last_two.b1_0.9.wd_0.0"),
            (Some(0.9), 0.01, "last_two.b1_0.9.wd_0.01"),
        ] {
            let err = replay(case, cfg(Factoring::LastTwo, beta1, wd));
            assert!(err < 1e-5, "{case}: relative error {err:e}");
        }
    }

    #[test]
    fn two_largest_matches_transformers_on_permuted_params() {
        let factoring = Factoring::TwoLargest { min_dim_size: 3 };
        for (beta1, wd, case) in [
            (None, 0.0, "two_largest.b1_0.wd_0.0"),
            (Some(0.9), 0.01, "two_largest.b1_0.9.wd_0.01"),
        ] {
            let err = replay(case, cfg(factoring, beta1, wd));
            assert!(err < 1e-5, "{case}: relative error {err:e}");
        }
    }

    #[test]
    fn two_largest_picks_dims_like_optax() {
        let rule = Factoring::TwoLargest { min_dim_size: 128 };
        assert_eq!(rule.factored_dims(&[320, 320, 3, 3]), Some((0, 1)));
        assert_eq!(rule.factored_dims(&[1280, 320]), Some((0, 1)));
        assert_eq!(rule.factored_dims(&[3, 3, 640, 128]), Some((2, 3)));
        // Ties for second place go to the later dim.
        assert_eq!(rule.factored_dims(&[256, 128, 128]), Some((0, 2)));
        // conv_in: the second largest dim (4) is too small.
        assert_eq!(rule.factored_dims(&[320, 4, 3, 3]), None);
        assert_eq!(rule.factored_dims(&[320]), None);
        assert_eq!(
            Factoring::LastTwo.factored_dims(&[320, 320, 3, 3]),
            Some((2, 3))
        );
        assert_eq!(Factoring::LastTwo.factored_dims(&[320]), None);
    }

    /// Elements of optimizer state per var, after one step.
    fn state_sizes(shapes: &[&[usize]], factoring: Factoring) -> Vec<(Vec<usize>, Vec<usize>)> {
        let vars: Vec<Var> = shapes
            .iter()
            .map(|s| Var::zeros(*s, DType::F32, &Device::Cpu).unwrap())
            .collect();
        let mut opt = Adafactor::new(
            vars.clone(),
            AdafactorConfig {
                factoring,
                ..Default::default()
            },
        )
        .unwrap();
        let mut grads = GradStore::default();
        for var in &vars {
            grads.insert(
                var.as_tensor(),
                Tensor::ones(var.shape(), DType::F32, &Device::Cpu).unwrap(),
            );
        }
        opt.step(&grads).unwrap();
        opt.vars
            .iter()
            .map(|s| match &s.second_moment {
                SecondMoment::Factored {
                    row_col: Some((r, c)),
                    ..
                } => (r.dims().to_vec(), c.dims().to_vec()),
                SecondMoment::Full(Some(v)) => (v.dims().to_vec(), vec![]),
                other => panic!("no state after a step: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn default_factoring_keeps_small_params_whole_and_conv_kernels_small() {
        let sizes = state_sizes(
            &[&[320, 320, 3, 3], &[320, 4, 3, 3], &[64, 32], &[320]],
            Factoring::default(),
        );
        // Rows and cols per 3x3 tap: (320 + 320) * 9 numbers, not 320 * 320 * 9.
        assert_eq!(sizes[0], (vec![320, 1, 3, 3], vec![1, 320, 3, 3]));
        assert_eq!(sizes[1], (vec![320, 4, 3, 3], vec![]));
        assert_eq!(sizes[2], (vec![64, 32], vec![]));
        assert_eq!(sizes[3], (vec![320], vec![]));
        // transformers' rule factors the 3x3 taps instead.
        let sizes = state_sizes(&[&[320, 320, 3, 3]], Factoring::LastTwo);
        assert_eq!(sizes[0], (vec![320, 320, 3, 1], vec![320, 320, 1, 3]));
    }

    #[test]
    fn half_precision_params_step_in_f32() {
        // A bf16 var must end where an f32 var holding the same values ends, rounded to bf16.
        let dev = Device::Cpu;
        let init = Tensor::arange(0f32, 12., &dev)
            .unwrap()
            .affine(0.3, -1.7)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        let half = Var::from_tensor(&init.to_dtype(DType::BF16).unwrap()).unwrap();
        let full = Var::from_tensor(&half.as_tensor().to_dtype(DType::F32).unwrap()).unwrap();
        let cfg = AdafactorConfig {
            lr: 0.1,
            beta1: Some(0.9),
            factoring: Factoring::LastTwo,
            ..Default::default()
        };
        let mut opt_half = Adafactor::new(vec![half.clone()], cfg.clone()).unwrap();
        let mut opt_full = Adafactor::new(vec![full.clone()], cfg).unwrap();
        for step in 0..3 {
            let g = init.affine(0.5, step as f64).unwrap().sin().unwrap(); // [3, 4]
            let g_half = g.to_dtype(DType::BF16).unwrap();
            let (mut gs_half, mut gs_full) = (GradStore::default(), GradStore::default());
            gs_half.insert(half.as_tensor(), g_half.clone());
            gs_full.insert(full.as_tensor(), g_half.to_dtype(DType::F32).unwrap());
            opt_half.step(&gs_half).unwrap();
            opt_full.step(&gs_full).unwrap();
            let full_rounded = full.as_tensor().to_dtype(DType::BF16).unwrap();
            assert_eq!(half.dtype(), DType::BF16);
            assert_eq!(
                half.as_tensor()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap(),
                full_rounded
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap()
            );
            // Re-sync so the next step starts from the same rounded values.
            full.set(&half.as_tensor().to_dtype(DType::F32).unwrap())
                .unwrap();
        }
        let state_dtype = match &opt_half.vars[0].second_moment {
            SecondMoment::Factored {
                row_col: Some((r, _)),
                ..
            } => r.dtype(),
            _ => panic!("expected factored state"),
        };
        assert_eq!(state_dtype, DType::F32);
        assert_eq!(
            opt_half.vars[0].exp_avg.as_ref().unwrap().dtype(),
            DType::F32
        );
    }

    #[test]
    fn rejects_bad_config() {
        for cfg in [
            AdafactorConfig {
                decay_rate: 0.8,
                ..Default::default()
            },
            AdafactorConfig {
                clip_threshold: 0.0,
                ..Default::default()
            },
            AdafactorConfig {
                beta1: Some(1.0),
                ..Default::default()
            },
            AdafactorConfig {
                lr: f64::NAN,
                ..Default::default()
            },
        ] {
            let err = Adafactor::new(vec![], cfg).unwrap_err();
            assert!(err.to_string().contains("Adafactor"), "{err}");
        }
    }

    /// `max |a - b| / max |b|`.
    fn rel_to_max(a: &Tensor, b: &Tensor) -> f32 {
        let scalar = |t: Tensor| t.max_all().unwrap().to_scalar::<f32>().unwrap();
        scalar((a - b).unwrap().abs().unwrap()) / scalar(b.abs().unwrap())
    }

    /// The second-moment tensors of a var.
    fn second_moment(state: &VarState) -> Vec<&Tensor> {
        match &state.second_moment {
            SecondMoment::Factored {
                row_col: Some((r, c)),
                ..
            } => vec![r, c],
            SecondMoment::Full(Some(v)) => vec![v],
            other => panic!("no state after a step: {other:?}"),
        }
    }

    /// The fused CPU kernel (which [`Adafactor::step`] takes for these f32 CPU vars) against the
    /// candle-op path, step by step, each measured as `max |a - b| / max |b|`. They differ by the
    /// rounding of their sums, the kernel's in f64 and candle's in sequential f32, whose error
    /// grows with the number of elements: candle's sum of `u²` over the 1.26 M elements of the
    /// last shape is off by up to 5e-5, hence the tolerance on the updates (seen through the
    /// momentum, which is their running mean: the rounding of the weights hides them). The
    /// kernel's own tests compare it with an f64 reference.
    #[test]
    fn fused_kernel_matches_candle_ops() {
        let dev = Device::Cpu;
        // A bias, a linear weight, conv kernels (TwoLargest factors 256 x 128 of the first), a
        // 1x1 conv (which TwoLargest does not factor) and a 5-d one whose factored dims are
        // strided and whose slabs are larger than the kernel's pieces of work.
        let shapes: [&[usize]; 5] = [
            &[64],
            &[128, 256],
            &[256, 128, 3, 3],
            &[4, 320, 1, 1],
            &[3, 40, 5, 300, 7],
        ];
        let values = |shape: &[usize], seed: f64, scale: f64| {
            let n: usize = shape.iter().product();
            Tensor::arange(0u32, n as u32, &dev)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .affine(0.618, seed)
                .unwrap()
                .sin()
                .unwrap()
                .affine(scale, 0.1 * scale)
                .unwrap()
                .reshape(shape)
                .unwrap()
        };
        // Worst (weights, second moments, momenta) over every case.
        let mut worst = [0f32; 3];
        let mut check = |i: usize, err: f32, tol: f32, what: &str| {
            worst[i] = worst[i].max(err);
            assert!(err < tol, "{what} differ by {err:e}");
        };
        for factoring in [Factoring::default(), Factoring::LastTwo] {
            for (beta1, weight_decay) in [(None, 0.0), (Some(0.9), 0.0), (Some(0.9), 0.01)] {
                let cfg = cfg(factoring, beta1, weight_decay);
                let init: Vec<Tensor> = shapes.iter().map(|s| values(s, 0.0, 1.0)).collect();
                let var_sets: Vec<Vec<Var>> = (0..2)
                    .map(|_| init.iter().map(|t| Var::from_tensor(t).unwrap()).collect())
                    .collect();
                let mut fused = Adafactor::new(var_sets[0].clone(), cfg.clone()).unwrap();
                let mut composite = Adafactor::new(var_sets[1].clone(), cfg.clone()).unwrap();
                for (step, scale) in [1.0, 0.1, 10.0, 1.0].into_iter().enumerate() {
                    let grads: Vec<Tensor> = shapes
                        .iter()
                        .map(|s| values(s, 1.0 + step as f64, scale))
                        .collect();
                    let mut store = GradStore::default();
                    for (var, g) in var_sets[0].iter().zip(&grads) {
                        store.insert(var.as_tensor(), g.clone());
                    }
                    fused.step(&store).unwrap();
                    for (state, g) in composite.vars.iter_mut().zip(&grads) {
                        update_with_candle_ops(state, g, &cfg).unwrap();
                    }
                    for (a, b) in fused.vars.iter().zip(&composite.vars) {
                        let case = format!(
                            "{factoring:?} beta1 {beta1:?} wd {weight_decay} step {step} {:?}",
                            a.var.dims()
                        );
                        let (pa, pb) = (a.var.as_tensor(), b.var.as_tensor());
                        let err = rel_to_max(pa, pb);
                        check(0, err, 1e-6, &format!("{case}: weights"));
                        for (x, y) in second_moment(a).into_iter().zip(second_moment(b)) {
                            assert_eq!(x.dims(), y.dims(), "{case}");
                            let err = rel_to_max(x, y);
                            check(1, err, 1e-6, &format!("{case}: second moments"));
                        }
                        // The updates themselves, which the rounding of the weights above
                        // hides: the momentum is their running mean.
                        if let (Some(ma), Some(mb)) = (&a.exp_avg, &b.exp_avg) {
                            check(2, rel_to_max(ma, mb), 2e-5, &format!("{case}: momenta"));
                        }
                    }
                }
            }
        }
        println!(
            "fused kernel vs candle ops: weights {:.1e}, second moments {:.1e}, updates {:.1e}",
            worst[0], worst[1], worst[2]
        );
    }
}
