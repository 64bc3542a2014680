//! `unitune serve`: a web page and an HTTP API to tune a photo once and edit it live.
//!
//! The page (`page/`, embedded in the binary) and the JSON API ([`api`]) sit on axum; the work
//! runs on one worker thread per device ([`worker`]) that takes jobs from a bounded queue
//! ([`queue`]) and calls the library's job layer (`unitune::jobs`), as the CLI does. Sessions,
//! edits and their settings persist under `--data` ([`store`]); a restart lists them again.

pub mod api;
mod config;
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

pub use config::{Limits, ServeConfig};
use params::{EditParams, TuneParams};

/// A running server: its address, and how to stop it.
pub struct Server {
    pub addr: SocketAddr,
    queue: Arc<queue::Queue>,
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
        let store = Arc::new(store::Store::open(&config.data).map_err(|e| format!("--data: {e}"))?);
        let worker = worker::Worker::new(config.clone(), store.clone())
            .map_err(|e| format!("--model {}: {e}", config.model.display()))?;
        let (width, height) = worker.native_size().map_err(|e| e.to_string())?;
        let queue = Arc::new(queue::Queue::new(config.limits.queue_capacity));
        let info = json!({
            "model": config.model_name,
            "size": [width, height],
            "tune": TuneParams::default(),
            "edit": EditParams::default(),
            "limits": config.limits,
            "auth": config.token.is_some(),
        });
        let app = Arc::new(api::App {
            config: config.clone(),
            store,
            queue: queue.clone(),
            info,
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
        let jobs = queue.clone();
        let worker = std::thread::spawn(move || worker.run(jobs));
        Ok(Self {
            addr,
            queue,
            stop: Some(stop),
            http: Some(http),
            worker: Some(worker),
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
        for job in self.queue.active() {
            if let Some(id) = job["id"].as_str() {
                self.queue.cancel(id);
            }
        }
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
