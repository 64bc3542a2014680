//! `scheduler_config.json` as diffusers writes it, with diffusers' defaults for every field.
//!
//! One struct serves every scheduler, as diffusers' `from_config` lets any scheduler read any
//! other's config: fields a scheduler does not know are ignored, missing ones take its default.
//! Fields are read one by one so that an error names the field, not just a line and column.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::SchedulerKind;
use crate::{Error, Result};

/// How betas grow over the training timesteps (`beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    /// The cosine schedule of improved DDPM (Nichol & Dhariwal), betas capped at 0.999.
    SquaredcosCapV2,
}

/// What the network predicts (`prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

/// How inference timesteps are picked among the training ones (`timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

/// The sigma after the last step of sigma-based schedulers (`final_sigmas_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalSigmasType {
    Zero,
    SigmaMin,
}

/// The union of the fields of diffusers' DDIM, DDPM, Euler, Euler ancestral and DPM-Solver
/// multistep configs. Values are checked against what each scheduler supports when it is built.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// The file the config came from; errors about its fields name it.
    pub path: PathBuf,
    /// `_class_name`: the scheduler the folder was saved with.
    pub class_name: Option<String>,
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    /// Explicit betas, used instead of `beta_schedule` when given.
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    /// `None` (absent from old configs) means the scheduler's own default: leading for DDIM and
    /// DDPM, linspace for Euler, Euler ancestral and DPM-Solver; see [`Self::timestep_spacing_for`].
    pub timestep_spacing: Option<TimestepSpacing>,
    pub steps_offset: usize,
    pub rescale_betas_zero_snr: bool,
    // DDIM and DDPM.
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub set_alpha_to_one: bool,
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub sample_max_value: f64,
    /// DDPM's default is `fixed_small`, DPM-Solver's is none.
    pub variance_type: Option<String>,
    /// DDIM's noise weight: diffusers' `eta` argument of `DDIMScheduler.step` (pipelines' `eta`),
    /// not a field diffusers saves; 0 (deterministic) unless set here or by an override.
    pub eta: f64,
    // Euler.
    pub interpolation_type: String,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub timestep_type: String,
    pub final_sigmas_type: FinalSigmasType,
    // DPM-Solver.
    pub solver_order: usize,
    pub algorithm_type: String,
    pub solver_type: String,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    pub use_lu_lambdas: bool,
    pub use_flow_sigmas: bool,
    /// Python's json writes the default, minus infinity, as `-Infinity`; we read that spelling.
    pub lambda_min_clipped: f64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            path: PathBuf::from("<default scheduler config>"),
            class_name: None,
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: None,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            clip_sample: true,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            variance_type: None,
            eta: 0.0,
            interpolation_type: "linear".into(),
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            sigma_min: None,
            sigma_max: None,
            timestep_type: "discrete".into(),
            final_sigmas_type: FinalSigmasType::Zero,
            solver_order: 2,
            algorithm_type: "dpmsolver++".into(),
            solver_type: "midpoint".into(),
            lower_order_final: true,
            euler_at_final: false,
            use_lu_lambdas: false,
            use_flow_sigmas: false,
            lambda_min_clipped: f64::NEG_INFINITY,
        }
    }
}

