#!/usr/bin/env bash
# Build (or check) `conala` with `--features cuda` against the toolchain scripts/cuda-toolchain.sh
# installs; no GPU needed. The binary links CUDA's libraries dynamically (see README, "GPUs").
#
#   scripts/build-cuda.sh                 # cargo build --release --features cuda
#   scripts/build-cuda.sh check           # cargo check --release --features cuda (CI)
#
# CUDA_COMPUTE_CAP (default 90, Hopper: H100/H200) picks the GPU architecture candle's kernels are
# compiled for; CARGO_TARGET_DIR is honoured.
set -euo pipefail
cd "$(dirname "$0")/.."

action="${1:-build}"
case "$action" in
  build) home=$(scripts/cuda-toolchain.sh full) ;;
  check) home=$(scripts/cuda-toolchain.sh compiler) ;;
  *) echo "usage: $0 [build|check]" >&2; exit 2 ;;
esac

export CUDA_HOME="$home"
export PATH="$home/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
# nvcc's host compiler runs once per kernel file; spread the files over the cores.
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"

cargo "$action" --release --features cuda
if [ "$action" = build ]; then
  bin="${CARGO_TARGET_DIR:-target}/release/conala"
  echo "built $bin; at run time it needs libcudart.so.13, libcublas.so.13, libcublasLt.so.13," \
    "libcurand.so.10 and libnvrtc.so.13 on LD_LIBRARY_PATH (e.g. $home/lib) and the driver's libcuda.so.1" >&2
fi
