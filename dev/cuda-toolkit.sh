#!/usr/bin/env bash
# Assembles a CUDA 13.0 toolkit from NVIDIA's PyPI wheels, so that the `cuda` feature builds on a
# machine with no GPU and no system CUDA (shared/notes/cuda-build.md has the measured facts).
#
#   dev/cuda-toolkit.sh [--compile-only]     prints the toolkit folder on its last line
#
# The toolkit goes to ${UNITUNE_CUDA_TOOLKIT:-~/.cache/unitune/cuda-13.0} (outside the repository),
# the wheels beside it in `wheels/`. Every CUDA 13 wheel unpacks into `nvidia/cu13/`, already a
# toolkit-shaped tree (bin/nvcc, nvvm/, include/, lib/), so they are unpacked into one folder.
# Idempotent: a wheel already unpacked is skipped, a wheel already downloaded is not fetched again.
#
# --compile-only: nvcc and the headers, enough for `cargo check --features cuda` (candle-kernels'
# build script runs nvcc; nothing is linked). Without it also the libraries the binary links to
# (cuBLAS, cuRAND, NVRTC; 0.5 GB more), their unversioned links and a libcuda.so link stub.
#
# nvcc must stay at 13.0: the GPU machines run driver 580 (CUDA 13.0), which rejects PTX written
# by a newer nvcc. The versions are those `cuda-toolkit==13.0.2` pins.
set -euo pipefail

dest="${UNITUNE_CUDA_TOOLKIT:-${XDG_CACHE_HOME:-$HOME/.cache}/unitune/cuda-13.0}"
compile_only=false
case "${1:-}" in
    --compile-only) compile_only=true ;;
    "") ;;
    *) echo "usage: $0 [--compile-only]" >&2; exit 2 ;;
esac

compile_wheels=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-cccl==13.0.85
)
link_wheels=(
    nvidia-cuda-nvrtc==13.0.88
    nvidia-cublas==13.1.0.3
    nvidia-curand==10.4.0.35
)
wheels=("${compile_wheels[@]}")
$compile_only || wheels+=("${link_wheels[@]}")

mkdir -p "$dest/.unpacked" "$dest/../wheels"
cache="$(cd "$dest/../wheels" && pwd)"

# A wheel's file name starts with its name, dashes as underscores, and its version.
wheel_file() {
    local name="${1%%==*}" version="${1##*==}"
    compgen -G "$cache/${name//-/_}-${version}-*.whl" | head -n 1
}

missing=()
for w in "${wheels[@]}"; do
    [[ -e "$dest/.unpacked/$w" || -n "$(wheel_file "$w")" ]] || missing+=("$w")
done
if ((${#missing[@]})); then
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$cache" "${missing[@]}"
fi

for w in "${wheels[@]}"; do
    [[ -e "$dest/.unpacked/$w" ]] && continue
    file="$(wheel_file "$w")"
    [[ -n "$file" ]] || { echo "cuda-toolkit: pip gave no wheel for $w" >&2; exit 1; }
    # Python's zipfile rather than unzip (not everywhere); it drops the file modes, so the
    # executable bits are put back from the zip's external attributes.
    python3 - "$file" "$dest" <<'EOF'
import os, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
prefix = "nvidia/cu13/"
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        if not info.filename.startswith(prefix) or info.is_dir():
            continue
        target = os.path.join(dest, info.filename[len(prefix):])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with z.open(info) as src, open(target + ".part", "wb") as out:
            out.write(src.read())
        os.chmod(target + ".part", (info.external_attr >> 16) & 0o777 or 0o644)
        os.replace(target + ".part", target)
EOF
    touch "$dest/.unpacked/$w"
done

if ! $compile_only; then
    # The wheels ship versioned sonames only; the linker looks for the unversioned names.
    for lib in cublas cublasLt cudart curand nvrtc; do
        so="$(compgen -G "$dest/lib/lib$lib.so.[0-9]*" | sort | head -n 1)"
        [[ -n "$so" ]] || { echo "cuda-toolkit: no lib$lib.so.* in $dest/lib" >&2; exit 1; }
        ln -sfn "$(basename "$so")" "$dest/lib/lib$lib.so"
    done
    # libcuda.so belongs to the driver, which no wheel ships. Like the real toolkit's
    # lib64/stubs, a stub with the driver's SONAME and every cu* function of cuda.h satisfies the
    # linker; at run time the driver's libcuda.so.1 is loaded instead. Each function returns
    # CUDA_ERROR_NO_DEVICE (100), so that a binary run against the stub (gpu-check.sh's dry run)
    # behaves as on a machine without a GPU.
    stub="$dest/lib/stubs/libcuda.so"
    if [[ ! -e "$stub" ]]; then
        mkdir -p "$dest/lib/stubs"
        # Preprocessed, cuda.h names the real symbols (cuMemAlloc is #defined to cuMemAlloc_v2).
        gcc -E -P -I"$dest/include" "$dest/include/cuda.h" |
            grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d ' (' | sort -u |
            sed 's/.*/int &(void) { return 100; }/' >"$dest/lib/stubs/libcuda.c"
        gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub.part" "$dest/lib/stubs/libcuda.c"
        mv "$stub.part" "$stub"
    fi
fi

"$dest/bin/nvcc" --version | grep -q 'release 13\.0' ||
    { echo "cuda-toolkit: $dest/bin/nvcc is not CUDA 13.0" >&2; exit 1; }
echo "$dest"
