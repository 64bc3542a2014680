//! The job layer: what every front end (the CLI, the web server, queue workers) asks of unitune,
//! with the defaults, the checks, progress and cancellation in one place.
//!
//! - [`TuneJob`]: "tune this image with these settings". [`TuneJob::prepare`] resolves the
//!   defaults against the loaded model (token, size, seed) and checks everything before any work;
//!   [`PreparedTune::run`] tunes and returns the [`Session`](crate::session::Session) as a value,
//!   for the front end to save where it keeps sessions.
//! - [`EditJob`]: "run these edits on this session": prompts x seeds x guidance values x start
//!   values, with an optional mask. [`EditJob::plan`] lays the edits out (with the name suffix of
//!   each, and the contact sheets of sweeps); [`Editor`] runs them on a tuned model, handing every
//!   result to the caller as an [`EditEvent`] as soon as it is done.
//!
//! - [`ModelDefaults`]: a model folder's own recommended settings (`unitune.json`), which the
//!   front ends start from instead of the paper's where a model has them.
//!
//! Progress and cancellation go through [`Progress`](crate::pipelines::Progress): a front end
//! shows the steps and asks to stop through it; a cancelled job ends with
//! [`Error::Interrupted`](crate::Error::Interrupted) between two steps, having handed out only
//! finished results.

mod defaults;
mod edit;
mod tune;

pub use defaults::{EditDefaults, ModelDefaults, TuneDefaults, MODEL_DEFAULTS_FILE};
pub use edit::{read_prompts_file, EditEvent, EditGroup, EditItem, EditJob, Editor};
pub use tune::{PreparedTune, TuneJob};