impl SchedulerConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::error::read_text(path, crate::error::MAX_TEXT_FILE_BYTES)?;
        Self::from_json_str(&text, path)
    }

    /// Parses config JSON; `path` is where it came from, for error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let map: Map<String, Value> =
            serde_json::from_str(&quote_non_finite(text)).map_err(|source| Error::Json {
                path: path.into(),
                source,
            })?;
        let mut config = SchedulerConfig {
            path: path.into(),
            ..Default::default()
        };
        for (key, value) in &map {
            // Other schedulers' fields (skip_prk_steps, ...) are ignored, as diffusers does.
            config.set(key, value)?;
        }
        config.check()?;
        Ok(config)
    }

    /// This config with `key=value` overrides (the CLI's `--scheduler-option`): a value is read
    /// as JSON (`0.5`, `true`), else as a string (`trailing`). Unknown keys and bad values are
    /// argument errors naming the option.
    pub fn with_overrides(&self, overrides: &[(&str, &str)]) -> Result<Self> {
        let mut config = self.clone();
        for &(key, text) in overrides {
            let value =
                serde_json::from_str(&quote_non_finite(text)).unwrap_or_else(|_| Value::from(text));
            let as_argument = |e: Error| match e {
                Error::Config { message, .. } => {
                    Error::argument(format!("scheduler option {key}"), message)
                }
                other => other,
            };
            if !config.set(key, &value).map_err(as_argument)? {
                return Err(Error::argument(
                    format!("scheduler option {key}"),
                    "not a field of scheduler_config.json (nor `eta`)",
                ));
            }
            config.check().map_err(as_argument)?;
        }
        Ok(config)
    }

    /// Sets the field named `key` (null means its default); false if there is no such field.
    fn set(&mut self, key: &str, value: &Value) -> Result<bool> {
        let v = Field {
            key,
            value,
            path: &self.path,
        };
        let d = SchedulerConfig::default();
        match key {
            "_class_name" => self.class_name = v.get(None)?,
            "num_train_timesteps" => self.num_train_timesteps = v.get(d.num_train_timesteps)?,
            "beta_start" => self.beta_start = v.float(d.beta_start)?,
            "beta_end" => self.beta_end = v.float(d.beta_end)?,
            "beta_schedule" => self.beta_schedule = v.choice(d.beta_schedule)?,
            "trained_betas" => self.trained_betas = v.get(None)?,
            "prediction_type" => self.prediction_type = v.choice(d.prediction_type)?,
            "timestep_spacing" => {
                self.timestep_spacing = v.optional(|v| v.choice(TimestepSpacing::Leading))?
            }
            "steps_offset" => self.steps_offset = v.get(d.steps_offset)?,
            "rescale_betas_zero_snr" => {
                self.rescale_betas_zero_snr = v.get(d.rescale_betas_zero_snr)?
            }
            "clip_sample" => self.clip_sample = v.get(d.clip_sample)?,
            "clip_sample_range" => self.clip_sample_range = v.float(d.clip_sample_range)?,
            "set_alpha_to_one" => self.set_alpha_to_one = v.get(d.set_alpha_to_one)?,
            "thresholding" => self.thresholding = v.get(d.thresholding)?,
            "dynamic_thresholding_ratio" => {
                self.dynamic_thresholding_ratio = v.float(d.dynamic_thresholding_ratio)?
            }
            "sample_max_value" => self.sample_max_value = v.float(d.sample_max_value)?,
            "variance_type" => self.variance_type = v.get(None)?,
            "eta" => self.eta = v.float(d.eta)?,
            "interpolation_type" => self.interpolation_type = v.get(d.interpolation_type)?,
            "use_karras_sigmas" => self.use_karras_sigmas = v.get(d.use_karras_sigmas)?,
            "use_exponential_sigmas" => {
                self.use_exponential_sigmas = v.get(d.use_exponential_sigmas)?
            }
            "use_beta_sigmas" => self.use_beta_sigmas = v.get(d.use_beta_sigmas)?,
            "sigma_min" => self.sigma_min = v.optional(|v| v.float(0.0))?,
            "sigma_max" => self.sigma_max = v.optional(|v| v.float(0.0))?,
            "timestep_type" => self.timestep_type = v.get(d.timestep_type)?,
            "final_sigmas_type" => self.final_sigmas_type = v.choice(d.final_sigmas_type)?,
            "solver_order" => self.solver_order = v.get(d.solver_order)?,
            "algorithm_type" => self.algorithm_type = v.get(d.algorithm_type)?,
            "solver_type" => self.solver_type = v.get(d.solver_type)?,
            "lower_order_final" => self.lower_order_final = v.get(d.lower_order_final)?,
            "euler_at_final" => self.euler_at_final = v.get(d.euler_at_final)?,
            "use_lu_lambdas" => self.use_lu_lambdas = v.get(d.use_lu_lambdas)?,
            "use_flow_sigmas" => self.use_flow_sigmas = v.get(d.use_flow_sigmas)?,
            "lambda_min_clipped" => self.lambda_min_clipped = v.float(d.lambda_min_clipped)?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Checks that hold for every scheduler.
    fn check(&self) -> Result<()> {
        // Every scheduler keeps a few values per training timestep; SD uses 1000.
        const MAX_TRAIN_TIMESTEPS: usize = 100_000;
        if !(1..=MAX_TRAIN_TIMESTEPS).contains(&self.num_train_timesteps) {
            return Err(self.error(
                "num_train_timesteps",
                format!(
                    "{} is not in 1..={MAX_TRAIN_TIMESTEPS} (Stable Diffusion uses 1000)",
                    self.num_train_timesteps
                ),
            ));
        }
        Ok(())
    }

    /// The scheduler the folder was saved with, if it is one we implement.
    pub fn kind(&self) -> Option<SchedulerKind> {
        self.class_name
            .as_deref()
            .and_then(SchedulerKind::from_class_name)
    }

    /// `timestep_spacing`, or the default of `kind`'s diffusers class when the config has none.
    pub fn timestep_spacing_for(&self, kind: SchedulerKind) -> TimestepSpacing {
        self.timestep_spacing.unwrap_or(match kind {
            SchedulerKind::Ddim | SchedulerKind::Ddpm => TimestepSpacing::Leading,
            _ => TimestepSpacing::Linspace,
        })
    }

    /// A config error about `field` of this config.
    pub(crate) fn error(&self, field: &str, message: impl Into<String>) -> Error {
        Error::config(&self.path, field, message)
    }

    /// Fails with a clear message when a boolean option we do not implement is on.
    pub(crate) fn reject_if(&self, on: bool, field: &str, scheduler: SchedulerKind) -> Result<()> {
        match on {
            true => Err(self.error(
                field,
                format!("`true` is not supported by the {scheduler} scheduler"),
            )),
            false => Ok(()),
        }
    }
}

/// An enum spelled as a string in the config.
trait ConfigChoice: Copy + 'static {
    const NAMES: &'static [(&'static str, Self)];
}

