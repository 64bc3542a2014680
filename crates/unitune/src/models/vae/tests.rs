//! Parity with diffusers on the tiny fixture VAEs (references from `dev/ref_vae.py`), weight naming,
//! loading errors and gradients.

use std::collections::HashMap;
use std::path::PathBuf;

use super::*;
use crate::models::ops::tests::check_grad;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(rel)
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("ref/vae.safetensors"), &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Encodes both reference images and decodes both reference latents; returns the largest error.
fn check_parity(vae: &AutoencoderKl, prefix: &str, r: &HashMap<String, Tensor>) -> f32 {
    let mut worst = 0f32;
    for shape in ["square", "wide"] {
        let posterior = vae.encode(&r[&format!("x_{shape}")]).unwrap();
        let decoded = vae.decode(&r[&format!("z_{shape}")]).unwrap();
        for (name, ours) in [
            ("mean", &posterior.mean),
            ("logvar", &posterior.logvar),
            ("decoded", &decoded),
        ] {
            let diff = max_diff(ours, &r[&format!("{prefix}.{name}_{shape}")]);
            assert!(diff <= 1e-4, "{prefix} {name} {shape}: max abs diff {diff}");
            worst = worst.max(diff);
        }
    }
    worst
}

#[test]
fn sd1_and_sd2_vaes_match_diffusers() {
    let r = reference();
    let (sd1, cfg) =
        AutoencoderKl::load(&fixture("tiny-sd1/vae"), None, DType::F32, &Device::Cpu).unwrap();
    assert_eq!((sd1.scale_factor(), cfg.scaling_factor), (8, 0.18215));
    assert_eq!(sd1.decode(&r["z_wide"]).unwrap().dims(), &[1, 3, 40, 56]);
    let worst1 = check_parity(&sd1, "sd1", &r);
    // The SD2 fixture ships only `diffusion_pytorch_model.fp16.safetensors`, run here in f32.
    let (sd2, _) = AutoencoderKl::load(
        &fixture("tiny-sd2/vae"),
        Some("fp16"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let worst2 = check_parity(&sd2, "sd2", &r);
    eprintln!("VAE parity: max abs diff sd1 {worst1:e}, sd2 {worst2:e}");
}

#[test]
fn posterior_sample_matches_diffusers_with_replayed_noise() {
    let r = reference();
    let (vae, _) =
        AutoencoderKl::load(&fixture("tiny-sd1/vae"), None, DType::F32, &Device::Cpu).unwrap();
    let posterior = vae.encode(&r["x_square"]).unwrap();
    let sample = posterior
        .sample(&mut Noise::replay([r["noise"].clone()]))
        .unwrap();
    let diff = max_diff(&sample, &r["sd1.sample_square"]);
    assert!(diff <= 1e-4, "{diff}");
    assert_eq!(max_diff(&posterior.mode(), &posterior.mean), 0.0);
}

#[test]
fn old_attention_weight_names_give_the_same_network() {
    let dir = fixture("tiny-sd1/vae");
    let cfg = VaeConfig::from_file(&dir.join("config.json")).unwrap();
    let store = WeightStore::open(&dir, None, &Device::Cpu).unwrap();
    let renames = [
        ("to_q", "query"),
        ("to_k", "key"),
        ("to_v", "value"),
        ("to_out.0", "proj_attn"),
    ];
    let mut renamed = 0;
    let tensors: HashMap<String, Tensor> = store
        .tensors()
        .iter()
        .map(|(name, t)| {
            let old = renames.iter().find_map(|(new, old)| {
                let prefix = name.split(".attentions.0.").next()?;
                let rest = name.strip_prefix(&format!("{prefix}.attentions.0.{new}."))?;
                Some(format!("{prefix}.attentions.0.{old}.{rest}"))
            });
            renamed += old.is_some() as usize;
            (old.unwrap_or_else(|| name.clone()), t.clone())
        })
        .collect();
    // weight and bias of four projections, in the encoder and the decoder.
    assert_eq!(renamed, 16);
    let old_store = WeightStore::from_tensors("old-names.safetensors", tensors);
    let old = AutoencoderKl::new(old_store.var_builder(DType::F32, &Device::Cpu), &cfg).unwrap();
    old_store.ensure_all_used().unwrap();
    let new = AutoencoderKl::new(store.var_builder(DType::F32, &Device::Cpu), &cfg).unwrap();
    let r = reference();
    assert_eq!(
        max_diff(
            &old.encode(&r["x_wide"]).unwrap().mean,
            &new.encode(&r["x_wide"]).unwrap().mean
        ),
        0.0
    );
    assert_eq!(
        max_diff(
            &old.decode(&r["z_wide"]).unwrap(),
            &new.decode(&r["z_wide"]).unwrap()
        ),
        0.0
    );
    check_parity(&old, "sd1", &r);
}

#[test]
fn config_and_weights_that_disagree_are_refused() {
    let dir = std::env::temp_dir().join(format!("unitune-vae-mismatch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let weights = fixture("tiny-sd1/vae/diffusion_pytorch_model.safetensors");
    std::fs::copy(&weights, dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    let config = std::fs::read_to_string(fixture("tiny-sd1/vae/config.json")).unwrap();
    let load = |config: String| {
        std::fs::write(dir.join("config.json"), config).unwrap();
        AutoencoderKl::load(&dir, None, DType::F32, &Device::Cpu)
            .err()
            .unwrap()
            .to_string()
    };
    // Without mid-block attention the attention weights are left over.
    let err = load(config.replace(
        r#""mid_block_add_attention": true"#,
        r#""mid_block_add_attention": false"#,
    ));
    assert!(
        err.contains("unexpected tensor") && err.contains("mid_block.attentions.0"),
        "{err}"
    );
    // Wider blocks than the weights: a shape error naming the tensor.
    let err = load(config.replace("\"latent_channels\": 4", "\"latent_channels\": 8"));
    assert!(
        err.contains("diffusion_pytorch_model.safetensors") && err.contains("has shape"),
        "{err}"
    );
}

#[test]
fn encode_and_decode_have_gradients() {
    let (vae, _) =
        AutoencoderKl::load(&fixture("tiny-sd1/vae"), None, DType::F64, &Device::Cpu).unwrap();
    // 8x8 images give 1x1 latents: small enough for finite differences on every input element.
    check_grad(|x| Ok(vae.encode(x).unwrap().mean), &[1, 3, 8, 8]);
    check_grad(|x| Ok(vae.encode(x).unwrap().logvar), &[1, 3, 8, 8]);
    check_grad(|z| Ok(vae.decode(z).unwrap()), &[1, 4, 2, 2]);
}
