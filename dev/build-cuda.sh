#!/usr/bin/env bash
# Builds the CUDA `unitune` binary and the CUDA test executables on a machine without a GPU, with
# the toolkit of dev/cuda-toolkit.sh, and packs them for a GPU machine (which has no Rust):
#
#   dev/build-cuda.sh       -> target/cuda-bundle/unitune-cuda.tar.xz and target/cuda-bundle/wheels/
#
# The bundle holds bin/unitune and tests/<name> (stripped), unpacked and run by dev/gpu-check.sh.
# CUDA_COMPUTE_CAP (default 90: H100/H200; candle-kernels then targets sm_90a, which runs only on
# compute capability 9.0) and UNITUNE_CUDA_FEATURES (default cudnn: the `cuda` build plus cuDNN
# convolutions; or cuda) choose the build; the bundle always goes to target/cuda-bundle, the build
# to $CARGO_TARGET_DIR (default target). About 9 min from scratch on 2 quiet cores, 17 under load
# (40 with the release test executables on a busy machine); later runs rebuild what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

source dev/cuda-env.sh
features="${UNITUNE_CUDA_FEATURES:-cudnn}"
target="${CARGO_TARGET_DIR:-target}"
bundle=target/cuda-bundle
if [[ "$features" == *cudnn* ]]; then
    # cuDNN is linked (candle turns on cudarc's dynamic-linking) but no CUDA 13 wheel of it is
    # needed here: as for libcuda, a link stub with the SONAME of cuDNN 9 and every function
    # cudarc's bindings name satisfies the linker; the GPU machine loads torch's libcudnn.so.9.
    # Each returns CUDNN_STATUS_NOT_INITIALIZED (1001 in cuDNN 9).
    stub="$CUDA_PATH/lib/stubs/libcudnn.so"
    if [[ ! -e "$stub" ]]; then
        cudarc="$(cargo metadata --format-version 1 --locked --all-features |
            python3 -c 'import json, sys
print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"))')"
        mkdir -p "$(dirname "$stub")"
        grep -oE 'load::<_F>\("cudnn[A-Za-z0-9_]*"\)' "$(dirname "$cudarc")/src/cudnn/sys/mod.rs" |
            sed -E 's/.*"(cudnn[A-Za-z0-9_]*)".*/int \1(void) { return 1001; }/' | sort -u \
            >"$CUDA_PATH/lib/stubs/libcudnn.c"
        gcc -shared -fPIC -Wl,-soname,libcudnn.so.9 -o "$stub.part" "$CUDA_PATH/lib/stubs/libcudnn.c"
        mv "$stub.part" "$stub"
    fi
fi
rm -rf "$bundle/stage"
mkdir -p "$bundle/stage/bin" "$bundle/stage/tests"

cargo build --release --locked -p unitune-cli --features "$features"
cp "$target/release/unitune" "$bundle/stage/bin/"

# The test targets compiled only with the `cuda` feature; cargo names their executables in its
# JSON messages. The binary's package is selected too, so that features unify as in its build
# and the dependencies (candle-kernels' nvcc step above all) are not built a second time.
cargo test --release --locked -p unitune-cli -p unitune -p unitune-kernels --features "$features" \
    --test cuda --test cuda_attention --no-run --message-format=json |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["name"], m["executable"])' |
    while read -r name exe; do cp "$exe" "$bundle/stage/tests/$name"; done
for name in cuda cuda_attention; do
    [[ -x "$bundle/stage/tests/$name" ]] || { echo "build-cuda: no test executable $name" >&2; exit 1; }
done

strip "$bundle"/stage/bin/* "$bundle"/stage/tests/*
# One xz stream over all files with a dictionary larger than any of them, so that the GPU code
# every executable embeds (candle's kernels, ~33 MB of PTX) is stored once.
tar -C "$bundle/stage" -cf - bin tests |
    xz -T1 --lzma2=preset=6,dict=256MiB >"$bundle/unitune-cuda.tar.xz.part"
mv "$bundle/unitune-cuda.tar.xz.part" "$bundle/unitune-cuda.tar.xz"

# diffusers for dev/bench_torch.py: the GPU machine has torch (Python 3.12) but not diffusers, nor
# perhaps these of its requirements (gpu-check.sh installs each only where it is missing).
rm -rf "$bundle/wheels"
python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$bundle/wheels" \
    --python-version 3.12 --implementation cp --abi cp312 --platform manylinux_2_28_x86_64 \
    diffusers==0.42.1 pillow==13.0.0 importlib_metadata zipp

ls -l "$bundle"/stage/bin "$bundle"/stage/tests "$bundle"/*.tar.xz "$bundle"/wheels