impl ConfigChoice for BetaSchedule {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("linear", Self::Linear),
        ("scaled_linear", Self::ScaledLinear),
        ("squaredcos_cap_v2", Self::SquaredcosCapV2),
    ];
}

impl ConfigChoice for PredictionType {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("epsilon", Self::Epsilon),
        ("v_prediction", Self::VPrediction),
        ("sample", Self::Sample),
    ];
}

impl ConfigChoice for TimestepSpacing {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("leading", Self::Leading),
        ("trailing", Self::Trailing),
        ("linspace", Self::Linspace),
    ];
}

impl ConfigChoice for FinalSigmasType {
    const NAMES: &'static [(&'static str, Self)] =
        &[("zero", Self::Zero), ("sigma_min", Self::SigmaMin)];
}

/// One field's value, read with the field's name in any error.
struct Field<'a> {
    key: &'a str,
    value: &'a Value,
    path: &'a Path,
}

impl Field<'_> {
    fn error(&self, message: impl Into<String>) -> Error {
        Error::config(self.path, self.key, message)
    }

    /// `null` means the default, as a missing key does for diffusers.
    fn get<T: DeserializeOwned>(&self, default: T) -> Result<T> {
        match self.value {
            Value::Null => Ok(default),
            v => T::deserialize(v).map_err(|e| self.error(e.to_string())),
        }
    }

    /// `None` for `null`, else the value read by `read`.
    fn optional<T>(&self, read: impl FnOnce(&Self) -> Result<T>) -> Result<Option<T>> {
        match self.value {
            Value::Null => Ok(None),
            _ => read(self).map(Some),
        }
    }

    /// A number, or one of the infinite spellings Python's json module writes.
    fn float(&self, default: f64) -> Result<f64> {
        match self.value {
            Value::Null => Ok(default),
            Value::Number(n) => n.as_f64().ok_or_else(|| self.error("not a number")),
            Value::String(s) if s == "-Infinity" => Ok(f64::NEG_INFINITY),
            Value::String(s) if s == "Infinity" => Ok(f64::INFINITY),
            other => Err(self.error(format!("expected a number, got {other}"))),
        }
    }

    fn choice<T: ConfigChoice>(&self, default: T) -> Result<T> {
        if self.value.is_null() {
            return Ok(default);
        }
        let found = self
            .value
            .as_str()
            .and_then(|s| T::NAMES.iter().find(|(n, _)| *n == s));
        found.map(|(_, t)| *t).ok_or_else(|| {
            let names: Vec<_> = T::NAMES.iter().map(|(n, _)| *n).collect();
            self.error(format!(
                "unsupported value {} (supported: {})",
                self.value,
                names.join(", ")
            ))
        })
    }
}

