//! Fuzz targets: each hands arbitrary bytes to one of unitune's readers of outside files, the way
//! the program reads them (from a file on disk, next to the real fixture files where the reader
//! needs them). Any error is a pass; a panic, an abort, a hang or a huge allocation is a bug.
//!
//! The AFL++ harness (`src/main.rs`, feature `afl`) runs them; `tests/corpus.rs` replays every
//! committed seed and crash input under plain `cargo test`, so no fuzzer is needed in CI.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use unitune::image_io::load_image;
use unitune::jobs::read_prompts_file;
use unitune::models::clip::ClipTextModel;
use unitune::models::unet::UNet2DConditionModel;
use unitune::models::vae::AutoencoderKl;
use unitune::pipelines::{read_init_noise, Mask};
use unitune::schedulers::{build, SchedulerConfig, SchedulerKind};
use unitune::session::Session;
use unitune::tokenizer::ClipTokenizer;
use unitune::weights::folder::check_model_index;
use unitune::weights::single_file::{SingleFile, SingleFileOptions};
use unitune::weights::WeightStore;

/// A fuzz target: its name, and the function that reads one input.
pub type Target = (&'static str, fn(&[u8]));

/// Every target, by the name the harness and the corpus folders use.
pub const TARGETS: &[Target] = &[
    ("safetensors", safetensors),
    ("single_file", single_file),
    ("shard_index", shard_index),
    ("unet_config", unet_config),
    ("vae_config", vae_config),
    ("text_encoder_config", text_encoder_config),
    ("scheduler_config", scheduler_config),
    ("model_index", model_index),
    ("tokenizer", tokenizer),
    ("session", session),
    ("image", image),
    ("mask", mask),
    ("prompts", prompts),
    ("init_noise", init_noise),
];

pub fn target(name: &str) -> Option<fn(&[u8])> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

/// The tiny SD 1.x test pipeline whose files surround the fuzzed one.
pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/tiny-sd1")
        .join(rel)
}

/// A folder for `target`'s files. Named after the parent process (AFL's fork server, or the test
/// runner), which lives as long as the fuzzing session, so that the short-lived processes AFL
/// forks share one folder instead of each leaving its own; and after the thread, since tests run
/// targets in parallel.
fn scratch(target: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "unitune-fuzz-{}-{:?}/{target}",
        std::os::unix::process::parent_id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).expect("scratch folder");
    dir
}

fn write(path: &Path, data: &[u8]) {
    std::fs::write(path, data).expect("scratch file");
}

/// A component folder holding the fixture's weights (linked once) and the fuzzed `config.json`.
fn component_with_config(target: &str, component: &str, data: &[u8]) -> PathBuf {
    let dir = scratch(target).join(component);
    if !dir.exists() {
        std::fs::create_dir_all(&dir).expect("component folder");
        for entry in std::fs::read_dir(fixture(component)).expect("fixture folder") {
            let entry = entry.expect("fixture entry");
            if entry.file_name() != "config.json" {
                std::fs::copy(entry.path(), dir.join(entry.file_name())).expect("fixture copy");
            }
        }
    }
    write(&dir.join("config.json"), data);
    dir
}

/// Weights as the loader reads them: the file is a component's only weights file.
pub fn safetensors(data: &[u8]) {
    let dir = scratch("safetensors");
    write(&dir.join("diffusion_pytorch_model.safetensors"), data);
    if let Ok(store) = WeightStore::open(&dir, None, &Device::Cpu) {
        for tensor in store.tensors().values() {
            let _ = tensor.to_dtype(DType::F32);
        }
    }
}

/// A single-file checkpoint: its configs inferred from its header, then its tensors converted
/// with the tiny SD 1.x folder's configs (`--config`).
pub fn single_file(data: &[u8]) {
    let path = scratch("single_file").join("model.safetensors");
    write(&path, data);
    let _ = SingleFile::configs(&path, &SingleFileOptions::default());
    let options = SingleFileOptions {
        config: Some(fixture("")),
        ..Default::default()
    };
    let _ = SingleFile::open(&path, &options, &Device::Cpu);
}

