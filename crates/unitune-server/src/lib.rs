//! `unitune serve`: a web page and an HTTP API to tune a photo once and edit it live.
//!
//! The page (`page/`, embedded in the binary) and the JSON API ([`api`]) sit on axum; the work
//! runs on one worker thread per device ([`worker`]) that takes jobs from a bounded queue
//! ([`queue`]) and calls the library's job layer (`unitune::jobs`), as the CLI does. Sessions,
//! edits and their settings persist under `--data` ([`store`]); a restart lists them again.
//!
//! With `--nats`, the same page and API queue jobs on NATS JetStream instead, for any number of
//! `unitune worker`s on other machines, and keep sessions and edits there ([`nats`]).

pub mod api;
mod config;
pub mod nats;
mod page;
pub mod params;
pub mod queue;
pub mod store;
mod upload;
mod worker;

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use serde_json::json;
use tokio::sync::oneshot;

pub use config::{Limits, ServeConfig, WorkerConfig};
use params::{EditParams, TuneParams};
use unitune::jobs::ModelDefaults;

/// A running server: its address, and how to stop it.
pub struct Server {
    pub addr: SocketAddr,
    queue: Arc<dyn queue::JobQueue>,
    stop: Option<oneshot::Sender<()>>,
    http: Option<JoinHandle<()>>,
    worker: Option<JoinHandle<()>>,
}

impl Server {
    /// Checks the config, opens the store, loads the model and starts listening; returns once
    /// requests are accepted. Errors say which flag or file is at fault.
    pub fn start(config: ServeConfig) -> Result<Self, String> {
        config.check()?;
        let config = Arc::new(config);
        let (store, queue, worker, (width, height)) = match &config.nats {
            None => {
                let store: Arc<dyn store::Records> =
                    Arc::new(store::Store::open(&config.data).map_err(|e| format!("--data: {e}"))?);
                let worker = worker::Worker::new(config.worker(), store.clone())
                    .map_err(|e| format!("--model {}: {e}", config.model.display()))?;
                let size = worker.native_size().map_err(|e| e.to_string())?;
                let queue = Arc::new(queue::Queue::new(config.limits.queue_capacity));
                let jobs = queue.clone();
                let worker = std::thread::spawn(move || worker.run(jobs));
                (store, queue as Arc<dyn queue::JobQueue>, Some(worker), size)
            }
            Some(url) => {
                let size = native_size(&config.model, &config.single_file)
                    .map_err(|e| format!("--model {}: {e}", config.model.display()))?;
                let nats = Arc::new(nats::Nats::connect(url)?);
                let store: Arc<dyn store::Records> = Arc::new(nats::NatsStore::new(nats.clone()));
                let capacity = config.limits.queue_capacity;
                let queue: Arc<dyn queue::JobQueue> =
                    Arc::new(nats::NatsQueue::new(nats, capacity));
                (store, queue, None, size)
            }
        };
        let defaults = ModelDefaults::read(&config.model).map_err(|e| format!("--model: {e}"))?;
        let (tune_defaults, edit_defaults) = (
            TuneParams::defaults(&defaults),
            EditParams::defaults(&defaults),
        );
        let info = json!({
            "model": config.model_name,
            "size": [width, height],
            "tune": tune_defaults,
            "edit": edit_defaults,
            "limits": config.limits,
            "auth": config.token.is_some(),
        });
        let app = Arc::new(api::App {
            config: config.clone(),
            store,
            queue: queue.clone(),
            info,
            tune_defaults,
            edit_defaults,
        });

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the server's runtime: {e}"))?;
        // Bound here, so that a port in use is an error of `start`, and so that `start` works
        // from inside another runtime (tests) too.
        let listener = std::net::TcpListener::bind(config.listen)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| format!("--listen {}: {e}", config.listen))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let (stop, stopped) = oneshot::channel::<()>();
        let router = api::router(app);
        let http = std::thread::spawn(move || {
            let served = runtime.block_on(async {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                axum::serve(listener, router)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await
            });
            if let Err(e) = served {
                eprintln!("error: the server stopped: {e}");
            }
        });
        Ok(Self {
            addr,
            queue,
            stop: Some(stop),
            http: Some(http),
            worker,
        })
    }

    /// Serves until Ctrl-C (or SIGTERM), then stops: a running job is cancelled at its next
    /// step, so a tune in progress writes no session.
    pub fn run_until_signal(self) {
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime.block_on(signalled()),
            Err(e) => eprintln!("error: cannot wait for Ctrl-C ({e}); stopping"),
        }
        eprintln!("stopping: the running job, if any, is cancelled");
        self.stop();
    }

    /// Stops listening, cancels the running job and waits for the worker.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.queue.close();
        for handle in [self.http.take(), self.worker.take()].into_iter().flatten() {
            let _ = handle.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Returns at Ctrl-C (SIGINT) or SIGTERM.
async fn signalled() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// The picture size a model's configs give (`unet` sample size times the autoencoder's
/// factor), read without loading its weights (of a single file: its header).
fn native_size(
    model: &std::path::Path,
    single_file: &unitune::weights::single_file::SingleFileOptions,
) -> unitune::Result<(usize, usize)> {
    use unitune::models::unet::UNet2DConditionConfig;
    use unitune::models::vae::VaeConfig;
    use unitune::weights::single_file::{is_single_file, SingleFile};
    let (unet, vae) = match is_single_file(model) {
        true => {
            let c = SingleFile::configs(model, single_file)?;
            (c.unet, c.vae)
        }
        false => (
            UNet2DConditionConfig::from_file(&model.join("unet/config.json"))?,
            VaeConfig::from_file(&model.join("vae/config.json"))?,
        ),
    };
    let side = unet.sample_size.ok_or_else(|| {
        unitune::Error::argument("model", "its unet/config.json has no sample_size")
    })? * vae.scale_factor();
    Ok((side, side))
}

/// Runs `unitune worker`: jobs from NATS until `stop` is set.
pub fn run_worker(
    config: WorkerConfig,
    options: nats::worker::WorkerOptions,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<(), String> {
    nats::worker::run(config, options, stop)
}
