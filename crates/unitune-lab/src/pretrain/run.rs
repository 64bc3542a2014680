//! The training loops of both phases and their checkpoints: what happens between two steps
//! (progress, cancel, periodic checkpoints) and at the end of a phase.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Var};
use rand::Rng;

use super::data::Dataset;
use super::denoiser::{DenoiserTrainer, LatentCache};
use super::state::{Phase, TrainingState, STATE_FILE};
use super::vae::{self, VaeTrainer};
use super::{learning_rate, step_rng, Architecture, Stream, WeightsDtype};
use unitune::models::vae::AutoencoderKl;
use unitune::noise::Noise;
use unitune::pipelines::Progress;
use unitune::train::OptimizerKind;
use unitune::weights::export::{self, PipelineParts, SpecialTokenIds, Tensors, TokenizerFiles};
use unitune::weights::WeightStore;
use unitune::{atomic, Error, Result};

/// Pictures whose latents set the autoencoder's scaling factor.
const SCALE_SAMPLES: usize = 1024;

/// What both phases share: where to write, and the parts of the folder that do not train.
pub(super) struct Run<'a> {
    output: &'a Path,
    device: &'a Device,
    tokenizer: TokenizerFiles,
    special: SpecialTokenIds,
    pub arch: Architecture,
    /// The frozen autoencoder's weights, once its phase is over.
    pub vae_tensors: Tensors,
}

impl<'a> Run<'a> {
    pub fn new(
        output: &'a Path,
        device: &'a Device,
        tokenizer: TokenizerFiles,
        special: SpecialTokenIds,
        arch: Architecture,
    ) -> Self {
        Self {
            output,
            device,
            tokenizer,
            special,
            arch,
            vae_tensors: Tensors::new(),
        }
    }

    /// Runs the autoencoder phase to `vae_steps`, measures its latent scale, and writes the
    /// checkpoint that starts phase two.
    pub fn train_vae(
        &mut self,
        trainer: &mut VaeTrainer,
        data: &Dataset,
        state: &mut TrainingState,
        progress: &mut dyn Progress,
    ) -> Result<()> {
        let s = state.settings.clone();
        let resumed_at = state.vae_step;
        let mut clock = Instant::now();
        progress.start("autoencoder", s.vae_steps - state.vae_step);
        while state.vae_step < s.vae_steps {
            if progress.cancelled() {
                progress.finish();
                self.checkpoint_vae(trainer, state, &mut clock)?;
                return Err(Error::Interrupted);
            }
            let step = state.vae_step;
            let mut rng = step_rng(s.seed, Stream::Vae, step);
            let indices: Vec<usize> = (0..s.vae_batch_size)
                .map(|_| rng.gen_range(0..data.len()))
                .collect();
            let images = data.crops(&indices, s.vae_crop, &mut rng, self.device)?;
            let lr = rewarmed(
                learning_rate(s.vae_learning_rate, step, s.vae_steps, s.warmup_steps),
                step,
                resumed_at,
                s.warmup_steps,
            );
            let losses = trainer.step(&images, &mut Noise::from_rng(rng), lr, s.max_grad_norm)?;
            state.vae_loss.push(losses.loss);
            state.vae_l1.push(losses.l1);
            state.vae_kl.push(losses.kl);
            state.vae_step += 1;
            progress.step(Some(&format!(
                "L1 {:.4} KL {:.0}",
                state.vae_l1.latest(1),
                losses.kl
            )));
            if due(s.checkpoint_every, state.vae_step, s.vae_steps) {
                self.checkpoint_vae(trainer, state, &mut clock)?;
            }
        }
        progress.finish();
        let mut noise = Noise::seeded(s.seed ^ 0x5ca1e);
        let (mean, std) = vae::measure_latents(
            &trainer.vae,
            data,
            SCALE_SAMPLES,
            s.vae_batch_size,
            &mut noise,
            self.device,
        )?;
        self.arch.vae.scaling_factor = 1.0 / std;
        (state.scaling_factor, state.latent_mean) = (Some(1.0 / std), Some(mean));
        state.phase = Phase::Denoiser;
        self.checkpoint_vae(trainer, state, &mut clock)?;
        self.vae_tensors = trainer
            .tensors()
            .into_iter()
            .map(|(name, t)| Ok((name, t.copy()?)))
            .collect::<candle_core::Result<_>>()?;
        Ok(())
    }

