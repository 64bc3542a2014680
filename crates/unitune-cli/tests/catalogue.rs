//! The catalogue of bad inputs (README, "Bad inputs"): each case breaks one input of a real
//! command on a copy of the tiny SD 1.x fixture and runs the real binary. Every case must end
//! with exit code 1 (not a panic's 101, not a signal), a message naming the file, flag, field or
//! tensor at fault, and the folder exactly as it was: no output created or changed (an older
//! `out.png` sits where most cases write), no temporary file left, the inputs unchanged.
//!
//! Placeholders in the arguments: `{d}` is the case's folder, holding `model/` (the fixture),
//! `photo.png`, `photo.session` (a real one-step tune of it), `mask.png`, `prompts.txt` and the
//! older `out.png`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

struct Case {
    name: &'static str,
    /// Breaks one input in the case's folder.
    setup: fn(&Path),
    args: &'static [&'static str],
    /// Every one of these must be in the error output.
    expect: &'static [&'static str],
}

const fn case(
    name: &'static str,
    setup: fn(&Path),
    args: &'static [&'static str],
    expect: &'static [&'static str],
) -> Case {
    Case {
        name,
        setup,
        args,
        expect,
    }
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn none(_: &Path) {}

const GENERATE: &[&str] = &[
    "generate",
    "--model",
    "{d}/model",
    "--prompt",
    "a cat",
    "--steps",
    "2",
    "--seed",
    "1",
    "-o",
    "{d}/out.png",
];
const UNET: &str = "model/unet/diffusion_pytorch_model.safetensors";

// ---- weights ----

fn truncate_unet(d: &Path) {
    let path = d.join(UNET);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
}
fn empty_unet(d: &Path) {
    std::fs::write(d.join(UNET), b"").unwrap();
}
fn garbage_unet(d: &Path) {
    std::fs::write(
        d.join(UNET),
        b"\x89PNG\r\n\x1a\nthis is not a weights file at all",
    )
    .unwrap();
}
fn huge_header_unet(d: &Path) {
    let path = d.join(UNET);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
}
/// Rewrites the UNet's safetensors header with `edit` (data kept as is).
fn edit_unet_header(d: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = d.join(UNET);
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let text = serde_json::to_vec(&header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&path, out).unwrap();
}
const CONV_IN: &str = "conv_in.weight";
fn int_dtype_unet(d: &Path) {
    edit_unet_header(d, |h| h[CONV_IN]["dtype"] = "I32".into());
}
fn bool_dtype_unet(d: &Path) {
    // Same bytes read as four times as many booleans: a foreign, non-float format.
    edit_unet_header(d, |h| {
        let shape = h[CONV_IN]["shape"].as_array().unwrap().clone();
        let n: u64 = shape.iter().map(|v| v.as_u64().unwrap()).product();
        h[CONV_IN]["dtype"] = "BOOL".into();
        h[CONV_IN]["shape"] = serde_json::json!([n * 4]);
    });
}
fn nan_unet(d: &Path) {
    let path = d.join(UNET);
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let start = header[CONV_IN]["data_offsets"][0].as_u64().unwrap() as usize + 8 + n;
    let mut bytes = bytes;
    bytes[start..start + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
}
fn offsets_past_end_unet(d: &Path) {
    edit_unet_header(d, |h| {
        h[CONV_IN]["data_offsets"] = serde_json::json!([0, 1u64 << 40])
    });
}
fn overflowing_shape_unet(d: &Path) {
    edit_unet_header(d, |h| {
        h[CONV_IN]["shape"] = serde_json::json!([1u64 << 32, 1u64 << 32, 1u64 << 32])
    });
}
/// Rewrites the UNet's weights as the list of tensors `edit` leaves (name, header entry, bytes).
fn edit_unet_tensors(d: &Path, edit: impl FnOnce(&mut Vec<(String, serde_json::Value, Vec<u8>)>)) {
    let path = d.join(UNET);
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut tensors: Vec<(String, serde_json::Value, Vec<u8>)> = header
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(k, v)| {
            let (a, b) = (
                v["data_offsets"][0].as_u64().unwrap(),
                v["data_offsets"][1].as_u64().unwrap(),
            );
            (k, v, data[a as usize..b as usize].to_vec())
        })
        .collect();
    edit(&mut tensors);
    let (mut header, mut data) = (serde_json::Map::new(), Vec::new());
    for (name, mut entry, bytes) in tensors {
        entry["data_offsets"] = serde_json::json!([data.len(), data.len() + bytes.len()]);
        data.extend_from_slice(&bytes);
        header.insert(name, entry);
    }
    let text = serde_json::to_vec(&header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&data);
    std::fs::write(&path, out).unwrap();
}
fn missing_tensor_unet(d: &Path) {
    edit_unet_tensors(d, |t| t.retain(|(name, _, _)| name != CONV_IN));
}
fn extra_tensor_unet(d: &Path) {
    edit_unet_tensors(d, |t| {
        let entry = serde_json::json!({"dtype": "F32", "shape": [4], "data_offsets": [0, 16]});
        t.push(("add_embedding.linear_1.weight".into(), entry, vec![0; 16]));
    });
}
fn misshaped_tensor_unet(d: &Path) {
    edit_unet_header(d, |h| {
        let mut shape: Vec<u64> = h[CONV_IN]["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        shape.swap(0, 1);
        h[CONV_IN]["shape"] = serde_json::json!(shape);
    });
}
fn pickle_unet(d: &Path) {
    std::fs::rename(
        d.join(UNET),
        d.join("model/unet/diffusion_pytorch_model.bin"),
    )
    .unwrap();
}
fn no_unet_weights(d: &Path) {
    std::fs::remove_file(d.join(UNET)).unwrap();
}
fn shard_outside_folder(d: &Path) {
    std::fs::rename(d.join(UNET), d.join("model/unet/part.safetensors")).unwrap();
    std::fs::write(
        d.join("model/unet/diffusion_pytorch_model.safetensors.index.json"),
        r#"{"weight_map": {"conv_in.weight": "../../photo.session", "conv_in.bias": "part.safetensors"}}"#,
    )
    .unwrap();
}
fn missing_shard(d: &Path) {
    std::fs::rename(d.join(UNET), d.join("model/unet/part-1.safetensors")).unwrap();
    std::fs::write(
        d.join("model/unet/diffusion_pytorch_model.safetensors.index.json"),
        r#"{"weight_map": {"conv_in.weight": "part-1.safetensors", "conv_in.bias": "part-2.safetensors"}}"#,
    )
    .unwrap();
}
fn truncated_vae(d: &Path) {
    let path = d.join("model/vae/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
}
fn foreign_text_encoder(d: &Path) {
    let builtin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/shapes-64/text_encoder");
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(builtin.join(file), d.join("model/text_encoder").join(file)).unwrap();
    }
}

// ---- configs ----

/// Sets `key` of a JSON file under the case folder to `value` (JSON text).
fn set_json(d: &Path, file: &str, key: &str, value: &str) {
    let path = d.join(file);
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json[key] = serde_json::from_str(value).unwrap();
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
}
fn broken_unet_config(d: &Path) {
    std::fs::write(d.join("model/unet/config.json"), "{\"in_channels\": 4,").unwrap();
}
fn sdxl_unet_config(d: &Path) {
    set_json(
        d,
        "model/unet/config.json",
        "addition_embed_type",
        "\"text_time\"",
    );
}
fn wrong_channels_unet_config(d: &Path) {
    set_json(
        d,
        "model/unet/config.json",
        "block_out_channels",
        "[16, 64]",
    );
}
fn inpainting_unet_config(d: &Path) {
    set_json(d, "model/unet/config.json", "in_channels", "9");
}
fn cross_attention_unet_config(d: &Path) {
    set_json(d, "model/unet/config.json", "cross_attention_dim", "768");
}
fn mistyped_vae_config(d: &Path) {
    set_json(d, "model/vae/config.json", "latent_channels", "\"four\"");
}
fn unknown_activation_text_config(d: &Path) {
    set_json(
        d,
        "model/text_encoder/config.json",
        "hidden_act",
        "\"swish\"",
    );
}
fn betas_above_one(d: &Path) {
    set_json(
        d,
        "model/scheduler/scheduler_config.json",
        "beta_end",
        "1.5",
    );
}
fn absurd_train_timesteps(d: &Path) {
    set_json(
        d,
        "model/scheduler/scheduler_config.json",
        "num_train_timesteps",
        "1000000000000",
    );
}
fn unknown_prediction_type(d: &Path) {
    set_json(
        d,
        "model/scheduler/scheduler_config.json",
        "prediction_type",
        "\"flow\"",
    );
}
fn sdxl_model_index(d: &Path) {
    set_json(
        d,
        "model/model_index.json",
        "_class_name",
        "\"StableDiffusionXLPipeline\"",
    );
}
fn no_model_index(d: &Path) {
    std::fs::remove_file(d.join("model/model_index.json")).unwrap();
}

// ---- tokenizer ----

fn no_vocab(d: &Path) {
    std::fs::remove_file(d.join("model/tokenizer/vocab.json")).unwrap();
}
fn no_merges(d: &Path) {
    std::fs::remove_file(d.join("model/tokenizer/merges.txt")).unwrap();
}
fn merge_of_unknown_token(d: &Path) {
    let path = d.join("model/tokenizer/merges.txt");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("qqqzz xxxyy\n");
    std::fs::write(&path, text).unwrap();
}
fn absurd_vocab(d: &Path) {
    // A 65 MB vocabulary (sparse): no real one is more than a few MB.
    let file = std::fs::File::create(d.join("model/tokenizer/vocab.json")).unwrap();
    file.set_len(65 << 20).unwrap();
}
fn absurd_max_length(d: &Path) {
    set_json(
        d,
        "model/tokenizer/tokenizer_config.json",
        "model_max_length",
        "1000000000000",
    );
}

// ---- images, masks, prompts, init noise ----

fn text_as_image(d: &Path) {
    std::fs::write(d.join("photo.png"), "just some text, not a picture\n").unwrap();
}
fn empty_image(d: &Path) {
    std::fs::write(d.join("photo.png"), b"").unwrap();
}
fn truncated_image(d: &Path) {
    let path = d.join("photo.png");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
}
/// A PNG whose header claims `width` x `height` pixels (one empty IDAT: no pixel data).
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    fn chunk(kind: &[u8], data: &[u8]) -> Vec<u8> {
        let mut out = (data.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&crc32(&[kind, data].concat()).to_be_bytes());
        out
    }
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
    let idat = [0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]; // zlib of nothing
    [
        b"\x89PNG\r\n\x1a\n".to_vec(),
        chunk(b"IHDR", &ihdr),
        chunk(b"IDAT", &idat),
        chunk(b"IEND", &[]),
    ]
    .concat()
}
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
fn huge_image(d: &Path) {
    std::fs::write(d.join("photo.png"), png_claiming(100_000, 100_000)).unwrap();
}
fn zero_size_image(d: &Path) {
    std::fs::write(d.join("photo.png"), png_claiming(0, 64)).unwrap();
}
fn text_as_mask(d: &Path) {
    std::fs::write(d.join("mask.png"), "white where the edit goes").unwrap();
}
fn huge_mask(d: &Path) {
    std::fs::write(d.join("mask.png"), png_claiming(60_000, 60_000)).unwrap();
}
fn empty_prompts(d: &Path) {
    std::fs::write(d.join("prompts.txt"), "\n   \n\n").unwrap();
}
fn binary_prompts(d: &Path) {
    std::fs::write(d.join("prompts.txt"), b"a cat\n\xff\xfe\x00\x01 binary").unwrap();
}
fn absurd_prompts(d: &Path) {
    std::fs::write(d.join("prompts.txt"), "a cat in a hat\n".repeat(100_000)).unwrap();
}
/// A safetensors file holding one tensor `name` of `dtype` and `shape`, zero-filled.
fn safetensors_file(path: &Path, name: &str, dtype: &str, shape: &[usize], size: usize) {
    let header =
        serde_json::json!({ name: {"dtype": dtype, "shape": shape, "data_offsets": [0, size]} });
    let text = serde_json::to_vec(&header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.resize(out.len() + size, 0);
    std::fs::write(path, out).unwrap();
}
fn misshaped_noise(d: &Path) {
    safetensors_file(
        &d.join("noise.safetensors"),
        "latents",
        "F32",
        &[1, 4, 3, 3],
        144,
    );
}
fn integer_noise(d: &Path) {
    safetensors_file(
        &d.join("noise.safetensors"),
        "latents",
        "I64",
        &[1, 4, 8, 8],
        2048,
    );
}
fn unnamed_noise(d: &Path) {
    safetensors_file(
        &d.join("noise.safetensors"),
        "noise",
        "F32",
        &[1, 4, 8, 8],
        1024,
    );
}

// ---- sessions ----

/// The session an `edit -o photo-edit.png` without `--session` would write (and must not touch
/// when it fails).
fn older_session_of_edit(d: &Path) {
    std::fs::copy(d.join("photo.session"), d.join("photo-edit.session")).unwrap();
}
fn mask_named_like_output(d: &Path) {
    std::fs::copy(d.join("mask.png"), d.join("out.mask.png")).unwrap();
}
fn image_named_session(d: &Path) {
    std::fs::copy(d.join("photo.png"), d.join("same.session")).unwrap();
}

fn truncated_session(d: &Path) {
    let path = d.join("photo.session");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() * 2 / 3]).unwrap();
}
/// The catalogue's session packs each matrix delta and records its shape in the `delta_shapes`
/// metadata: change the first digit of the first shape there (the header keeps its length).
fn damaged_packed_session(d: &Path) {
    change_first_shape(&d.join("photo.session"));
}
/// A real one-step LoRA tune's session (its factors' product has the shape `delta_shapes`
/// records), with the first shape there changed.
fn damaged_lora_session(d: &Path) {
    one_step_tune(
        &["--layers", "lora", "--lora-rank", "2"],
        &d.join("lora.session"),
    );
    change_first_shape(&d.join("lora.session"));
}
fn change_first_shape(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + header_len].to_vec()).unwrap();
    let shapes = header.find("delta_shapes").expect("a packed session");
    let digit = 8 + shapes + header[shapes..].find('[').unwrap() + 1;
    bytes[digit] = if bytes[digit] == b'7' { b'5' } else { b'7' };
    std::fs::write(path, bytes).unwrap();
}
fn text_as_session(d: &Path) {
    std::fs::write(d.join("photo.session"), "{\"token\": \"beikkpic\"}").unwrap();
}
fn weights_as_session(d: &Path) {
    std::fs::copy(d.join(UNET), d.join("photo.session")).unwrap();
}
fn tampered_session_image(d: &Path) {
    // The last bytes of the file are the source image's pixels (stored last, as the largest
    // offset): flip one.
    let path = d.join("photo.session");
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
}

