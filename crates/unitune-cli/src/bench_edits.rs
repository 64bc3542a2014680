//! `unitune bench-edits`: edit quality on held-out world scenes against ground truth
//! (`unitune_lab::bench_edits`), printed as Markdown tables or one JSON object, with an optional
//! example grid.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use unitune::session::DeltaEncoding;
use unitune::train::tune::TrainableLayers;
use unitune_lab::bench_edits::{self, BenchEditsConfig};

use crate::common::{check_output, DistillArgs};

#[derive(Args)]
pub struct BenchEditsArgs {
    /// The model folder [default: the built-in model].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Held-out scenes to edit.
    #[arg(long, default_value_t = BenchEditsConfig::default().scenes)]
    scenes: usize,
    /// World seed of the held-out scenes, and seed of every noise draw.
    #[arg(long, default_value_t = BenchEditsConfig::default().seed)]
    seed: u64,
    /// UniTune tuning steps (batch 4, Adafactor).
    #[arg(long, default_value_t = BenchEditsConfig::default().tune_steps)]
    tune_steps: usize,
    /// The layers those tunes train (see `tune --layers`); the model-defaults row keeps the
    /// model's.
    #[arg(long, default_value = "most")]
    tune_layers: TrainableLayers,
    /// The rank of --tune-layers lora [default: 8].
    #[arg(long)]
    lora_rank: Option<usize>,
    /// UniTune learning rates, comma-separated; each is a separate tune per scene.
    #[arg(long, value_delimiter = ',', default_values_t = BenchEditsConfig::default().tune_lr)]
    tune_lr: Vec<f64>,
    /// Sampling steps (DDIM) of every method.
    #[arg(long, default_value_t = BenchEditsConfig::default().steps)]
    steps: usize,
    /// UniTune guidance scales, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = BenchEditsConfig::default().guidance)]
    guidance: Vec<f64>,
    /// UniTune start fractions (1 = from noise), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = BenchEditsConfig::default().start)]
    start: Vec<f64>,
    /// Also run every UniTune setting with an automatic mask.
    #[arg(long)]
    auto_mask: bool,
    /// Also run every UniTune setting with prompt guidance at these weights (comma-separated),
    /// the scene's caption as the baseline prompt.
    #[arg(long, value_delimiter = ',', value_name = "W,W,...")]
    prompt_guidance: Vec<f64>,
    /// SDEdit strengths, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = BenchEditsConfig::default().strengths)]
    strengths: Vec<f64>,
    /// Classifier-free guidance of SDEdit and plain generation.
    #[arg(long, default_value_t = BenchEditsConfig::default().baseline_guidance)]
    baseline_guidance: f64,
    /// Most objects per scene [default: the model's pretraining setting, else 2].
    #[arg(long)]
    max_objects: Option<usize>,
    /// Keep every tune's session in this folder and reuse it when a later run asks for the same
    /// tune (model, scene and settings), to sweep edit settings without retuning.
    #[arg(long, value_name = "DIR")]
    sessions: Option<PathBuf>,
    /// How each tune's session is stored (see `tune --delta-encoding`); the edits use it as a
    /// file in this code gives it back [default: the tune's, lora for a LoRA tune, else q8].
    #[arg(long)]
    delta_encoding: Option<DeltaEncoding>,
    /// The encoding the tunes train for [default: --delta-encoding]; another one measures what
    /// rounding after the tune loses.
    #[arg(long)]
    tune_delta_encoding: Option<DeltaEncoding>,
    #[command(flatten)]
    distill: DistillArgs,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
    /// Write an example grid (rows: scenes; columns: base, truth, best UniTune, best SDEdit,
    /// plain) to this PNG.
    #[arg(long)]
    grid: Option<PathBuf>,
    /// Pixels per scene pixel in the grid (nearest-neighbour upscaling).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=8))]
    grid_scale: u32,
}

pub fn run(args: BenchEditsArgs) -> Result<()> {
    if let Some(grid) = &args.grid {
        check_output(grid, None)?;
    }
    let config = BenchEditsConfig {
        model: crate::builtin::model_dir(args.model.as_deref())?,
        scenes: args.scenes,
        seed: args.seed,
        tune_steps: args.tune_steps,
        tune_layers: args.tune_layers,
        lora_rank: args.lora_rank,
        tune_lr: args.tune_lr,
        steps: args.steps,
        guidance: args.guidance,
        start: args.start,
        auto_mask: args.auto_mask,
        prompt_guidance: args.prompt_guidance,
        strengths: args.strengths,
        baseline_guidance: args.baseline_guidance,
        max_objects: args.max_objects,
        sessions: args.sessions,
        delta_encoding: args.delta_encoding,
        tune_delta_encoding: args.tune_delta_encoding,
        distill_steps: args.distill.distill_steps,
        distill_lr: args.distill.distill_lr,
        distill_difference_weight: args.distill.distill_difference_weight,
    };
    let m = bench_edits::measure(&config)?;
    if let Some(path) = &args.grid {
        bench_edits::write_grid(&m, args.grid_scale, path)?;
    }
    if args.json {
        println!("{}", bench_edits::to_json(&config, &m));
    } else {
        print!("{}", bench_edits::to_tables(&config, &m));
    }
    Ok(())
}
