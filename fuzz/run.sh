#!/usr/bin/env bash
# Fuzzes unitune's readers with AFL++ (cargo afl, stable toolchain). Usage:
#   fuzz/run.sh [SECONDS] [TARGET...]        (default: 600 s each, every target)
# FUZZ_OUT=DIR puts the findings in DIR instead of fuzz/out (for a second round).
# Builds the instrumented harness into target/afl, then runs each target for SECONDS, niced,
# two at a time; findings go to fuzz/out/TARGET/default/{crashes,hangs}, figures to
# fuzz/out/TARGET/default/fuzzer_stats. Needs `cargo install cargo-afl && cargo afl config --build`.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-600}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(safetensors single_file shard_index unet_config vae_config text_encoder_config scheduler_config
           model_index tokenizer session image mask prompts init_noise)
fi
CARGO_TARGET_DIR=target/afl nice cargo afl build --release -p unitune-fuzz --features afl
bin=target/afl/release/unitune-fuzz
# A crash is any abort (panic, failed allocation): 4 GB of memory at most, 2 s an input.
# The targets write each input to a scratch file: on tmpfs when there is one.
if [ -d /dev/shm ]; then export TMPDIR=/dev/shm; fi
export AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_AFFINITY=1
run() {
  nice -n 19 cargo afl fuzz -V "$seconds" -m 4000 -t 2000 -i "fuzz/corpus/$1" -o "$out/$1" \
    -- "$bin" "$1" > "$out/$1.log" 2>&1
}
out=${FUZZ_OUT:-fuzz/out}
mkdir -p "$out"
for ((i = 0; i < ${#targets[@]}; i += 2)); do
  run "${targets[i]}" &
  if ((i + 1 < ${#targets[@]})); then run "${targets[i + 1]}" & fi
  wait
done