// ---- single-file checkpoints ----

fn pickle_checkpoint(d: &Path) {
    std::fs::write(d.join("model.ckpt"), b"PK\x03\x04 as torch.save writes").unwrap();
}
fn sdxl_file(d: &Path) {
    let name = "conditioner.embedders.1.model.positional_embedding";
    safetensors_file(&d.join("sdxl.safetensors"), name, "F32", &[77, 4], 1232);
}
/// The tiny SD 1.x single file with one more tensor, under the UNet's prefix.
fn stray_tensor_file(d: &Path) {
    let bytes = std::fs::read(fixtures().join("tiny-sd1.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let end = bytes.len() - 8 - n;
    header.insert(
        "model.diffusion_model.input_blocks.1.1.lora_up.weight".into(),
        serde_json::json!({"dtype": "F32", "shape": [1], "data_offsets": [end, end + 4]}),
    );
    let text = serde_json::to_vec(&header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    out.extend_from_slice(&[0; 4]);
    std::fs::write(d.join("merged.safetensors"), out).unwrap();
}

// ---- the catalogue ----

#[rustfmt::skip]
const CATALOGUE: &[Case] = &[
    // Weights: truncated, corrupt, mis-typed, mis-shaped, missing and extra tensors, pickles.
    case("truncated UNet weights", truncate_unet, GENERATE, &[UNET, "corrupt or truncated"]),
    case("empty UNet weights file", empty_unet, GENERATE, &[UNET, "not a readable safetensors"]),
    case("UNet weights file of other bytes", garbage_unet, GENERATE, &[UNET, "not a readable safetensors"]),
    case("safetensors header claiming 1 TB", huge_header_unet, GENERATE, &[UNET, "header"]),
    case("tensor offsets past the end of the file", offsets_past_end_unet, GENERATE, &[UNET, "not a readable safetensors"]),
    case("tensor shape whose size overflows", overflowing_shape_unet, GENERATE, &[UNET, "not a readable safetensors"]),
    case("weights stored as integers", int_dtype_unet, GENERATE, &[UNET, "`conv_in.weight`", "I32", "float weights only"]),
    case("weights stored as booleans", bool_dtype_unet, GENERATE, &[UNET, "`conv_in.weight`", "BOOL"]),
    case("NaN in the weights", nan_unet, GENERATE, &[UNET, "`conv_in.weight`", "NaN"]),
    case("missing tensor", missing_tensor_unet, GENERATE, &[UNET, "missing tensor `conv_in.weight`"]),
    case("unexpected extra tensor", extra_tensor_unet, GENERATE, &[UNET, "`add_embedding.linear_1.weight`", "config.json"]),
    case("tensor of the wrong shape", misshaped_tensor_unet, GENERATE, &[UNET, "`conv_in.weight`", "shape"]),
    case("pickle weights only", pickle_unet, GENERATE, &["diffusion_pytorch_model.bin", "safetensors", "convert"]),
    case("no weights file", no_unet_weights, GENERATE, &["model/unet", "no weights found"]),
    case("shard index pointing outside the folder", shard_outside_folder, GENERATE, &["index.json", "weight_map", "../../photo.session"]),
    case("shard index naming a missing shard", missing_shard, GENERATE, &["index.json", "part-2.safetensors", "missing"]),
    case("truncated VAE weights", truncated_vae, GENERATE, &["model/vae/diffusion_pytorch_model.safetensors", "corrupt or truncated"]),
    case("text encoder from another model", foreign_text_encoder, GENERATE, &["text_encoder/config.json", "vocab_size", "different models"]),
    // Configs: broken and unsupported.
    case("UNet config.json cut short", broken_unet_config, GENERATE, &["model/unet/config.json", "invalid JSON"]),
    case("SDXL UNet (addition_embed_type)", sdxl_unet_config, GENERATE, &["model/unet/config.json", "addition_embed_type"]),
    case("UNet config disagreeing with its weights", wrong_channels_unet_config, GENERATE, &[UNET, "shape", "config.json"]),
    case("inpainting UNet (9 input channels)", inpainting_unet_config, GENERATE, &["model/unet/config.json", "in_channels", "latent_channels"]),
    case("UNet cross_attention_dim of another text encoder", cross_attention_unet_config, GENERATE, &["model/unet/config.json", "cross_attention_dim", "hidden_size"]),
    case("VAE config field of the wrong type", mistyped_vae_config, GENERATE, &["model/vae/config.json", "\"four\"", "line"]),
    case("text encoder activation unknown", unknown_activation_text_config, GENERATE, &["model/text_encoder/config.json", "hidden_act", "swish"]),
    case("scheduler betas above 1", betas_above_one, GENERATE, &["scheduler_config.json", "beta_end", "(0, 1)"]),
    case("scheduler with 10^12 training timesteps", absurd_train_timesteps, GENERATE, &["scheduler_config.json", "num_train_timesteps"]),
    case("scheduler prediction_type unknown", unknown_prediction_type, GENERATE, &["scheduler_config.json", "prediction_type", "flow"]),
    case("model_index.json of an SDXL pipeline", sdxl_model_index, GENERATE, &["model_index.json", "_class_name", "StableDiffusionXLPipeline"]),
    case("no model_index.json", no_model_index, GENERATE, &["model", "no model_index.json"]),
    case("scheduler option with a bad value", none, &["generate", "--model", "{d}/model", "--prompt", "a", "--scheduler-option", "timestep_spacing=sideways", "-o", "{d}/out.png"], &["timestep_spacing", "sideways"]),
    case("scheduler option making betas above 1", none, &["generate", "--model", "{d}/model", "--prompt", "a", "--scheduler-option", "beta_end=2", "-o", "{d}/out.png"], &["beta_end"]),
    // Tokenizer files.
    case("no vocab.json", no_vocab, GENERATE, &["tokenizer/vocab.json", "No such file"]),
    case("no merges.txt", no_merges, GENERATE, &["tokenizer/merges.txt", "No such file"]),
    case("merge of tokens not in the vocabulary", merge_of_unknown_token, GENERATE, &["tokenizer/merges.txt", "line", "`qqqzz` is not in vocab.json"]),
    case("vocabulary of absurd size (65 MB)", absurd_vocab, GENERATE, &["tokenizer/vocab.json", "larger than 64 MB"]),
    case("model_max_length of 10^12", absurd_max_length, GENERATE, &["tokenizer_config.json", "model_max_length"]),
    // Images.
    case("text file as --image", text_as_image, &["generate", "--model", "{d}/model", "--prompt", "a", "--image", "{d}/photo.png", "-o", "{d}/out.png"], &["photo.png", "cannot decode"]),
    case("empty --image", empty_image, &["tune", "--model", "{d}/model", "--image", "{d}/photo.png", "--steps", "1", "-o", "{d}/new.session"], &["photo.png"]),
    case("truncated --image", truncated_image, &["tune", "--model", "{d}/model", "--image", "{d}/photo.png", "--steps", "1", "-o", "{d}/new.session"], &["photo.png"]),
    case("PNG claiming 100000 x 100000 pixels (generate)", huge_image, &["generate", "--model", "{d}/model", "--prompt", "a", "--image", "{d}/photo.png", "-o", "{d}/out.png"], &["photo.png", "100000x100000", "megapixels"]),
    case("PNG claiming 100000 x 100000 pixels (tune)", huge_image, &["tune", "--model", "{d}/model", "--image", "{d}/photo.png", "-o", "{d}/new.session"], &["photo.png", "megapixels"]),
    case("PNG of zero width", zero_size_image, &["tune", "--model", "{d}/model", "--image", "{d}/photo.png", "-o", "{d}/new.session"], &["photo.png"]),
    case("missing --image", none, &["tune", "--model", "{d}/model", "--image", "{d}/nothing.png", "-o", "{d}/new.session"], &["nothing.png", "No such file"]),
    // Masks, prompt files, init noise.
    case("text file as --mask", text_as_mask, &["edit", "--model", "{d}/model", "--session", "{d}/photo.session", "--prompt", "a", "--mask", "{d}/mask.png", "--steps", "2", "-o", "{d}/out.png"], &["mask.png", "cannot decode"]),
    case("mask claiming 60000 x 60000 pixels", huge_mask, &["edit", "--model", "{d}/model", "--session", "{d}/photo.session", "--prompt", "a", "--mask", "{d}/mask.png", "--steps", "2", "-o", "{d}/out.png"], &["mask.png", "megapixels"]),
    case("prompts file with no prompt", empty_prompts, &["edit", "--model", "{d}/model", "--session", "{d}/photo.session", "--prompts", "{d}/prompts.txt", "-o", "{d}/out.png"], &["--prompts", "prompts.txt", "no prompt"]),
    case("binary prompts file", binary_prompts, &["edit", "--model", "{d}/model", "--session", "{d}/photo.session", "--prompts", "{d}/prompts.txt", "-o", "{d}/out.png"], &["prompts.txt", "not UTF-8"]),
    case("prompts file of absurd size (1.5 MB)", absurd_prompts, &["edit", "--model", "{d}/model", "--session", "{d}/photo.session", "--prompts", "{d}/prompts.txt", "-o", "{d}/out.png"], &["prompts.txt", "larger than 1 MB"]),
    case("--init-noise of the wrong shape", misshaped_noise, &["generate", "--model", "{d}/model", "--prompt", "a", "--init-noise", "{d}/noise.safetensors", "-o", "{d}/out.png"], &["init-noise", "`latents`", "[1, 4, 3, 3]"]),
    case("--init-noise stored as integers", integer_noise, &["generate", "--model", "{d}/model", "--prompt", "a", "--init-noise", "{d}/noise.safetensors", "-o", "{d}/out.png"], &["noise.safetensors", "`latents`", "I64"]),
    case("--init-noise without `latents`", unnamed_noise, &["generate", "--model", "{d}/model", "--prompt", "a", "--init-noise", "{d}/noise.safetensors", "-o", "{d}/out.png"], &["noise.safetensors", "no tensor named `latents`"]),
    case("--init-noise that is an image", none, &["generate", "--model", "{d}/model", "--prompt", "a", "--init-noise", "{d}/photo.png", "-o", "{d}/out.png"], &["--init-noise", "photo.png", "not a readable safetensors"]),
    // Sessions.
    case("truncated session", truncated_session, &["edit", "--model", "{d}/model", "--session", "{d}/photo.session", "--prompt", "a", "-o", "{d}/out.png"], &["photo.session", "truncated"]),
    case("text file as session", text_as_session, &["edit", "--model", "{d}/model", "--session", "{d}/photo.session", "--prompt", "a", "-o", "{d}/out.png"], &["photo.session", "not a session file"]),
    case("model weights as session", weights_as_session, &["edit", "--model", "{d}/model", "--session", "{d}/photo.session", "--prompt", "a", "-o", "{d}/out.png"], &["photo.session", "not a unitune session"]),
    case("session whose picture was altered", tampered_session_image, &["edit", "--model", "{d}/model", "--session", "{d}/photo.session", "--prompt", "a", "-o", "{d}/out.png"], &["photo.session", "recorded hash"]),
    case("session of another base model", none, &["edit", "--model", "{f}/tiny-sd2", "--session", "{d}/photo.session", "--prompt", "a", "-o", "{d}/out.png"], &["photo.session", "tuned on another model", "--model"]),
    // Numeric flags: NaN, negative, out of range; impossible sizes.
    case("tune --lr NaN", none, &["tune", "--model", "{d}/model", "--image", "{d}/photo.png", "--lr", "NaN", "-o", "{d}/new.session"], &["lr", "finite"]),
    case("tune --lr -1", none, &["tune", "--model", "{d}/model", "--image", "{d}/photo.png", "--lr=-1", "-o", "{d}/new.session"], &["lr", "> 0"]),
    case("tune --steps 0", none, &["tune", "--model", "{d}/model", "--image", "{d}/photo.png", "--steps", "0", "-o", "{d}/new.session"], &["steps", "at least 1"]),
    case("tune --batch 0", none, &["tune", "--model", "{d}/model", "--image", "{d}/photo.png", "--batch", "0", "-o", "{d}/new.session"], &["batch", "at least 1"]),
    case("tune --width 12 (not a multiple of 8)", none, &["tune", "--model", "{d}/model", "--image", "{d}/photo.png", "--width", "12", "-o", "{d}/new.session"], &["width", "multiple of 8"]),
    case("generate --width 0", none, &["generate", "--model", "{d}/model", "--prompt", "a", "--width", "0", "-o", "{d}/out.png"], &["width", "positive multiple of 8"]),
    case("generate --width 100000 --height 100000", none, &["generate", "--model", "{d}/model", "--prompt", "a", "--width", "100000", "--height", "100000", "-o", "{d}/out.png"], &["width", "100000x100000", "megapixels"]),
    case("img2img resized to 100000 x 100000", none, &["generate", "--model", "{d}/model", "--prompt", "a", "--image", "{d}/photo.png", "--width", "100000", "--height", "100000", "-o", "{d}/out.png"], &["width", "megapixels"]),
    case("generate --steps 0", none, &["generate", "--model", "{d}/model", "--prompt", "a", "--steps", "0", "-o", "{d}/out.png"], &["steps", "at least 1"]),
    case("generate --guidance NaN", none, &["generate", "--model", "{d}/model", "--prompt", "a", "--guidance", "NaN", "-o", "{d}/out.png"], &["guidance", "finite"]),
    case("generate --strength 1.5", none, &["generate", "--model", "{d}/model", "--prompt", "a", "--image", "{d}/photo.png", "--strength", "1.5", "-o", "{d}/out.png"], &["strength", "(0, 1]"]),
    case("generate --steps beyond the schedule", none, &["generate", "--model", "{d}/model", "--prompt", "a", "--steps", "5000", "-o", "{d}/out.png"], &["steps", "5000"]),
    case("edit --start 1.5", none, &["edit", "--model", "{d}/model", "--session", "{d}/photo.session", "--prompt", "a", "--start", "1.5", "-o", "{d}/out.png"], &["start", "1.5"]),
    case("edit --guidance inf", none, &["edit", "--model", "{d}/model", "--session", "{d}/photo.session", "--prompt", "a", "--guidance", "inf", "-o", "{d}/out.png"], &["guidance", "finite"]),
    case("edit --interpolate 2", none, &["edit", "--model", "{d}/model", "--session", "{d}/photo.session", "--prompt", "a", "--interpolate", "2", "-o", "{d}/out.png"], &["interpolat", "2"]),
    case("edit --latent-blend -0.5", none, &["edit", "--model", "{d}/model", "--session", "{d}/photo.session", "--prompt", "a", "--latent-blend=-0.5", "-o", "{d}/out.png"], &["latent", "-0.5"]),
    case("edit --seeds 0", none, &["edit", "--model", "{d}/model", "--session", "{d}/photo.session", "--prompt", "a", "--seeds", "0", "-o", "{d}/out.png"], &["seeds"]),
    case("edit --sweep-start with NaN", none, &["edit", "--model", "{d}/model", "--session", "{d}/photo.session", "--prompt", "a", "--sweep-start", "0.5,NaN", "-o", "{d}/out.png"], &["start", "NaN"]),
    case("edit with a mask and a bad --start, before tuning over an older session", older_session_of_edit, &["edit", "--model", "{d}/model", "--image", "{d}/photo.png", "--prompt", "a", "--mask", "{d}/mask.png", "--start", "0", "-o", "{d}/photo-edit.png"], &["start"]),
    case("tune --dtype bf16 on the CPU", none, &["tune", "--model", "{d}/model", "--image", "{d}/photo.png", "--dtype", "bf16", "-o", "{d}/new.session"], &["--dtype bf16", "cuda"]),
    case("--device of no kind", none, &["generate", "--model", "{d}/model", "--prompt", "a", "--device", "tpu", "-o", "{d}/out.png"], &["--device tpu", "cpu, cuda or cuda:N"]),
    case("pretrain --lr NaN", none, &["pretrain", "--output", "{d}/trained", "--preset", "tiny", "--lr", "NaN"], &["lr"]),
    case("pretrain --resume of a folder that is no training", none, &["pretrain", "--output", "{d}/model", "--resume"], &["model", "training_state.json"]),
    // Outputs that would overwrite an input, or that cannot be written.
    case("generate over its --image", none, &["generate", "--model", "{d}/model", "--prompt", "a", "--image", "{d}/photo.png", "-o", "{d}/photo.png"], &["--output", "photo.png", "input image"]),
    case("tune over its --image", none, &["tune", "--model", "{d}/model", "--image", "{d}/photo.png", "-o", "{d}/photo.png"], &["--output", "photo.png", "input image"]),
    case("tune --log-json over its --image", none, &["tune", "--model", "{d}/model", "--image", "{d}/photo.png", "--log-json", "{d}/photo.png", "-o", "{d}/new.session"], &["--log-json", "input image"]),
    case("edit writing its mask over --mask", mask_named_like_output, &["edit", "--model", "{d}/model", "--session", "{d}/photo.session", "--prompt", "a", "--mask", "{d}/out.mask.png", "-o", "{d}/out.png"], &["out.mask.png", "input mask"]),
    case("edit over its --image", none, &["edit", "--model", "{d}/model", "--session", "{d}/photo.session", "--image", "{d}/photo.png", "--prompt", "a", "-o", "{d}/photo.png"], &["photo.png", "input image"]),
    case("edit whose session would replace its --image", image_named_session, &["edit", "--model", "{d}/model", "--image", "{d}/same.session", "--prompt", "a", "-o", "{d}/same.png"], &["same.session", "input image"]),
    case("output that is not PNG", none, &["generate", "--model", "{d}/model", "--prompt", "a", "-o", "{d}/out.jpg"], &["out.jpg", "only PNG"]),
    case("output folder that does not exist", none, &["generate", "--model", "{d}/model", "--prompt", "a", "-o", "{d}/no/such/out.png"], &["no/such", "does not exist"]),
    // Single-file checkpoints (`--model FILE`).
    case("pickle checkpoint as --model", pickle_checkpoint, &["generate", "--model", "{d}/model.ckpt", "--prompt", "a", "-o", "{d}/out.png"], &["model.ckpt", "pickle", "safetensors only"]),
    case("single file of an SDXL model", sdxl_file, &["generate", "--model", "{d}/sdxl.safetensors", "--prompt", "a", "-o", "{d}/out.png"], &["sdxl.safetensors", "SDXL", "conditioner.embedders."]),
    case("single file with another network's tensor merged in", stray_tensor_file, &["generate", "--model", "{d}/merged.safetensors", "--config", "{f}/tiny-sd1", "--prompt", "a", "-o", "{d}/out.png"], &["merged.safetensors", "input_blocks.1.1.lora_up.weight", "unexpected"]),
    case("single file with another model's --config", none, &["generate", "--model", "{f}/tiny-sd1.safetensors", "--config", "{f}/tiny-sd2", "--prompt", "a", "-o", "{d}/out.png"], &["tiny-sd1.safetensors", "no place"]),
    case("single file without --config, shapes SD's defaults do not fit", none, &["generate", "--model", "{f}/tiny-sd1.safetensors", "--prompt", "a", "-o", "{d}/out.png"], &["tiny-sd1.safetensors", "--config"]),
    case("--image-size not a multiple of 8", none, &["generate", "--model", "{f}/tiny-sd1.safetensors", "--config", "{f}/tiny-sd1", "--image-size", "100", "--prompt", "a", "-o", "{d}/out.png"], &["image_size", "100"]),
    case("--config with a model folder", none, &["generate", "--model", "{d}/model", "--config", "{f}/tiny-sd1", "--prompt", "a", "-o", "{d}/out.png"], &["config", "single-file", "folder"]),
    case("session whose packed delta does not fit its recorded shape", damaged_packed_session, &["edit", "--model", "{d}/model", "--session", "{d}/photo.session", "--prompt", "a", "-o", "{d}/out.png"], &["photo.session", "packed bytes", "its shape needs"]),
    // LoRA tunes (`--layers lora`).
    case("LoRA session whose factors do not make the recorded shape", damaged_lora_session, &["edit", "--model", "{d}/model", "--session", "{d}/lora.session", "--prompt", "a", "-o", "{d}/out.png"], &["lora.session", "LoRA factors", "do not make its shape"]),
    case("tune --lora-rank without --layers lora", none, &["tune", "--model", "{d}/model", "--image", "{d}/photo.png", "--lora-rank", "4", "-o", "{d}/new.session"], &["--lora-rank", "--layers lora"]),
    case("tune --layers lora --delta-encoding q2", none, &["tune", "--model", "{d}/model", "--image", "{d}/photo.png", "--layers", "lora", "--delta-encoding", "q2", "-o", "{d}/new.session"], &["delta-encoding", "q2", "lora"]),
    case("tune --distill-steps without a coarse code", none, &["tune", "--model", "{d}/model", "--image", "{d}/photo.png", "--distill-steps", "8", "-o", "{d}/new.session"], &["--distill-steps", "q2"]),
    case("tune --delta-encoding lora of whole weights", none, &["tune", "--model", "{d}/model", "--image", "{d}/photo.png", "--delta-encoding", "lora", "-o", "{d}/new.session"], &["delta-encoding", "lora tune"]),
    case("tune --layers lora --lora-rank 0", none, &["tune", "--model", "{d}/model", "--image", "{d}/photo.png", "--layers", "lora", "--lora-rank", "0", "-o", "{d}/new.session"], &["lora-rank", "at least 1"]),
    case("pretrain --vae-from a folder with no autoencoder", none, &["pretrain", "--output", "{d}/trained", "--preset", "tiny", "--vae-from", "{d}/nowhere"], &["nowhere", "vae/config.json"]),
];

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A session of the fixture, made once by a real one-step tune, packed (`q2`) so that its
/// `delta_shapes` can be damaged.
fn session() -> &'static Path {
    static SESSION: OnceLock<PathBuf> = OnceLock::new();
    SESSION.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("unitune-catalogue-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("photo.session");
        one_step_tune(&["--delta-encoding", "q2"], &path);
        path
    })
}

/// A real tune of the fixture, one step of batch 1, with `extra` flags, written to `output`.
fn one_step_tune(extra: &[&str], output: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_unitune"))
        .args(["tune", "--steps", "1", "--batch", "1", "--seed", "1"])
        .args(extra)
        .arg("--model")
        .arg(fixtures().join("tiny-sd1"))
        .arg("--image")
        .arg(fixtures().join("ref/tune-input.png"))
        .arg("-o")
        .arg(output)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every file under `dir` with its contents.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.insert(path.clone(), std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

/// Runs one case in its own folder; returns what went wrong, if anything, and the message.
fn run(index: usize, case: &Case) -> (Option<String>, String) {
    let d = std::env::temp_dir().join(format!(
        "unitune-catalogue-{}/case-{index}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    copy_dir(&fixtures().join("tiny-sd1"), &d.join("model"));
    std::fs::copy(fixtures().join("ref/tune-input.png"), d.join("photo.png")).unwrap();
    std::fs::copy(fixtures().join("ref/img2img-input.png"), d.join("mask.png")).unwrap();
    std::fs::copy(session(), d.join("photo.session")).unwrap();
    std::fs::write(d.join("prompts.txt"), "a cat\n").unwrap();
    std::fs::write(d.join("out.png"), "an older output, to be kept").unwrap();
    (case.setup)(&d);
    let before = snapshot(&d);
    let fixtures = fixtures();
    let args: Vec<String> = case
        .args
        .iter()
        .map(|a| {
            a.replace("{d}", d.to_str().unwrap())
                .replace("{f}", fixtures.to_str().unwrap())
        })
        .collect();
    let out = Command::new(env!("CARGO_BIN_EXE_unitune"))
        .args(&args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let message = stderr
        .lines()
        .filter(|l| l.starts_with("error") || l.trim_start().starts_with("caused by"))
        .collect::<Vec<_>>()
        .join(" / ");
    let mut problems = Vec::new();
    if out.status.code() != Some(1) {
        problems.push(format!("exit status {:?}, expected code 1", out.status));
    }
    if stderr.contains("panicked") {
        problems.push("panicked".into());
    }
    for want in case.expect {
        if !message.contains(want) {
            problems.push(format!("message lacks {want:?}"));
        }
    }
    let after = snapshot(&d);
    if after != before {
        let changed: Vec<_> = after
            .keys()
            .chain(before.keys())
            .filter(|k| after.get(*k) != before.get(*k))
            .map(|k| k.strip_prefix(&d).unwrap().display().to_string())
            .collect();
        problems.push(format!("files created, changed or removed: {changed:?}"));
    }
    let _ = std::fs::remove_dir_all(&d);
    let problems = (!problems.is_empty()).then(|| problems.join("; "));
    (problems, message)
}

/// Runs the cases `range` of the catalogue.
fn run_cases(range: std::ops::Range<usize>) {
    let mut failures = Vec::new();
    for index in range {
        let case = &CATALOGUE[index];
        let (problem, message) = run(index, case);
        if std::env::var_os("UNITUNE_PRINT_CATALOGUE").is_some() {
            println!("| {} | `{}` |", case.name, message.replace(d_marker(), ""));
        }
        if let Some(problem) = problem {
            failures.push(format!("{}: {problem}\n    message: {message}", case.name));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The temp folder prefix, left out of printed messages.
fn d_marker() -> &'static str {
    static MARKER: OnceLock<String> = OnceLock::new();
    MARKER.get_or_init(|| {
        format!(
            "{}/",
            std::env::temp_dir()
                .join(format!("unitune-catalogue-{}", std::process::id()))
                .display()
        )
    })
}

#[test]
fn catalogue_has_at_least_fifty_bad_inputs() {
    assert!(CATALOGUE.len() >= 50, "{}", CATALOGUE.len());
}

/// A quarter of the catalogue: the cases are split over four tests so that they run in parallel.
fn run_quarter(quarter: usize) {
    let n = CATALOGUE.len().div_ceil(4);
    run_cases(quarter * n..((quarter + 1) * n).min(CATALOGUE.len()));
}

#[test]
fn catalogue_part_1() {
    run_quarter(0);
}

#[test]
fn catalogue_part_2() {
    run_quarter(1);
}

#[test]
fn catalogue_part_3() {
    run_quarter(2);
}

#[test]
fn catalogue_part_4() {
    run_quarter(3);
}