    /// Runs the text encoder + UNet phase to `steps` and writes the final folder.
    pub fn train_denoiser(
        &mut self,
        trainer: &mut DenoiserTrainer,
        cache: &LatentCache,
        state: &mut TrainingState,
        progress: &mut dyn Progress,
    ) -> Result<()> {
        let s = state.settings.clone();
        let resumed_at = state.step;
        state.phase = Phase::Denoiser;
        let mut clock = Instant::now();
        progress.start("unet+text", s.steps - state.step);
        while state.step < s.steps {
            if progress.cancelled() {
                progress.finish();
                self.checkpoint_pipeline(trainer, state, &mut clock, WeightsDtype::F32)?;
                return Err(Error::Interrupted);
            }
            let step = state.step;
            let mut rng = step_rng(s.seed, Stream::Draws, step);
            let mut noise = Noise::from_rng(step_rng(s.seed, Stream::Noise, step));
            let draw = trainer.draw(
                cache,
                s.batch_size,
                s.caption_dropout,
                s.offset_noise,
                &mut rng,
                &mut noise,
            )?;
            let lr = rewarmed(
                learning_rate(s.learning_rate, step, s.steps, s.warmup_steps),
                step,
                resumed_at,
                s.warmup_steps,
            );
            let loss = trainer.step(cache, &draw, lr, s.max_grad_norm)?;
            state.loss.push(loss);
            state.step += 1;
            progress.step(Some(&format!("loss {:.4}", state.loss.latest(1))));
            if due(s.checkpoint_every, state.step, s.steps) {
                self.checkpoint_pipeline(trainer, state, &mut clock, WeightsDtype::F32)?;
            }
        }
        progress.finish();
        state.phase = Phase::Done;
        self.checkpoint_pipeline(trainer, state, &mut clock, s.weights_dtype)
    }

    /// The folder during phase one: the autoencoder, the tokenizer and the state.
    fn checkpoint_vae(
        &self,
        trainer: &VaeTrainer,
        state: &mut TrainingState,
        clock: &mut Instant,
    ) -> Result<()> {
        state.vae_seconds += clock.elapsed().as_secs_f64();
        *clock = Instant::now();
        self.write_vae_folder(&trainer.tensors(), state)
    }

    /// Writes the folder of a run whose denoiser has not started: the autoencoder, the tokenizer
    /// and the state.
    pub fn write_vae_folder(&self, tensors: &Tensors, state: &TrainingState) -> Result<()> {
        atomic::replace_dir(self.output, |tmp| {
            export::write_vae(
                &tmp.join("vae"),
                &self.arch.vae,
                tensors,
                candle_core::DType::F32,
            )?;
            self.tokenizer.write(&tmp.join("tokenizer"))?;
            state.write(tmp)
        })
    }

