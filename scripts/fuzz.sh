#!/usr/bin/env bash
# Fuzz for longer than CI does (CI runs a few thousand cases as part of `cargo test --release`):
# mutated plans and overrides, corrupt inputs, corrupt model and adapter files, each for SECONDS
# (default 1800), from a random seed that is printed (CONALA_FUZZ_SEED=N replays a run).
#
#   scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/conala-target}"
export CONALA_FUZZ_SECONDS="${1:-1800}"
export CONALA_FUZZ_SEED="${CONALA_FUZZ_SEED:-$(od -An -N6 -tu8 /dev/urandom | tr -d ' ')}"
echo "fuzzing for ${CONALA_FUZZ_SECONDS}s per kind, seed $CONALA_FUZZ_SEED" >&2
cargo test --release --test fuzz -- --nocapture 2>&1 | grep -E '^fuzz |panicked|FAILED|test result|cases failed|^case '
