#!/usr/bin/env bash
# Checks the logic of the fused attention's CUDA kernels without a GPU: compiles
# crates/unitune-kernels/cuda/attention.cu as host C++ (dev/cuda-emulation: a thread per CUDA
# thread, stand-ins for the CUDA headers) and compares it with a direct computation in doubles.
# Needs only g++ (C++20); a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
exe="$(mktemp -d)/check_attention"
g++ -std=c++20 -O1 -pthread -Wno-unknown-pragmas -I dev/cuda-emulation \
    dev/cuda-emulation/check_attention.cpp -o "$exe"
"$exe"