    /// Refines the decoder to `decoder_steps` (the encoder and so the latents unchanged), then
    /// writes the folder with the new autoencoder.
    pub fn train_decoder(
        &mut self,
        data: &Dataset,
        state: &mut TrainingState,
        progress: &mut dyn Progress,
    ) -> Result<()> {
        let s = state.settings.clone();
        let store = WeightStore::from_tensors(self.output.join("vae"), self.vae_tensors.clone())
            .with_trainable(Arc::new(vae::is_decoder));
        let model = store.build(DType::F32, self.device, |vb| {
            AutoencoderKl::new(vb, &self.arch.vae)
        })?;
        let vars = store.trainable_vars();
        let var_refs: Vec<&Var> = vars.iter().map(|(_, v)| v).collect();
        let mut optimizer = OptimizerKind::AdamW.build(
            vars.iter().map(|(_, v)| v.clone()).collect(),
            s.decoder_learning_rate,
        )?;
        let resumed_at = state.decoder_step;
        let mut clock = Instant::now();
        progress.start("decoder", s.decoder_steps - state.decoder_step);
        while state.decoder_step < s.decoder_steps {
            if progress.cancelled() {
                progress.finish();
                self.checkpoint_decoder(&vars, state, &mut clock)?;
                return Err(Error::Interrupted);
            }
            let step = state.decoder_step;
            let mut rng = step_rng(s.seed, Stream::Decoder, step);
            let indices: Vec<usize> = (0..s.vae_batch_size)
                .map(|_| rng.gen_range(0..data.len()))
                .collect();
            let loss = vae::decoder_loss(&model, &data.images(&indices, self.device)?)?;
            let mut grads = loss.backward()?;
            super::clip_grad_norm(&mut grads, &var_refs, s.max_grad_norm)?;
            optimizer.set_learning_rate(rewarmed(
                learning_rate(
                    s.decoder_learning_rate,
                    step,
                    s.decoder_steps,
                    s.warmup_steps,
                ),
                step,
                resumed_at,
                s.warmup_steps,
            ));
            optimizer.step(&grads)?;
            state.decoder_loss.push(loss.to_scalar()?);
            state.decoder_step += 1;
            progress.step(Some(&format!("loss {:.4}", state.decoder_loss.latest(1))));
            if due(s.checkpoint_every, state.decoder_step, s.decoder_steps) {
                self.checkpoint_decoder(&vars, state, &mut clock)?;
            }
        }
        progress.finish();
        self.checkpoint_decoder(&vars, state, &mut clock)
    }

    /// The refined autoencoder and the state; whatever else the folder holds (the denoiser's
    /// checkpoint, the tokenizer) is carried over as it is.
    fn checkpoint_decoder(
        &mut self,
        vars: &[(String, Var)],
        state: &mut TrainingState,
        clock: &mut Instant,
    ) -> Result<()> {
        state.decoder_seconds += clock.elapsed().as_secs_f64();
        *clock = Instant::now();
        for (name, var) in vars {
            self.vae_tensors
                .insert(name.clone(), var.as_tensor().copy()?);
        }
        let current = self.output.to_path_buf();
        atomic::replace_dir(self.output, |tmp| {
            export::copy_tree(&current, tmp, &|rel: &Path| {
                !rel.starts_with("vae") && rel != Path::new(STATE_FILE)
            })?;
            if !tmp.join("tokenizer").is_dir() {
                self.tokenizer.write(&tmp.join("tokenizer"))?;
            }
            export::write_vae(
                &tmp.join("vae"),
                &self.arch.vae,
                &self.vae_tensors,
                candle_core::DType::F32,
            )?;
            state.write(tmp)
        })
    }

    /// The whole pipeline and the state, weights in `dtype`.
    fn checkpoint_pipeline(
        &self,
        trainer: &DenoiserTrainer,
        state: &mut TrainingState,
        clock: &mut Instant,
        dtype: WeightsDtype,
    ) -> Result<()> {
        state.seconds += clock.elapsed().as_secs_f64();
        *clock = Instant::now();
        let (text, unet) = (trainer.text_tensors(), trainer.unet_tensors());
        let parts = PipelineParts {
            text_encoder: (&self.arch.text_encoder, &text),
            special_tokens: self.special,
            vae: (&self.arch.vae, &self.vae_tensors),
            unet: (&self.arch.unet, &unet),
            scheduler: &trainer.scheduler,
            tokenizer: &self.tokenizer,
        };
        atomic::replace_dir(self.output, |tmp| {
            export::write_pipeline(tmp, &parts, dtype.dtype())?;
            state.write(tmp)
        })
    }
}

/// A checkpoint is due every `every` steps, except at the last (the phase's end writes one).
fn due(every: usize, done: usize, total: usize) -> bool {
    every > 0 && done.is_multiple_of(every) && done < total
}

/// After a resume, the warmup is run again from the resumed step (AdamW's moments restart).
fn rewarmed(lr: f64, step: usize, resumed_at: usize, warmup: usize) -> f64 {
    if resumed_at == 0 || warmup == 0 {
        return lr;
    }
    lr * (((step - resumed_at + 1) as f64) / warmup as f64).min(1.0)
}
