//! `unitune worker`: runs the jobs that `unitune serve --nats` front ends queue on NATS
//! JetStream, on this machine's device, until Ctrl-C or SIGTERM (the running job then goes back
//! to the queue for another worker).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use unitune_server::nats::worker::WorkerOptions;
use unitune_server::{Limits, WorkerConfig};

use crate::common::ModelArgs;

#[derive(Args)]
pub struct WorkerArgs {
    /// The NATS server (JetStream on), e.g. nats://127.0.0.1:4222.
    #[arg(long, value_name = "URL")]
    nats: String,
    /// The model every session is tuned on: the same as the front ends'.
    #[command(flatten)]
    model: ModelArgs,
    /// Tuned sessions kept loaded for their edits.
    #[arg(long, default_value_t = Limits::default().loaded_sessions)]
    loaded_sessions: usize,
    /// Seconds without a sign of life after which JetStream gives a running job to another
    /// worker (a running worker signals every third of it).
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    ack_wait: f64,
}

pub fn run(args: WorkerArgs) -> Result<()> {
    if !(args.ack_wait.is_finite() && args.ack_wait >= 1.0) {
        anyhow::bail!(
            "--ack-wait: {} is not a number of seconds >= 1",
            args.ack_wait
        );
    }
    let device = crate::common::parse_device(&args.model.device)?;
    let config = WorkerConfig {
        model: args.model.dir()?,
        single_file: args.model.single_file(),
        dtype: args.model.dtype(&device)?,
        device,
        limits: Limits {
            loaded_sessions: args.loaded_sessions,
            ..Limits::default()
        },
    };
    let options = WorkerOptions {
        url: args.nats,
        ack_wait: Duration::from_secs_f64(args.ack_wait),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("stopping: the running job, if any, goes back to the queue (again to quit now)");
    })?;
    unitune_server::run_worker(config, options, stop).map_err(anyhow::Error::msg)
}
