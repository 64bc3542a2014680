# Sourced by dev/build-cuda.sh and .ci/run: assembles the CUDA 13.0 toolkit (dev/cuda-toolkit.sh,
# passing on --compile-only) and points the build at it. CUDA_COMPUTE_CAP defaults to 90 (H100,
# H200); CUDAFORGE_HOME, where candle-kernels' build writes, defaults to beside the toolkit, and
# CUDAFORGE_THREADS, its parallel nvcc runs, to every core (its own default is half of them, and
# that nvcc step is most of a cold CUDA build).
_toolkit="$(dev/cuda-toolkit.sh "$@" | tail -n 1)"
export CUDA_PATH="$_toolkit" CUDA_HOME="$_toolkit" PATH="$_toolkit/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CUDAFORGE_HOME="${CUDAFORGE_HOME:-$_toolkit/../cudaforge}"
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
unset _toolkit
