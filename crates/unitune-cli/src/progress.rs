//! Progress bars (indicatif) and Ctrl-C: the first Ctrl-C asks the running loop to stop at the
//! next step so that no output is half written; a second one exits at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};

pub struct BarProgress {
    bar: Option<ProgressBar>,
    interrupted: Arc<AtomicBool>,
}

impl BarProgress {
    pub fn new() -> Self {
        let interrupted = Arc::new(AtomicBool::new(false));
        let flag = interrupted.clone();
        // Fails only if a handler is already set, which happens once per process at most.
        let _ = ctrlc::set_handler(move || {
            if flag.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\nstopping after this step (Ctrl-C again to quit now)");
        });
        Self {
            bar: None,
            interrupted,
        }
    }
}

impl unitune::pipelines::Progress for BarProgress {
    fn start(&mut self, label: &str, total: usize) {
        let bar = ProgressBar::new(total as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>10} [{bar:30}] {pos}/{len} {per_sec} ETA {eta} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(label.to_string());
        self.bar = Some(bar);
    }

    fn step(&mut self, message: Option<&str>) {
        if let Some(bar) = &self.bar {
            if let Some(m) = message {
                bar.set_message(m.to_string());
            }
            bar.inc(1);
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }

    fn warn(&mut self, text: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("warning: {text}")),
            None => eprintln!("warning: {text}"),
        }
    }

    fn cancelled(&self) -> bool {
        self.interrupted.load(Ordering::SeqCst)
    }
}
