#!/usr/bin/env bash
# Peak memory of a fuzz target: replays every input AFL++ kept for it (its queue, crashes and
# hangs in fuzz/out/TARGET) through the harness, once each, and prints the largest resident set
# in MB. Usage: [FUZZ_OUT=DIR] fuzz/peak_memory.sh TARGET...
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
for target in "$@"; do
  peak=0
  for input in "${FUZZ_OUT:-fuzz/out}/$target"/default/{queue,crashes,hangs}/id*; do
    [ -f "$input" ] || continue
    /usr/bin/time -f "%M" -o "$tmp" timeout 10 target/afl/release/unitune-fuzz "$target" "$input" \
      > /dev/null 2>&1 || true
    kb=$(tail -1 "$tmp")
    if [[ "$kb" =~ ^[0-9]+$ ]] && ((kb > peak)); then peak=$kb; fi
  done
  echo "$target $((peak / 1024)) MB"
done