/// Python's json module writes `Infinity`, `-Infinity` and `NaN`, which are not JSON. Quote them
/// (outside strings) so serde_json reads them as strings that [`Field::float`] understands.
fn quote_non_finite(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if !in_string {
            if let Some(word) = ["-Infinity", "Infinity", "NaN"]
                .into_iter()
                .find(|w| rest.starts_with(w))
            {
                out.push('"');
                out.push_str(word);
                out.push('"');
                rest = &rest[word.len()..];
                continue;
            }
        }
        match c {
            _ if escaped => escaped = false,
            '\\' if in_string => escaped = true,
            '"' => in_string = !in_string,
            _ => {}
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<SchedulerConfig> {
        SchedulerConfig::from_json_str(text, Path::new("sched.json"))
    }

    fn field_of(err: Error) -> String {
        match err {
            Error::Config { path, field, .. } => {
                assert_eq!(path, Path::new("sched.json"));
                field
            }
            other => panic!("expected a config error, got {other}"),
        }
    }

    #[test]
    fn reads_diffusers_configs_and_ignores_unknown_fields() {
        let c = SchedulerConfig::from_file(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/tiny-sd2/scheduler/scheduler_config.json"
        )))
        .unwrap();
        assert_eq!(c.kind(), Some(SchedulerKind::Ddim));
        assert_eq!(c.prediction_type, PredictionType::VPrediction);
        assert_eq!(c.timestep_spacing, Some(TimestepSpacing::Trailing));
        assert_eq!(
            (c.beta_start, c.beta_end, c.steps_offset),
            (0.00085, 0.012, 1)
        );
        assert_eq!(c.beta_schedule, BetaSchedule::ScaledLinear);
        assert!(!c.set_alpha_to_one && !c.clip_sample);

        let pndm = parse(
            r#"{"_class_name": "PNDMScheduler", "skip_prk_steps": true, "trained_betas": null,
            "lambda_min_clipped": -Infinity, "note": "NaN -Infinity \"Infinity\""}"#,
        )
        .unwrap();
        assert_eq!(pndm.kind(), None);
        assert_eq!(pndm.class_name.as_deref(), Some("PNDMScheduler"));
        assert_eq!(pndm.lambda_min_clipped, f64::NEG_INFINITY);
        assert_eq!(pndm.timestep_spacing, None);
        assert_eq!(
            pndm.timestep_spacing_for(SchedulerKind::Ddim),
            TimestepSpacing::Leading
        );
        assert_eq!(
            pndm.timestep_spacing_for(SchedulerKind::Euler),
            TimestepSpacing::Linspace
        );
        assert_eq!(pndm.num_train_timesteps, 1000);
        assert_eq!(pndm.solver_order, 2);
    }

    #[test]
    fn overrides_set_fields_and_name_bad_options() {
        let base = parse(r#"{"timestep_spacing": "leading", "steps_offset": 1}"#).unwrap();
        let c = base
            .with_overrides(&[
                ("timestep_spacing", "trailing"),
                ("eta", "0.5"),
                ("clip_sample", "false"),
                ("steps_offset", "null"),
                ("lambda_min_clipped", "-Infinity"),
            ])
            .unwrap();
        assert_eq!(c.timestep_spacing, Some(TimestepSpacing::Trailing));
        assert_eq!((c.eta, c.clip_sample, c.steps_offset), (0.5, false, 0));
        assert_eq!(c.lambda_min_clipped, f64::NEG_INFINITY);
        assert_eq!(
            base.with_overrides(&[("timestep_spacing", "null")])
                .unwrap()
                .timestep_spacing,
            None
        );
        for (key, value) in [
            ("etta", "0.5"),
            ("beta_schedule", "cosine"),
            ("num_train_timesteps", "0"),
        ] {
            match base.with_overrides(&[(key, value)]).unwrap_err() {
                Error::Argument { name, .. } => assert_eq!(name, format!("scheduler option {key}")),
                other => panic!("{key}: expected an argument error, got {other}"),
            }
        }
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(
            field_of(parse(r#"{"beta_schedule": "sigmoid"}"#).unwrap_err()),
            "beta_schedule"
        );
        assert_eq!(
            field_of(parse(r#"{"timestep_spacing": "middle"}"#).unwrap_err()),
            "timestep_spacing"
        );
        assert_eq!(
            field_of(parse(r#"{"prediction_type": "flow_prediction"}"#).unwrap_err()),
            "prediction_type"
        );
        assert_eq!(
            field_of(parse(r#"{"steps_offset": -1}"#).unwrap_err()),
            "steps_offset"
        );
        assert_eq!(
            field_of(parse(r#"{"beta_end": "big"}"#).unwrap_err()),
            "beta_end"
        );
        assert_eq!(
            field_of(parse(r#"{"num_train_timesteps": 0}"#).unwrap_err()),
            "num_train_timesteps"
        );
        assert!(matches!(parse("{").unwrap_err(), Error::Json { .. }));
        let missing = SchedulerConfig::from_file(Path::new("/nonexistent/scheduler_config.json"));
        assert!(matches!(missing.unwrap_err(), Error::Io { .. }));
    }
}
