//! `unet/config.json` of diffusers' `UNet2DConditionModel`, with diffusers' defaults for missing
//! fields.
//!
//! Only the Stable Diffusion 1.x / 2.x family is supported: plain and cross-attention down/up
//! blocks, a cross-attention mid block, sinusoidal timesteps and text conditioning only. Anything
//! else (SDXL's `addition_embed_type`, class embeddings, Kandinsky's `encoder_hid_dim`, ...) is
//! refused up front, naming the field, rather than loading a network that computes something else.
//! Fields that only affect block types we do not build (`resnet_skip_time_act`,
//! `resnet_out_scale_factor`, `cross_attention_norm`, `mid_block_only_cross_attention`, ...) are
//! ignored, as diffusers ignores them for these blocks.

use std::path::Path;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{from_json_value, read_json, Error, Result};
use crate::models::activations::Activation;

/// A down block, by its diffusers class name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownBlockType {
    /// `DownBlock2D`: resnets only.
    DownBlock2D,
    /// `CrossAttnDownBlock2D`: each resnet followed by a `Transformer2DModel`.
    CrossAttnDownBlock2D,
}

/// An up block, by its diffusers class name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpBlockType {
    UpBlock2D,
    CrossAttnUpBlock2D,
}

/// The architecture of a Stable Diffusion 1.x / 2.x UNet. Per-block settings that the file may give
/// as one number are expanded to one entry per down block (up blocks use them reversed, the mid
/// block uses the last entry, as in diffusers).
#[derive(Debug, Clone, PartialEq)]
pub struct UNet2DConditionConfig {
    /// The latent size the model was trained at (64 for SD 1.5 at 512 px), if given.
    pub sample_size: Option<usize>,
    pub in_channels: usize,
    pub out_channels: usize,
    /// Maps the input from [0, 1] to [-1, 1] first.
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<DownBlockType>,
    pub up_block_types: Vec<UpBlockType>,
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: Vec<usize>,
    /// Attention heads per down block. diffusers reads these from `attention_head_dim`: the field
    /// was misnamed when the library was created and in this model it counts heads (the head
    /// size is `channels / heads`); `num_attention_heads` itself is refused by diffusers.
    pub num_attention_heads: Vec<usize>,
    /// `BasicTransformerBlock`s per `Transformer2DModel`, per down block.
    pub transformer_layers_per_block: Vec<usize>,
    /// Width of `encoder_hidden_states` (the text encoder's hidden size).
    pub cross_attention_dim: usize,
    /// `Transformer2DModel` projects in and out with `Linear` (SD 2.x) instead of 1x1 convolutions.
    pub use_linear_projection: bool,
    /// Computes attention scores in f32; our attention always does, so this changes nothing here.
    pub upcast_attention: bool,
    pub downsample_padding: usize,
    /// The mid block's resnets divide their output by this.
    pub mid_block_scale_factor: f64,
    pub act_fn: Activation,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
}

/// The file as written, with `UNet2DConditionModel.__init__`'s defaults. Fields that are numbers
/// or lists are kept as JSON values and checked one by one, so an error can name them.
#[derive(Deserialize)]
#[serde(default)]
struct File {
    #[serde(rename = "_class_name")]
    class_name: Option<String>,
    sample_size: Value,
    in_channels: usize,
    out_channels: usize,
    center_input_sample: bool,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    down_block_types: Vec<String>,
    mid_block_type: Option<String>,
    up_block_types: Vec<String>,
    only_cross_attention: Value,
    block_out_channels: Vec<usize>,
    layers_per_block: Value,
    downsample_padding: usize,
    mid_block_scale_factor: f64,
    dropout: f64,
    act_fn: String,
    norm_num_groups: Option<usize>,
    norm_eps: f64,
    cross_attention_dim: Value,
    transformer_layers_per_block: Value,
    reverse_transformer_layers_per_block: Value,
    encoder_hid_dim: Value,
    encoder_hid_dim_type: Value,
    attention_head_dim: Value,
    num_attention_heads: Value,
    dual_cross_attention: bool,
    use_linear_projection: bool,
    class_embed_type: Value,
    addition_embed_type: Value,
    num_class_embeds: Value,
    upcast_attention: bool,
    resnet_time_scale_shift: String,
    time_embedding_type: String,
    time_embedding_dim: Value,
    time_embedding_act_fn: Value,
    timestep_post_act: Value,
    time_cond_proj_dim: Value,
    conv_in_kernel: usize,
    conv_out_kernel: usize,
    attention_type: String,
    class_embeddings_concat: bool,
}

