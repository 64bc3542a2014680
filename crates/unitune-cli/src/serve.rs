//! `unitune serve`: the web page and HTTP API (`unitune_server`), on the built-in model unless
//! `--model` names another.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use unitune_server::{Limits, ServeConfig, Server};

use crate::common::ModelArgs;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on. Anything but loopback (127.0.0.1, ::1) needs --token.
    #[arg(long, default_value = "127.0.0.1:7860")]
    listen: SocketAddr,
    /// Where sessions and edits are kept [default: $XDG_DATA_HOME/unitune or ~/.local/share/unitune].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Token every API request must carry (`Authorization: Bearer T`, or the page's login form).
    #[arg(long)]
    token: Option<String>,
    /// Jobs that may wait in the queue; more are answered 429 with Retry-After.
    #[arg(long, default_value_t = Limits::default().queue_capacity)]
    queue: usize,
    /// Tuned sessions kept loaded for their edits.
    #[arg(long, default_value_t = Limits::default().loaded_sessions)]
    loaded_sessions: usize,
    /// Queue jobs on this NATS server (JetStream on) for `unitune worker`s, and keep sessions
    /// and edits there instead of under --data (e.g. nats://127.0.0.1:4222).
    #[arg(long, value_name = "URL")]
    nats: Option<String>,
}

pub fn run(args: ServeArgs) -> Result<()> {
    let device = crate::common::parse_device(&args.model.device)?;
    let config = ServeConfig {
        model: args.model.dir()?,
        single_file: args.model.single_file(),
        model_name: match &args.model.model {
            Some(dir) => dir.display().to_string(),
            None => "the built-in shapes-64".into(),
        },
        listen: args.listen,
        data: args.data.unwrap_or_else(default_data_dir),
        token: args.token,
        dtype: args.model.dtype(&device)?,
        device,
        limits: Limits {
            queue_capacity: args.queue,
            loaded_sessions: args.loaded_sessions,
            ..Limits::default()
        },
        nats: args.nats,
    };
    let data = match &config.nats {
        Some(url) => format!("jobs and data on NATS {url}"),
        None => format!("data in {}", config.data.display()),
    };
    let server = Server::start(config).map_err(anyhow::Error::msg)?;
    eprintln!(
        "unitune is serving on http://{} ({data}); Ctrl-C stops it",
        server.addr
    );
    server.run_until_signal();
    Ok(())
}

/// `$XDG_DATA_HOME/unitune`, `~/.local/share/unitune`, or `./unitune-data`.
fn default_data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .map_or_else(|| PathBuf::from("unitune-data"), |d| d.join("unitune"))
}
