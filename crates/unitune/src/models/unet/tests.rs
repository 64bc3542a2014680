//! Parity with diffusers on the tiny SD1/SD2 UNets: outputs (also at a latent size that is not a
//! multiple of 2^upsamplers) and, for SD1, the gradient of a training loss for every parameter.
//! References come from dev/ref_unet.py.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::*;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(rel)
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("ref/unet.safetensors"), &Device::Cpu).unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    max_abs(&(a - b).unwrap())
}

/// Runs `unet` on the inputs stored under `prefix` and returns (max abs diff, max abs reference).
fn output_diff(
    unet: &UNet2DConditionModel,
    refs: &HashMap<String, Tensor>,
    prefix: &str,
) -> (f32, f32) {
    let get = |k: &str| &refs[&format!("{prefix}.{k}")];
    let out = unet
        .forward(
            get("sample"),
            get("timesteps"),
            get("encoder_hidden_states"),
        )
        .unwrap();
    (max_abs_diff(&out, get("out")), max_abs(get("out")))
}

#[test]
fn outputs_match_diffusers() {
    let refs = reference();
    for name in ["sd1", "sd2"] {
        let (unet, _) = UNet2DConditionModel::load(
            &fixture(&format!("tiny-{name}/unet")),
            None,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        for prefix in [name.to_string(), format!("{name}.odd")] {
            let (diff, scale) = output_diff(&unet, &refs, &prefix);
            println!("{prefix}: max abs diff {diff:.2e} (outputs up to {scale:.2})");
            assert!(diff <= 2e-5, "{prefix}: max abs diff {diff}");
        }
    }
}

#[test]
fn every_parameter_gets_torchs_gradient() {
    let refs = reference();
    let dir = fixture("tiny-sd1/unet");
    let cfg = UNet2DConditionConfig::from_file(&dir.join("config.json")).unwrap();
    let store = WeightStore::open(&dir, None, &Device::Cpu)
        .unwrap()
        .with_trainable(Arc::new(|_: &str| true));
    let unet = UNet2DConditionModel::from_store(&store, &cfg, DType::F32, &Device::Cpu).unwrap();

    let pred = unet
        .forward(
            &refs["sd1.sample"],
            &refs["sd1.timesteps"],
            &refs["sd1.encoder_hidden_states"],
        )
        .unwrap();
    let loss = (pred - &refs["sd1.grad.target"])
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    let want_loss = refs["sd1.grad.loss"].to_vec1::<f32>().unwrap()[0];
    let got_loss = loss.to_scalar::<f32>().unwrap();
    assert!(
        (got_loss - want_loss).abs() <= 1e-5 * want_loss.abs(),
        "loss {got_loss} vs torch {want_loss}"
    );

    let grads = loss.backward().unwrap();
    let vars = store.trainable_vars();
    let expected = refs
        .keys()
        .filter(|k| k.starts_with("sd1.grad.") && *k != "sd1.grad.target" && *k != "sd1.grad.loss");
    assert_eq!(
        vars.len(),
        expected.count(),
        "every parameter torch has is a Var here, and no other"
    );
    let mut worst = (0f32, String::new());
    for (name, var) in &vars {
        let want = refs
            .get(&format!("sd1.grad.{name}"))
            .unwrap_or_else(|| panic!("torch has no parameter `{name}`"));
        let got = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient reached `{name}`"));
        let scale = max_abs(want);
        assert!(
            scale > 0.0,
            "`{name}`: torch's gradient is zero, the test would not check anything"
        );
        let rel = max_abs_diff(got, want) / scale;
        assert!(
            rel <= 1e-4,
            "`{name}`: gradient differs from torch by {rel:.2e} of its max"
        );
        if rel > worst.0 {
            worst = (rel, name.clone());
        }
    }
    println!(
        "{} gradients; worst relative error {:.2e} in `{}`",
        vars.len(),
        worst.0,
        worst.1
    );
}

#[test]
fn reads_the_sd1_and_sd2_configs() {
    let sd1 = UNet2DConditionConfig::from_file(&fixture("tiny-sd1/unet/config.json")).unwrap();
    assert_eq!(
        sd1.down_block_types,
        vec![
            DownBlockType::CrossAttnDownBlock2D,
            DownBlockType::DownBlock2D
        ]
    );
    assert_eq!(
        sd1.up_block_types,
        vec![UpBlockType::UpBlock2D, UpBlockType::CrossAttnUpBlock2D]
    );
    // `attention_head_dim: 4` counts heads in this model (diffusers' legacy naming).
    assert_eq!(sd1.num_attention_heads, vec![4, 4]);
    assert_eq!(sd1.layers_per_block, vec![2, 2]);
    assert_eq!(
        (
            sd1.cross_attention_dim,
            sd1.sample_size,
            sd1.norm_num_groups
        ),
        (32, Some(8), 8)
    );
    assert!(!sd1.use_linear_projection);
    let sd2 = UNet2DConditionConfig::from_file(&fixture("tiny-sd2/unet/config.json")).unwrap();
    assert_eq!(sd2.num_attention_heads, vec![2, 4, 4]);
    assert_eq!(sd2.transformer_layers_per_block, vec![1, 1, 1]);
    assert!(sd2.use_linear_projection && sd2.upcast_attention);
    assert_eq!(sd2.time_embed_dim(), 64);
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("unitune-unet-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The tiny SD1 config with `field` set to `value`, written to a fresh folder.
fn edited_config(test: &str, field: &str, value: serde_json::Value) -> PathBuf {
    let text = std::fs::read_to_string(fixture("tiny-sd1/unet/config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json[field] = value;
    let path = tempdir(test).join("config.json");
    std::fs::write(&path, json.to_string()).unwrap();
    path
}

#[test]
fn sdxl_and_other_unsupported_configs_name_the_field() {
    use serde_json::json;
    let cases = [
        ("addition_embed_type", json!("text_time"), "SDXL"),
        ("class_embed_type", json!("timestep"), "class_embed_type"),
        (
            "resnet_time_scale_shift",
            json!("scale_shift"),
            "scale_shift",
        ),
        ("conv_in_kernel", json!(7), "only 3"),
        ("num_attention_heads", json!(4), "attention_head_dim"),
        (
            "down_block_types",
            json!(["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
            "SimpleCrossAttnDownBlock2D",
        ),
        ("attention_head_dim", json!([4, 4, 4]), "list of 2 integers"),
        ("attention_head_dim", json!(3), "cannot be split"),
        (
            "transformer_layers_per_block",
            json!([[1, 2], [1, 2]]),
            "list of 2 integers",
        ),
    ];
    for (i, (field, value, hint)) in cases.into_iter().enumerate() {
        let path = edited_config(&format!("config{i}"), field, value);
        let err = UNet2DConditionConfig::from_file(&path)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&path.display().to_string())
                && err.contains(&format!("`{field}`"))
                && err.contains(hint),
            "{field}: {err}"
        );
    }
}

#[test]
fn a_wrongly_shaped_tensor_is_named() {
    let dir = tempdir("shape");
    std::fs::copy(
        fixture("tiny-sd1/unet/config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let mut tensors = candle_core::safetensors::load(
        fixture("tiny-sd1/unet/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let key = "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight";
    tensors.insert(
        key.to_string(),
        Tensor::zeros((16, 31), DType::F32, &Device::Cpu).unwrap(),
    );
    let file = dir.join("diffusion_pytorch_model.safetensors");
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let err = UNet2DConditionModel::load(&dir, None, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains(&format!("`{key}`"))
            && err.contains("[16, 31]")
            && err.contains(&file.display().to_string()),
        "{err}"
    );
}

#[test]
fn gradients_flow_back_through_odd_sized_latents() {
    // Height 6, width 9: the downsampler sees sides of different parity.
    let refs = reference();
    let get = |k: &str| &refs[&format!("sd1.odd_grad.{k}")];
    let dir = fixture("tiny-sd1/unet");
    let cfg = UNet2DConditionConfig::from_file(&dir.join("config.json")).unwrap();
    let store = WeightStore::open(&dir, None, &Device::Cpu)
        .unwrap()
        .with_trainable(Arc::new(|name: &str| name == "conv_in.weight"));
    let unet = UNet2DConditionModel::from_store(&store, &cfg, DType::F32, &Device::Cpu).unwrap();
    let sample = candle_core::Var::from_tensor(get("sample")).unwrap();
    let pred = unet
        .forward(
            sample.as_tensor(),
            get("timesteps"),
            get("encoder_hidden_states"),
        )
        .unwrap();
    let loss = (pred - get("target"))
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let conv_in = &store.trainable_vars()[0].1;
    for (name, var) in [("d_sample", &sample), ("d_conv_in.weight", conv_in)] {
        let want = get(name);
        let rel = max_abs_diff(grads.get(var.as_tensor()).unwrap(), want) / max_abs(want);
        println!("{name}: relative error {rel:.2e}");
        assert!(
            rel <= 1e-4,
            "{name}: gradient differs from torch by {rel:.2e} of its max"
        );
    }
}

#[test]
fn runs_in_half_precision() {
    let refs = reference();
    let (unet, _) =
        UNet2DConditionModel::load(&fixture("tiny-sd1/unet"), None, DType::F16, &Device::Cpu)
            .unwrap();
    let half = |k: &str| refs[k].to_dtype(DType::F16).unwrap();
    let out = unet
        .forward(
            &half("sd1.sample"),
            &refs["sd1.timesteps"],
            &half("sd1.encoder_hidden_states"),
        )
        .unwrap();
    assert_eq!(out.dtype(), DType::F16);
    let diff = max_abs_diff(&out.to_dtype(DType::F32).unwrap(), &refs["sd1.out"]);
    println!("f16: max abs diff {diff:.2e}");
    assert!(diff <= 1e-2, "{diff}");
}

#[test]
fn one_timestep_serves_the_batch_and_bad_inputs_are_refused() {
    let refs = reference();
    let (unet, _) =
        UNet2DConditionModel::load(&fixture("tiny-sd1/unet"), None, DType::F32, &Device::Cpu)
            .unwrap();
    let (sample, context) = (&refs["sd1.sample"], &refs["sd1.encoder_hidden_states"]);
    let one = Tensor::new(500f32, &Device::Cpu).unwrap();
    let both = Tensor::new(&[500f32, 500.], &Device::Cpu).unwrap();
    let diff = max_abs_diff(
        &unet.forward(sample, &one, context).unwrap(),
        &unet.forward(sample, &both, context).unwrap(),
    );
    assert_eq!(diff, 0.0);
    let three = Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap();
    let err = unet
        .forward(sample, &three, context)
        .unwrap_err()
        .to_string();
    assert!(err.contains("3 timesteps for a batch of 2"), "{err}");
    let narrow_context = context.narrow(2, 0, 16).unwrap();
    let err = unet
        .forward(sample, &both, &narrow_context)
        .unwrap_err()
        .to_string();
    assert!(err.contains("expected [2, n, 32]"), "{err}");
}
