//! CPU kernels for training on candle, as custom ops with a backward: candle's own CPU
//! convolution, attention, group and layer norm, linear layers, GEGLU and upsampling spend most of
//! a training step in scalar loops, single-threaded reductions, page faults and intermediate
//! tensors, each of which also costs a gradient in the backward (see `BENCHMARKS.md`). Each op
//! takes f32 CPU tensors; the callers in `unitune::models` fall back to candle's composite ops
//! elsewhere (CUDA, other dtypes), except two: attention, which with the `cuda` feature has CUDA
//! kernels too (`cuda/attention.cu`: on a GPU the composite would store every head's `[n, n]`
//! scores), and the convolution, which with the `cudnn` feature runs its forward and gradients on
//! cuDNN (`conv/cudnn.rs`: candle's CUDA backward takes a generic transposed convolution).
//! Kept in a crate of its own so that it is optimised even in test builds.

pub mod adafactor;
pub mod attention;
pub mod conv;
mod cpu;
pub mod geglu;
pub mod group_norm;
mod layer;
pub mod layer_norm;
pub mod linear;
mod matmul;
mod simd;
#[cfg(test)]
mod testing;
pub mod upsample;
