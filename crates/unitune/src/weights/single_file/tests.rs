//! Single files: conversion equal to the fixture folders' tensors (the files come from diffusers'
//! own conversion, dev/make_single_file.py), names as diffusers converts them, configs inferred
//! for the real SD 1.5 / 2.1-base / 2.1 checkpoints, and refusals.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::json;

use super::convert::{self, Component, Layout, Target};
use super::detect::{self, Family};
use super::infer::Shapes;
use super::*;
use crate::models::clip::ClipTextModel;
use crate::models::unet::UNet2DConditionModel;
use crate::models::vae::AutoencoderKl;
use crate::tokenizer::ClipTokenizer;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(rel)
}

fn with_config(folder: &str) -> SingleFileOptions {
    SingleFileOptions {
        config: Some(fixture(folder)),
        ..Default::default()
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("unitune-single-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A file's tensors as stored: name -> (dtype, shape, bytes).
type Raw = Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>;

fn read_raw(path: &Path) -> Raw {
    let bytes = std::fs::read(path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut raw: Raw = file
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    raw.sort_by(|a, b| a.0.cmp(&b.0));
    raw
}

fn write_raw(path: &Path, raw: &Raw) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = raw
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Every tensor of `a` equals `b`'s of the same name (the folder's text encoder has no
/// `text_model.` prefix), in `dtype`, bit for bit.
fn assert_same(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>, dtype: DType, what: &str) {
    let strip = |n: &String| n.strip_prefix("text_model.").unwrap_or(n).to_string();
    let mut a_names: Vec<String> = a.keys().map(strip).collect();
    let mut b_names: Vec<String> = b.keys().map(strip).collect();
    a_names.sort();
    b_names.sort();
    assert_eq!(a_names, b_names, "{what}: names");
    for (name, t) in a {
        let other = &b[&strip(name)];
        assert_eq!(t.dtype(), dtype, "{what}: {name}");
        assert_eq!(t.dims(), other.dims(), "{what}: {name}");
        let flat = |t: &Tensor| -> Vec<f32> {
            t.to_dtype(dtype)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let (x, y) = (flat(t), flat(other));
        assert!(
            x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{what}: {name} differs"
        );
    }
}

fn folder_tensors(folder: &str, component: &str) -> HashMap<String, Tensor> {
    let store = WeightStore::open(&fixture(folder).join(component), None, &Device::Cpu).unwrap();
    store.tensors().clone()
}

#[test]
fn converted_tensors_equal_the_folders_exactly() {
    for (file, folder, dtype) in [
        ("tiny-sd1.safetensors", "tiny-sd1", None),
        ("tiny-sd1-fp16.safetensors", "tiny-sd1", Some(DType::F16)),
        ("tiny-sd2.safetensors", "tiny-sd2", None),
    ] {
        let single = SingleFile::open(&fixture(file), &with_config(folder), &Device::Cpu).unwrap();
        for (store, component) in [
            (&single.unet, "unet"),
            (&single.vae, "vae"),
            (&single.text_encoder, "text_encoder"),
        ] {
            let expected = folder_tensors(folder, component);
            // Each tensor in the folder's dtype (tiny-sd2's VAE is f16), or all in f16.
            let want = dtype.unwrap_or_else(|| expected.values().next().unwrap().dtype());
            assert_same(
                store.tensors(),
                &expected,
                want,
                &format!("{file} {component}"),
            );
        }
        // Same tensors, same fingerprint: a session tuned on either applies to both.
        let folder_unet = folder_tensors(folder, "unet");
        assert_eq!(
            crate::session::fingerprint(single.unet.tensors()).unwrap(),
            crate::session::fingerprint(&folder_unet).unwrap()
        );
        let c = &single.configs;
        assert_eq!(
            c.unet,
            UNet2DConditionConfig::from_file(&fixture(folder).join("unet/config.json")).unwrap()
        );
        assert_eq!(c.unet_source, fixture(folder).join("unet/config.json"));
    }
}

#[test]
fn bf16_files_and_an_unused_last_open_clip_layer_load() {
    let dir = scratch("variants");
    // bf16: every float tensor rounded from f32.
    let mut raw = read_raw(&fixture("tiny-sd1.safetensors"));
    for (_, dtype, _, bytes) in raw.iter_mut().filter(|t| t.1 == safetensors::Dtype::F32) {
        *bytes = bytes
            .chunks_exact(4)
            .flat_map(|b| {
                half::bf16::from_f32(f32::from_le_bytes(b.try_into().unwrap())).to_le_bytes()
            })
            .collect();
        *dtype = safetensors::Dtype::BF16;
    }
    write_raw(&dir.join("bf16.safetensors"), &raw);
    let single = SingleFile::open(
        &dir.join("bf16.safetensors"),
        &with_config("tiny-sd1"),
        &Device::Cpu,
    )
    .unwrap();
    assert_same(
        single.unet.tensors(),
        &folder_tensors("tiny-sd1", "unet"),
        DType::BF16,
        "bf16 unet",
    );

    // SD 2.x files from Stability hold OpenCLIP's last layer, which SD 2.x does not use: skipped.
    let mut raw = read_raw(&fixture("tiny-sd2.safetensors"));
    let layer = |i: usize| format!("cond_stage_model.model.transformer.resblocks.{i}.");
    let extra: Raw = raw
        .iter()
        .filter(|t| t.0.starts_with(&layer(1)))
        .map(|(n, d, s, b)| (n.replace(&layer(1), &layer(2)), *d, s.clone(), b.clone()))
        .collect();
    raw.extend(extra.clone());
    write_raw(&dir.join("sd2-last.safetensors"), &raw);
    let single = SingleFile::open(
        &dir.join("sd2-last.safetensors"),
        &with_config("tiny-sd2"),
        &Device::Cpu,
    )
    .unwrap();
    assert_same(
        single.text_encoder.tensors(),
        &folder_tensors("tiny-sd2", "text_encoder"),
        DType::F32,
        "sd2 text",
    );
    // Two layers more than the config's is no longer the unused last one.
    raw.extend(
        extra
            .iter()
            .map(|(n, d, s, b)| (n.replace(&layer(2), &layer(3)), *d, s.clone(), b.clone())),
    );
    write_raw(&dir.join("sd2-more.safetensors"), &raw);
    let err = SingleFile::open(
        &dir.join("sd2-more.safetensors"),
        &with_config("tiny-sd2"),
        &Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("sd2-more.safetensors")
            && err.contains("`cond_stage_model.model.transformer.resblocks.3."),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn names_convert_as_diffusers_converts_them() {
    let layout = |family| Layout {
        family,
        unet_layers_per_block: 2,
        vae_levels: 4,
        text_layers: 23,
    };
    let path = Path::new("m.safetensors");
    let rename = |c, n: &str| Some(Target::Rename(c, n.to_string()));
    let cases: [(Family, &str, Option<Target>); 17] = [
        (
            Family::Sd1,
            "model.diffusion_model.time_embed.2.bias",
            rename(Component::Unet, "time_embedding.linear_2.bias"),
        ),
        (
            Family::Sd1,
            "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
            rename(
                Component::Unet,
                "down_blocks.1.resnets.0.conv_shortcut.weight",
            ),
        ),
        (
            Family::Sd1,
            "model.diffusion_model.input_blocks.8.1.transformer_blocks.0.attn2.to_k.weight",
            rename(
                Component::Unet,
                "down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k.weight",
            ),
        ),
        (
            Family::Sd1,
            "model.diffusion_model.input_blocks.9.0.op.bias",
            rename(Component::Unet, "down_blocks.2.downsamplers.0.conv.bias"),
        ),
        (
            Family::Sd1,
            "model.diffusion_model.middle_block.2.emb_layers.1.weight",
            rename(Component::Unet, "mid_block.resnets.1.time_emb_proj.weight"),
        ),
        (
            Family::Sd1,
            "model.diffusion_model.output_blocks.2.1.conv.weight",
            rename(Component::Unet, "up_blocks.0.upsamplers.0.conv.weight"),
        ),
        (
            Family::Sd1,
            "model.diffusion_model.output_blocks.5.2.conv.bias",
            rename(Component::Unet, "up_blocks.1.upsamplers.0.conv.bias"),
        ),
        (
            Family::Sd1,
            "model.diffusion_model.output_blocks.10.1.proj_out.weight",
            rename(Component::Unet, "up_blocks.3.attentions.1.proj_out.weight"),
        ),
        (
            Family::Sd1,
            "model.diffusion_model.out.0.weight",
            rename(Component::Unet, "conv_norm_out.weight"),
        ),
        (
            Family::Sd1,
            "first_stage_model.decoder.up.3.block.2.conv1.weight",
            rename(Component::Vae, "decoder.up_blocks.0.resnets.2.conv1.weight"),
        ),
        (
            Family::Sd1,
            "first_stage_model.encoder.down.1.block.0.nin_shortcut.bias",
            rename(
                Component::Vae,
                "encoder.down_blocks.1.resnets.0.conv_shortcut.bias",
            ),
        ),
        (
            Family::Sd1,
            "first_stage_model.decoder.mid.attn_1.proj_out.weight",
            Some(Target::Squeeze(
                Component::Vae,
                "decoder.mid_block.attentions.0.to_out.0.weight".into(),
            )),
        ),
        (
            Family::Sd1,
            "cond_stage_model.transformer.text_model.final_layer_norm.bias",
            rename(Component::TextEncoder, "text_model.final_layer_norm.bias"),
        ),
        (Family::Sd1, "model_ema.decay", None),
        (
            Family::Sd2,
            "cond_stage_model.model.transformer.resblocks.22.mlp.c_proj.weight",
            rename(
                Component::TextEncoder,
                "text_model.encoder.layers.22.mlp.fc2.weight",
            ),
        ),
        (
            Family::Sd2,
            "cond_stage_model.model.transformer.resblocks.23.ln_1.weight",
            None,
        ),
        (
            Family::Sd2,
            "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_bias",
            Some(Target::SplitQkv(
                Component::TextEncoder,
                ["q", "k", "v"]
                    .map(|x| format!("text_model.encoder.layers.0.self_attn.{x}_proj.bias")),
            )),
        ),
    ];
    for (family, key, expected) in cases {
        assert_eq!(
            convert::target(path, &layout(family), key).unwrap(),
            expected,
            "{key}"
        );
    }
    for key in [
        "model.diffusion_model.input_blocks.1.2.foo.weight",
        "model.diffusion_model.input_blocks.3.0.in_layers.0.weight", // a downsampler's slot
        "first_stage_model.encoder.down.0.attn.0.q.weight",
        "cond_stage_model.model.transformer.resblocks.24.ln_1.weight",
    ] {
        let err = convert::target(path, &layout(Family::Sd2), key)
            .unwrap_err()
            .to_string();
        assert!(err.contains("m.safetensors") && err.contains(key), "{err}");
    }
}

/// Name -> shape of a real checkpoint in the original layout, as the `ldm` code's modules make
/// it at the released sizes (spot-checked against real shapes below).
struct Real {
    s: Shapes,
    context: usize,
    linear: bool,
}

impl Real {
    fn add(&mut self, name: String, shape: &[usize]) {
        self.s.insert(name, shape.to_vec());
    }
    fn linear(&mut self, p: String, o: usize, i: usize) {
        self.add(format!("{p}.weight"), &[o, i]);
        self.add(format!("{p}.bias"), &[o]);
    }
    fn conv(&mut self, p: String, o: usize, i: usize, k: usize) {
        self.add(format!("{p}.weight"), &[o, i, k, k]);
        self.add(format!("{p}.bias"), &[o]);
    }
    fn norm(&mut self, p: String, c: usize) {
        self.add(format!("{p}.weight"), &[c]);
        self.add(format!("{p}.bias"), &[c]);
    }
    /// `ldm.modules.diffusionmodules.openaimodel.ResBlock`.
    fn resblock(&mut self, p: String, i: usize, o: usize) {
        self.norm(format!("{p}.in_layers.0"), i);
        self.conv(format!("{p}.in_layers.2"), o, i, 3);
        self.linear(format!("{p}.emb_layers.1"), o, 1280);
        self.norm(format!("{p}.out_layers.0"), o);
        self.conv(format!("{p}.out_layers.3"), o, o, 3);
        if i != o {
            self.conv(format!("{p}.skip_connection"), o, i, 1);
        }
    }
    /// `ldm.modules.attention.SpatialTransformer`, depth 1.
    fn transformer(&mut self, p: String, c: usize) {
        self.norm(format!("{p}.norm"), c);
        for proj in ["proj_in", "proj_out"] {
            match self.linear {
                true => self.linear(format!("{p}.{proj}"), c, c),
                false => self.conv(format!("{p}.{proj}"), c, c, 1),
            }
        }
        let b = format!("{p}.transformer_blocks.0");
        for (attn, kv) in [("attn1", c), ("attn2", self.context)] {
            self.add(format!("{b}.{attn}.to_q.weight"), &[c, c]);
            self.add(format!("{b}.{attn}.to_k.weight"), &[c, kv]);
            self.add(format!("{b}.{attn}.to_v.weight"), &[c, kv]);
            self.linear(format!("{b}.{attn}.to_out.0"), c, c);
        }
        for n in ["norm1", "norm2", "norm3"] {
            self.norm(format!("{b}.{n}"), c);
        }
        self.linear(format!("{b}.ff.net.0.proj"), 8 * c, c);
        self.linear(format!("{b}.ff.net.2"), c, 4 * c);
    }
    /// `ldm.modules.diffusionmodules.model.ResnetBlock`.
    fn vae_resnet(&mut self, p: String, i: usize, o: usize) {
        self.norm(format!("{p}.norm1"), i);
        self.conv(format!("{p}.conv1"), o, i, 3);
        self.norm(format!("{p}.norm2"), o);
        self.conv(format!("{p}.conv2"), o, o, 3);
        if i != o {
            self.conv(format!("{p}.nin_shortcut"), o, i, 1);
        }
    }
    fn vae_mid(&mut self, p: String) {
        self.vae_resnet(format!("{p}.mid.block_1"), 512, 512);
        self.norm(format!("{p}.mid.attn_1.norm"), 512);
        for x in ["q", "k", "v", "proj_out"] {
            self.conv(format!("{p}.mid.attn_1.{x}"), 512, 512, 1);
        }
        self.vae_resnet(format!("{p}.mid.block_2"), 512, 512);
    }
}

fn real_shapes(family: Family) -> Shapes {
    let (context, linear) = match family {
        Family::Sd1 => (768, false),
        Family::Sd2 => (1024, true),
    };
    let mut r = Real {
        s: Shapes::new(),
        context,
        linear,
    };
    // UNet: 320 channels x [1, 2, 4, 4], 2 resnets per level, attention on the first three.
    let u = |n: &str| format!("model.diffusion_model.{n}");
    let mult = [1, 2, 4, 4];
    r.conv(u("input_blocks.0.0"), 320, 4, 3);
    r.linear(u("time_embed.0"), 1280, 320);
    r.linear(u("time_embed.2"), 1280, 1280);
    let (mut block, mut ch, mut skips) = (1, 320, vec![320]);
    for (level, m) in mult.iter().enumerate() {
        for _ in 0..2 {
            r.resblock(u(&format!("input_blocks.{block}.0")), ch, 320 * m);
            ch = 320 * m;
            if level < 3 {
                r.transformer(u(&format!("input_blocks.{block}.1")), ch);
            }
            skips.push(ch);
            block += 1;
        }
        if level < 3 {
            r.conv(u(&format!("input_blocks.{block}.0.op")), ch, ch, 3);
            skips.push(ch);
            block += 1;
        }
    }
    r.resblock(u("middle_block.0"), ch, ch);
    r.transformer(u("middle_block.1"), ch);
    r.resblock(u("middle_block.2"), ch, ch);
    let mut block = 0;
    for (level, m) in mult.iter().enumerate().rev() {
        for i in 0..3 {
            let skip = skips.pop().unwrap();
            r.resblock(u(&format!("output_blocks.{block}.0")), ch + skip, 320 * m);
            ch = 320 * m;
            if level < 3 {
                r.transformer(u(&format!("output_blocks.{block}.1")), ch);
            }
            if level > 0 && i == 2 {
                let at = if level < 3 { 2 } else { 1 };
                r.conv(u(&format!("output_blocks.{block}.{at}.conv")), ch, ch, 3);
            }
            block += 1;
        }
    }
    r.norm(u("out.0"), 320);
    r.conv(u("out.2"), 4, 320, 3);

    // VAE: 128 channels x [1, 2, 4, 4], 2 resnets per level (3 in the decoder), 4 latents.
    let v = |n: &str| format!("first_stage_model.{n}");
    r.conv(v("encoder.conv_in"), 128, 3, 3);
    let mut ch = 128;
    for (level, m) in mult.iter().enumerate() {
        for j in 0..2 {
            r.vae_resnet(v(&format!("encoder.down.{level}.block.{j}")), ch, 128 * m);
            ch = 128 * m;
        }
        if level < 3 {
            r.conv(
                v(&format!("encoder.down.{level}.downsample.conv")),
                ch,
                ch,
                3,
            );
        }
    }
    r.vae_mid(v("encoder"));
    r.norm(v("encoder.norm_out"), 512);
    r.conv(v("encoder.conv_out"), 8, 512, 3);
    r.conv(v("quant_conv"), 8, 8, 1);
    r.conv(v("post_quant_conv"), 4, 4, 1);
    r.conv(v("decoder.conv_in"), 512, 4, 3);
    r.vae_mid(v("decoder"));
    for (level, m) in mult.iter().enumerate().rev() {
        for j in 0..3 {
            r.vae_resnet(v(&format!("decoder.up.{level}.block.{j}")), ch, 128 * m);
            ch = 128 * m;
        }
        if level > 0 {
            r.conv(v(&format!("decoder.up.{level}.upsample.conv")), ch, ch, 3);
        }
    }
    r.norm(v("decoder.norm_out"), 128);
    r.conv(v("decoder.conv_out"), 3, 128, 3);

    // Text encoder: CLIP ViT-L/14's (12 layers of 768) or OpenCLIP ViT-H/14's (24 of 1024).
    match family {
        Family::Sd1 => {
            let t = |n: &str| format!("cond_stage_model.transformer.text_model.{n}");
            r.add(t("embeddings.token_embedding.weight"), &[49408, 768]);
            r.add(t("embeddings.position_embedding.weight"), &[77, 768]);
            r.add(t("embeddings.position_ids"), &[1, 77]);
            for i in 0..12 {
                let l = t(&format!("encoder.layers.{i}"));
                for p in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                    r.linear(format!("{l}.self_attn.{p}"), 768, 768);
                }
                r.norm(format!("{l}.layer_norm1"), 768);
                r.norm(format!("{l}.layer_norm2"), 768);
                r.linear(format!("{l}.mlp.fc1"), 3072, 768);
                r.linear(format!("{l}.mlp.fc2"), 768, 3072);
            }
            r.norm(t("final_layer_norm"), 768);
        }
        Family::Sd2 => {
            let t = |n: &str| format!("cond_stage_model.model.{n}");
            r.add(t("token_embedding.weight"), &[49408, 1024]);
            r.add(t("positional_embedding"), &[77, 1024]);
            r.add(t("text_projection"), &[1024, 1024]);
            r.add(t("logit_scale"), &[]);
            for i in 0..24 {
                let l = t(&format!("transformer.resblocks.{i}"));
                r.add(format!("{l}.attn.in_proj_weight"), &[3072, 1024]);
                r.add(format!("{l}.attn.in_proj_bias"), &[3072]);
                r.linear(format!("{l}.attn.out_proj"), 1024, 1024);
                r.norm(format!("{l}.ln_1"), 1024);
                r.norm(format!("{l}.ln_2"), 1024);
                r.linear(format!("{l}.mlp.c_fc"), 4096, 1024);
                r.linear(format!("{l}.mlp.c_proj"), 1024, 4096);
            }
            r.norm(t("ln_final"), 1024);
        }
    }
    // The training code's buffers and EMA counters, as the released files have them.
    r.add("alphas_cumprod".into(), &[1000]);
    r.add("model_ema.num_updates".into(), &[]);
    r.s
}

#[test]
fn real_shapes_are_those_of_the_released_files() {
    let sd15 = real_shapes(Family::Sd1);
    let sd21 = real_shapes(Family::Sd2);
    // Shapes as they are in v1-5-pruned-emaonly.safetensors and v2-1_768-ema-pruned.safetensors.
    let checks: [(&Shapes, &str, &[usize]); 16] = [
        (
            &sd15,
            "model.diffusion_model.input_blocks.1.1.proj_in.weight",
            &[320, 320, 1, 1],
        ),
        (
            &sd15,
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
            &[320, 768],
        ),
        (
            &sd15,
            "model.diffusion_model.input_blocks.7.0.skip_connection.weight",
            &[1280, 640, 1, 1],
        ),
        (
            &sd15,
            "model.diffusion_model.output_blocks.0.0.in_layers.2.weight",
            &[1280, 2560, 3, 3],
        ),
        (
            &sd15,
            "model.diffusion_model.output_blocks.3.0.skip_connection.weight",
            &[1280, 2560, 1, 1],
        ),
        (
            &sd15,
            "model.diffusion_model.output_blocks.8.0.in_layers.2.weight",
            &[640, 960, 3, 3],
        ),
        (
            &sd15,
            "model.diffusion_model.output_blocks.8.2.conv.weight",
            &[640, 640, 3, 3],
        ),
        (
            &sd15,
            "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
            &[320, 640, 1, 1],
        ),
        (
            &sd15,
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight",
            &[2560, 320],
        ),
        (
            &sd15,
            "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
            &[256, 128, 1, 1],
        ),
        (
            &sd15,
            "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight",
            &[256, 512, 1, 1],
        ),
        (
            &sd15,
            "first_stage_model.decoder.up.3.upsample.conv.weight",
            &[512, 512, 3, 3],
        ),
        (
            &sd15,
            "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight",
            &[3072, 768],
        ),
        (
            &sd21,
            "model.diffusion_model.middle_block.1.proj_in.weight",
            &[1280, 1280],
        ),
        (
            &sd21,
            "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight",
            &[3072, 1024],
        ),
        (
            &sd21,
            "cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight",
            &[4096, 1024],
        ),
    ];
    for (shapes, name, shape) in checks {
        assert_eq!(shapes.get(name).map(Vec::as_slice), Some(shape), "{name}");
    }
    // Tensors per network in the released files (SD 1.5: UNet 686, VAE 248, CLIP 196 + its
    // position_ids; SD 2.1's OpenCLIP 24 x 12 + 6).
    let count = |s: &Shapes, p: &str| s.keys().filter(|k| k.starts_with(p)).count();
    assert_eq!(count(&sd15, "model.diffusion_model."), 686);
    assert_eq!(count(&sd15, "first_stage_model."), 248);
    assert_eq!(count(&sd15, "cond_stage_model."), 197);
    assert_eq!(count(&sd21, "cond_stage_model."), 294);
}

/// The configs of the diffusers repos of SD 1.5, 2.1-base and 2.1 (fields they set; the rest are
/// diffusers' defaults).
fn hub_unet(sample_size: usize, sd2: bool, upcast: bool) -> UNet2DConditionConfig {
    let mut config = json!({
        "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false,
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
        "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
        "out_channels": 4, "sample_size": sample_size,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    });
    if sd2 {
        config["attention_head_dim"] = json!([5, 10, 20, 20]);
        config["cross_attention_dim"] = json!(1024);
        config["use_linear_projection"] = json!(true);
        config["upcast_attention"] = json!(upcast);
    }
    UNet2DConditionConfig::from_json(Path::new("hub"), config).unwrap()
}

fn hub_vae(sample_size: usize) -> VaeConfig {
    VaeConfig::from_json(Path::new("hub"), json!({
        "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
        "out_channels": 3, "sample_size": sample_size,
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
    }))
    .unwrap()
}

#[test]
fn inferred_configs_are_those_of_sd15_sd21_base_and_sd21() {
    let path = Path::new("model.safetensors");
    let clip_l = json!({"hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072,
        "max_position_embeddings": 77, "num_attention_heads": 12, "num_hidden_layers": 12, "vocab_size": 49408});
    let open_clip_h = json!({"hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096,
        "max_position_embeddings": 77, "num_attention_heads": 16, "num_hidden_layers": 23, "vocab_size": 49408});
    use PredictionType::{Epsilon, VPrediction};
    let cases = [
        (
            "SD 1.5",
            Family::Sd1,
            Epsilon,
            hub_unet(64, false, false),
            hub_vae(512),
            clip_l,
        ),
        (
            "SD 2.1-base",
            Family::Sd2,
            Epsilon,
            hub_unet(64, true, false),
            hub_vae(512),
            open_clip_h.clone(),
        ),
        (
            "SD 2.1",
            Family::Sd2,
            VPrediction,
            hub_unet(96, true, true),
            hub_vae(768),
            open_clip_h,
        ),
    ];
    for (name, family, prediction, unet, vae, text) in cases {
        let shapes = real_shapes(family);
        assert_eq!(
            detect::family(path, shapes.keys().map(String::as_str)).unwrap(),
            family
        );
        let c = Configs::infer(path, &shapes, family, prediction).unwrap();
        assert_eq!(c.unet, unet, "{name}");
        assert_eq!(c.vae, vae, "{name}");
        assert_eq!(
            c.text_encoder,
            ClipTextConfig::from_json(path, text).unwrap(),
            "{name}"
        );
        assert_eq!(c.scheduler.prediction_type, prediction, "{name}");
        let s = &c.scheduler;
        assert_eq!(
            (
                s.beta_start,
                s.beta_end,
                s.num_train_timesteps,
                s.steps_offset
            ),
            (0.00085, 0.012, 1000, 1)
        );
        assert!(
            !s.set_alpha_to_one && !s.clip_sample && s.timestep_spacing.is_none(),
            "{name}"
        );
        let pad = ClipTokenizer::from_files(path, &c.tokenizer)
            .unwrap()
            .pad_id();
        assert_eq!(pad, if family == Family::Sd1 { 49407 } else { 0 }, "{name}");
    }
}

#[test]
fn real_sized_files_convert_to_what_the_networks_ask_for() {
    // Every tensor of a released-size file, converted by name and shape only (a broadcast scalar
    // stands for each, so nothing is allocated), builds the three networks with nothing missing,
    // misshapen or left over.
    let path = Path::new("model.safetensors");
    for (family, prediction) in [
        (Family::Sd1, PredictionType::Epsilon),
        (Family::Sd2, PredictionType::VPrediction),
    ] {
        let shapes = real_shapes(family);
        let c = Configs::infer(path, &shapes, family, prediction).unwrap();
        let layout = Layout {
            family,
            unet_layers_per_block: 2,
            vae_levels: 4,
            text_layers: c.text_encoder.num_hidden_layers,
        };
        let targets: Vec<(String, Target)> = shapes
            .keys()
            .filter_map(|k| {
                convert::target(path, &layout, k)
                    .unwrap()
                    .map(|t| (k.clone(), t))
            })
            .collect();
        let zero = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
        let mut parts = convert::apply(path, &targets, |key| {
            Ok(zero.broadcast_as(shapes[key].as_slice())?)
        })
        .unwrap();
        let mut store = |component| {
            let part = parts.remove(&component).unwrap();
            WeightStore::from_tensors(path, part.tensors).with_file_names(part.file_names)
        };
        let cpu = Device::Cpu;
        store(Component::Unet)
            .build(DType::F32, &cpu, |vb| {
                UNet2DConditionModel::new(vb, &c.unet)
            })
            .unwrap();
        store(Component::Vae)
            .build(DType::F32, &cpu, |vb| AutoencoderKl::new(vb, &c.vae))
            .unwrap();
        store(Component::TextEncoder)
            .build(DType::F32, &cpu, |vb| {
                ClipTextModel::new(vb, &c.text_encoder)
            })
            .unwrap();
    }
}

#[test]
fn sd2_prediction_follows_diffusers_global_step_rule() {
    assert_eq!(
        default_prediction(Family::Sd1, None),
        PredictionType::Epsilon
    );
    assert_eq!(
        default_prediction(Family::Sd2, Some(875_000)),
        PredictionType::Epsilon
    );
    assert_eq!(
        default_prediction(Family::Sd2, Some(110_000)),
        PredictionType::VPrediction
    );
    assert_eq!(
        default_prediction(Family::Sd2, None),
        PredictionType::VPrediction
    );
    // A file that kept the step as a tensor.
    let dir = scratch("step");
    let mut raw = read_raw(&fixture("tiny-sd2.safetensors"));
    raw.push((
        "global_step".into(),
        safetensors::Dtype::I64,
        vec![],
        875_000i64.to_le_bytes().to_vec(),
    ));
    write_raw(&dir.join("m.safetensors"), &raw);
    let bytes = std::fs::read(dir.join("m.safetensors")).unwrap();
    assert_eq!(
        global_step(&safetensors::SafeTensors::deserialize(&bytes).unwrap()),
        Some(875_000)
    );
    // It loads: the step is not a weight.
    SingleFile::open(
        &dir.join("m.safetensors"),
        &with_config("tiny-sd2"),
        &Device::Cpu,
    )
    .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn flags_override_the_configs() {
    let options = SingleFileOptions {
        prediction_type: Some(PredictionType::VPrediction),
        image_size: Some(96),
        ..with_config("tiny-sd1")
    };
    let c = SingleFile::configs(&fixture("tiny-sd1.safetensors"), &options).unwrap();
    assert_eq!(c.scheduler.prediction_type, PredictionType::VPrediction);
    assert_eq!(
        (c.unet.sample_size, c.vae.sample_size, c.native_size()),
        (Some(12), 96, Some(96))
    );
    let bad = SingleFileOptions {
        image_size: Some(100),
        ..with_config("tiny-sd1")
    };
    let err = SingleFile::configs(&fixture("tiny-sd1.safetensors"), &bad)
        .unwrap_err()
        .to_string();
    assert!(err.contains("image_size") && err.contains("100"), "{err}");
    // Without --config the tiny model's shapes do not tell SD's head counts: the error says so.
    let err = SingleFile::configs(
        &fixture("tiny-sd2.safetensors"),
        &SingleFileOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("tiny-sd2.safetensors") && err.contains("--config"),
        "{err}"
    );
    // Flags for single files are refused for folders.
    let err = with_config("tiny-sd1")
        .refuse_for(&fixture("tiny-sd1"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("config") && err.contains("single-file"),
        "{err}"
    );
}

#[test]
fn pickles_and_other_models_are_refused_by_name() {
    let dir = scratch("refuse");
    let ckpt = dir.join("v1-5-pruned-emaonly.ckpt");
    std::fs::write(&ckpt, b"PK\x03\x04 a torch zip").unwrap();
    let renamed = dir.join("renamed.safetensors");
    std::fs::write(&renamed, [0x80, 0x02, b'}', b'q']).unwrap();
    for path in [&ckpt, &renamed] {
        let err = SingleFile::configs(path, &SingleFileOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&path.display().to_string())
                && err.contains("pickle")
                && err.contains("save_file"),
            "{err}"
        );
    }
    let sd = |names: &[&str]| -> Raw {
        names
            .iter()
            .map(|n| (n.to_string(), safetensors::Dtype::F32, vec![1], vec![0; 4]))
            .collect()
    };
    let cases: [(&str, Raw, &str); 4] = [
        (
            "sdxl",
            sd(&[
                "conditioner.embedders.1.model.positional_embedding",
                "model.diffusion_model.out.2.bias",
                "first_stage_model.quant_conv.bias",
            ]),
            "SDXL checkpoint (it has `conditioner.embedders.*` tensors)",
        ),
        (
            "unet",
            sd(&["down_blocks.0.resnets.0.conv1.bias"]),
            "one diffusers component",
        ),
        (
            "novae",
            sd(&[
                "model.diffusion_model.out.2.bias",
                "cond_stage_model.model.ln_final.bias",
            ]),
            "no `first_stage_model.*` tensors (the VAE)",
        ),
        (
            "notext",
            sd(&[
                "model.diffusion_model.out.2.bias",
                "first_stage_model.quant_conv.bias",
            ]),
            "no text encoder",
        ),
    ];
    for (name, raw, expected) in cases {
        let path = dir.join(format!("{name}.safetensors"));
        write_raw(&path, &raw);
        let err = SingleFile::configs(&path, &SingleFileOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&path.display().to_string()) && err.contains(expected),
            "{err}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_tensors_are_named_as_the_file_names_them() {
    let dir = scratch("named");
    // A tensor with no place in the UNet.
    let mut raw = read_raw(&fixture("tiny-sd1.safetensors"));
    raw.push((
        "model.diffusion_model.input_blocks.1.1.lora_up.weight".into(),
        safetensors::Dtype::F32,
        vec![1],
        vec![0; 4],
    ));
    let path = dir.join("extra.safetensors");
    write_raw(&path, &raw);
    let err = match crate::pipelines::StableDiffusion::load(
        &path,
        &crate::pipelines::LoadOptions {
            single_file: with_config("tiny-sd1"),
            ..Default::default()
        },
    ) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("loaded"),
    };
    assert!(
        err.contains("extra.safetensors") && err.contains("input_blocks.1.1.lora_up.weight"),
        "{err}"
    );
    // A misshapen tensor is named both ways.
    let mut raw = read_raw(&fixture("tiny-sd1.safetensors"));
    let out = raw
        .iter_mut()
        .find(|t| t.0 == "model.diffusion_model.out.2.bias")
        .unwrap();
    (out.2, out.3) = (vec![5], vec![0; 20]);
    let path = dir.join("misshapen.safetensors");
    write_raw(&path, &raw);
    let err = SingleFile::open(&path, &with_config("tiny-sd1"), &Device::Cpu)
        .and_then(|f| {
            f.unet.build(DType::F32, &Device::Cpu, |vb| {
                UNet2DConditionModel::new(vb, &f.configs.unet)
            })
        })
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("misshapen.safetensors")
            && err.contains(
                "`conv_out.bias` (`model.diffusion_model.out.2.bias` in the file) has shape [5]"
            ),
        "{err}"
    );
    // The wrong config's layout: the first tensor that has no place in it is named.
    let err = SingleFile::open(
        &fixture("tiny-sd1.safetensors"),
        &with_config("tiny-sd2"),
        &Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("tiny-sd1.safetensors") && err.contains("has no place"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