impl Default for File {
    fn default() -> Self {
        let strings = |s: &[&str]| s.iter().map(|s| s.to_string()).collect();
        Self {
            class_name: None,
            sample_size: Value::Null,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: strings(&[
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: strings(&[
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]),
            only_cross_attention: json!(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: json!(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            dropout: 0.0,
            act_fn: "silu".into(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: json!(1280),
            transformer_layers_per_block: json!(1),
            reverse_transformer_layers_per_block: Value::Null,
            encoder_hid_dim: Value::Null,
            encoder_hid_dim_type: Value::Null,
            attention_head_dim: json!(8),
            num_attention_heads: Value::Null,
            dual_cross_attention: false,
            use_linear_projection: false,
            class_embed_type: Value::Null,
            addition_embed_type: Value::Null,
            num_class_embeds: Value::Null,
            upcast_attention: false,
            resnet_time_scale_shift: "default".into(),
            time_embedding_type: "positional".into(),
            time_embedding_dim: Value::Null,
            time_embedding_act_fn: Value::Null,
            timestep_post_act: Value::Null,
            time_cond_proj_dim: Value::Null,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            attention_type: "default".into(),
            class_embeddings_concat: false,
        }
    }
}

impl UNet2DConditionConfig {
    /// Reads and checks `unet/config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::check(path, read_json(path)?)
    }

    /// Checks a config given as JSON (e.g. one inferred from a single-file checkpoint); `path`
    /// names where it came from in errors.
    pub fn from_json(path: &Path, json: Value) -> Result<Self> {
        Self::check(path, from_json_value(path, json)?)
    }

    fn check(path: &Path, f: File) -> Result<Self> {
        let bad = |field: &str, message: String| Error::config(path, field, message);
        if let Some(class) = f
            .class_name
            .as_deref()
            .filter(|c| *c != "UNet2DConditionModel")
        {
            let message = format!("`{class}` is not supported, only `UNet2DConditionModel`");
            return Err(bad("_class_name", message));
        }
        refuse_unsupported(path, &f)?;

        let n = f.block_out_channels.len();
        if n == 0 || f.block_out_channels.contains(&0) {
            let message = format!(
                "expected a list of positive sizes, got {:?}",
                f.block_out_channels
            );
            return Err(bad("block_out_channels", message));
        }
        use DownBlockType::*;
        use UpBlockType::*;
        let down_block_types = block_types(
            path,
            "down_block_types",
            &f.down_block_types,
            n,
            &[
                ("DownBlock2D", DownBlock2D),
                ("CrossAttnDownBlock2D", CrossAttnDownBlock2D),
            ],
        )?;
        let up_block_types = block_types(
            path,
            "up_block_types",
            &f.up_block_types,
            n,
            &[
                ("UpBlock2D", UpBlock2D),
                ("CrossAttnUpBlock2D", CrossAttnUpBlock2D),
            ],
        )?;
        if f.mid_block_type.as_deref() != Some("UNetMidBlock2DCrossAttn") {
            let message = format!(
                "{:?} is not supported, only `UNetMidBlock2DCrossAttn`",
                f.mid_block_type
            );
            return Err(bad("mid_block_type", message));
        }

        let layers_per_block = per_block(path, "layers_per_block", &f.layers_per_block, n)?;
        if layers_per_block.contains(&0) {
            return Err(bad(
                "layers_per_block",
                "every block needs at least one layer".into(),
            ));
        }
        let transformer_layers_per_block = per_block(
            path,
            "transformer_layers_per_block",
            &f.transformer_layers_per_block,
            n,
        )?;
        let num_attention_heads = per_block(path, "attention_head_dim", &f.attention_head_dim, n)?;
        // Every level with attention splits its channels evenly into heads. Up block `n - 1 - i`
        // mirrors down block `i`; the mid block uses the last level.
        for (i, (&heads, &channels)) in num_attention_heads
            .iter()
            .zip(&f.block_out_channels)
            .enumerate()
        {
            let has_attention = down_block_types[i] == CrossAttnDownBlock2D
                || up_block_types[n - 1 - i] == CrossAttnUpBlock2D
                || i == n - 1;
            if has_attention && (heads == 0 || channels % heads != 0) {
                let message = format!(
                    "block {i}: {channels} channels cannot be split into {heads} attention heads \
                     (in this model the field counts heads)"
                );
                return Err(bad("attention_head_dim", message));
            }
        }
        let cross_attention_dim = match f.cross_attention_dim.as_u64() {
            Some(dim) if dim > 0 => dim as usize,
            _ => {
                let message = format!(
                    "expected one positive integer, got `{}`",
                    f.cross_attention_dim
                );
                return Err(bad("cross_attention_dim", message));
            }
        };
        let only_cross_attention = match &f.only_cross_attention {
            Value::Bool(b) => *b,
            Value::Array(list) => list.iter().any(|v| v != &Value::Bool(false)),
            _ => true,
        };
        if only_cross_attention {
            return Err(bad(
                "only_cross_attention",
                "only `false` is supported".into(),
            ));
        }
        let sample_size = match (&f.sample_size, f.sample_size.as_u64()) {
            (Value::Null, _) => None,
            (_, Some(size)) => Some(size as usize),
            (other, None) => {
                return Err(bad(
                    "sample_size",
                    format!("expected an integer, got `{other}`"),
                ))
            }
        };
        let act_fn = match f.act_fn.as_str() {
            "silu" | "swish" => Activation::Silu,
            "gelu" => Activation::Gelu,
            other => {
                return Err(bad(
                    "act_fn",
                    format!("`{other}` is not supported, only `silu` and `gelu`"),
                ))
            }
        };
        let norm_num_groups = match f.norm_num_groups {
            Some(g) if g > 0 && f.block_out_channels.iter().all(|c| c % g == 0) => g,
            other => {
                let message = format!(
                    "{other:?} must be a number dividing every entry of block_out_channels"
                );
                return Err(bad("norm_num_groups", message));
            }
        };
        for (field, value) in [
            ("in_channels", f.in_channels),
            ("out_channels", f.out_channels),
        ] {
            if value == 0 {
                return Err(bad(field, "must be positive".into()));
            }
        }
        Ok(Self {
            sample_size,
            in_channels: f.in_channels,
            out_channels: f.out_channels,
            center_input_sample: f.center_input_sample,
            flip_sin_to_cos: f.flip_sin_to_cos,
            freq_shift: f.freq_shift,
            down_block_types,
            up_block_types,
            block_out_channels: f.block_out_channels,
            layers_per_block,
            num_attention_heads,
            transformer_layers_per_block,
            cross_attention_dim,
            use_linear_projection: f.use_linear_projection,
            upcast_attention: f.upcast_attention,
            downsample_padding: f.downsample_padding,
            mid_block_scale_factor: f.mid_block_scale_factor,
            act_fn,
            norm_num_groups,
            norm_eps: f.norm_eps,
        })
    }

    /// Width of the time embedding the resnets receive: 4 x the first block's channels.
    pub fn time_embed_dim(&self) -> usize {
        4 * self.block_out_channels[0]
    }
}

/// Block types by class name, one per level. diffusers also accepts a `UNetRes` prefix
/// (`UNetResDownBlock2D` is `DownBlock2D`).
fn block_types<T: Copy>(
    path: &Path,
    field: &str,
    names: &[String],
    n: usize,
    supported: &[(&str, T)],
) -> Result<Vec<T>> {
    if names.len() != n {
        let message = format!("has {} entries but block_out_channels has {n}", names.len());
        return Err(Error::config(path, field, message));
    }
    names
        .iter()
        .map(|name| {
            let base = name.strip_prefix("UNetRes").unwrap_or(name);
            supported
                .iter()
                .find(|(known, _)| *known == base)
                .map(|(_, t)| *t)
                .ok_or_else(|| {
                    let known: Vec<String> =
                        supported.iter().map(|(k, _)| format!("`{k}`")).collect();
                    let message =
                        format!("`{name}` is not supported, only {}", known.join(" and "));
                    Error::config(path, field, message)
                })
        })
        .collect()
}

/// A setting given either once for all blocks or as a list with one entry per block.
fn per_block(path: &Path, field: &str, value: &Value, n: usize) -> Result<Vec<usize>> {
    let as_usize = |v: &Value| v.as_u64().map(|v| v as usize);
    let parsed = match value {
        Value::Array(list) => list
            .iter()
            .map(as_usize)
            .collect::<Option<Vec<_>>>()
            .filter(|l| l.len() == n),
        single => as_usize(single).map(|v| vec![v; n]),
    };
    parsed.ok_or_else(|| {
        let message = format!(
            "expected an integer or a list of {n} integers (one per down block), got `{value}`"
        );
        Error::config(path, field, message)
    })
}

/// Features of other UNet2DConditionModel-based models (SDXL, Kandinsky, LCM, GLIGEN, ...).
fn refuse_unsupported(path: &Path, f: &File) -> Result<()> {
    let refuse = |field: &str, message: String| Err(Error::config(path, field, message));
    if !f.addition_embed_type.is_null() {
        let message = format!(
            "`{}` is not supported (this looks like an SDXL or other non-SD-1/2 UNet); \
             unitune supports Stable Diffusion 1.x and 2.x",
            f.addition_embed_type
        );
        return refuse("addition_embed_type", message);
    }
    let must_be_null = [
        ("class_embed_type", &f.class_embed_type),
        ("num_class_embeds", &f.num_class_embeds),
        ("encoder_hid_dim", &f.encoder_hid_dim),
        ("encoder_hid_dim_type", &f.encoder_hid_dim_type),
        ("time_cond_proj_dim", &f.time_cond_proj_dim),
        ("time_embedding_dim", &f.time_embedding_dim),
        ("time_embedding_act_fn", &f.time_embedding_act_fn),
        ("timestep_post_act", &f.timestep_post_act),
        (
            "reverse_transformer_layers_per_block",
            &f.reverse_transformer_layers_per_block,
        ),
    ];
    for (field, value) in must_be_null {
        if !value.is_null() {
            return refuse(
                field,
                format!("`{value}` is not supported, only null (Stable Diffusion 1.x / 2.x)"),
            );
        }
    }
    if !f.num_attention_heads.is_null() {
        let message =
            "is refused by diffusers for this model; the head count goes in `attention_head_dim`";
        return refuse("num_attention_heads", message.into());
    }
    let must_equal = [
        (
            "time_embedding_type",
            f.time_embedding_type.as_str(),
            "positional",
        ),
        (
            "resnet_time_scale_shift",
            f.resnet_time_scale_shift.as_str(),
            "default",
        ),
        ("attention_type", f.attention_type.as_str(), "default"),
    ];
    for (field, value, wanted) in must_equal {
        if value != wanted {
            return refuse(
                field,
                format!("`{value}` is not supported, only `{wanted}`"),
            );
        }
    }
    for (field, kernel) in [
        ("conv_in_kernel", f.conv_in_kernel),
        ("conv_out_kernel", f.conv_out_kernel),
    ] {
        if kernel != 3 {
            return refuse(field, format!("{kernel} is not supported, only 3"));
        }
    }
    for (field, set) in [
        ("dual_cross_attention", f.dual_cross_attention),
        ("class_embeddings_concat", f.class_embeddings_concat),
    ] {
        if set {
            return refuse(field, "only `false` is supported".into());
        }
    }
    if f.dropout != 0.0 {
        return refuse("dropout", format!("{} is not supported, only 0", f.dropout));
    }
    Ok(())
}