/// A sharded index over two small valid shards beside it.
pub fn shard_index(data: &[u8]) {
    let dir = scratch("shard_index");
    for (name, key) in [("a.safetensors", "a"), ("b.safetensors", "b")] {
        let path = dir.join(name);
        if !path.exists() {
            let t = Tensor::ones((2, 3), DType::F32, &Device::Cpu).expect("tensor");
            candle_core::safetensors::save(&HashMap::from([(key, t)]), &path).expect("shard");
        }
    }
    write(
        &dir.join("diffusion_pytorch_model.safetensors.index.json"),
        data,
    );
    let _ = WeightStore::open(&dir, None, &Device::Cpu);
}

/// A UNet config, built against the fixture's weights as the loader does.
pub fn unet_config(data: &[u8]) {
    let dir = component_with_config("unet_config", "unet", data);
    let _ = UNet2DConditionModel::load(&dir, None, DType::F32, &Device::Cpu);
}

pub fn vae_config(data: &[u8]) {
    let dir = component_with_config("vae_config", "vae", data);
    let _ = AutoencoderKl::load(&dir, None, DType::F32, &Device::Cpu);
}

pub fn text_encoder_config(data: &[u8]) {
    let dir = component_with_config("text_encoder_config", "text_encoder", data);
    let _ = ClipTextModel::load(&dir, None, DType::F32, &Device::Cpu);
}

/// A scheduler config, then every scheduler built from it and asked for a few schedules.
pub fn scheduler_config(data: &[u8]) {
    let path = scratch("scheduler_config").join("scheduler_config.json");
    write(&path, data);
    let Ok(config) = SchedulerConfig::from_file(&path) else {
        return;
    };
    for kind in SchedulerKind::ALL {
        if let Ok(mut scheduler) = build(kind, &config) {
            for steps in [1, 7, 50] {
                let _ = scheduler.set_timesteps(steps);
            }
        }
    }
}

pub fn model_index(data: &[u8]) {
    let dir = scratch("model_index");
    write(&dir.join("model_index.json"), data);
    let _ = check_model_index(&dir);
}

/// The tokenizer folder's four files, in one input split at NUL bytes: vocab.json, merges.txt,
/// tokenizer_config.json, special_tokens_map.json (a missing part is a missing file). A
/// tokenizer that loads encodes a few prompts.
pub fn tokenizer(data: &[u8]) {
    let dir = scratch("tokenizer");
    let names = [
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ];
    let mut parts = data.splitn(names.len(), |&b| b == 0);
    for name in names {
        match parts.next() {
            Some(part) => write(&dir.join(name), part),
            None => {
                let _ = std::fs::remove_file(dir.join(name));
            }
        }
    }
    if let Ok(tokenizer) = ClipTokenizer::from_dir(&dir) {
        for prompt in ["a photo of beikkpic", "", "<|endoftext|> dog's  ÄÖ 123 🙂"] {
            let ids = tokenizer.encode(prompt).ids;
            let _ = tokenizer.decode(&ids);
        }
    }
}

/// A session file, applied to the fixture's UNet weights when it loads.
pub fn session(data: &[u8]) {
    static BASE: OnceLock<HashMap<String, Tensor>> = OnceLock::new();
    let path = scratch("session").join("fuzz.session");
    write(&path, data);
    if let Ok(session) = Session::load(&path) {
        let base = BASE.get_or_init(|| {
            WeightStore::open(&fixture("unet"), None, &Device::Cpu)
                .expect("fixture UNet")
                .tensors()
                .clone()
        });
        let _ = session.apply(base, &path);
    }
}

pub fn image(data: &[u8]) {
    let path = scratch("image").join("photo.png");
    write(&path, data);
    let _ = load_image(&path);
}

/// A mask picture, read at the size of a 64 x 48 picture.
pub fn mask(data: &[u8]) {
    let path = scratch("mask").join("mask.png");
    write(&path, data);
    let _ = Mask::load(&path, 64, 48);
}

pub fn prompts(data: &[u8]) {
    let path = scratch("prompts").join("prompts.txt");
    write(&path, data);
    let _ = read_prompts_file(&path);
}

pub fn init_noise(data: &[u8]) {
    let path = scratch("init_noise").join("noise.safetensors");
    write(&path, data);
    let _ = read_init_noise(&path, &Device::Cpu);
}
