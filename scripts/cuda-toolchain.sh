#!/usr/bin/env bash
# Install CUDA's compiler, headers and libraries from NVIDIA's wheels on PyPI into a folder outside the
# work tree, laid out as a CUDA_HOME that candle's build (cudarc, candle-kernels) accepts, and print it.
# No GPU and no system CUDA needed: this is how `conala` is built with `--features cuda` anywhere.
#
#   scripts/cuda-toolchain.sh            # compiler, headers and the libraries a binary links against
#   scripts/cuda-toolchain.sh compiler   # compiler and headers only (enough for `cargo check`, as CI runs)
#
# Environment: CONALA_CUDA_VERSION (default 13.0: the device machines' driver, 580, runs CUDA 13.0, and
# PTX from a newer nvcc would not load there), CONALA_CUDA_CACHE (default ~/.cache/conala-cuda).
# Re-running is cheap: an installed toolchain is reused.
set -euo pipefail

version="${CONALA_CUDA_VERSION:-13.0}"
cache="${CONALA_CUDA_CACHE:-$HOME/.cache/conala-cuda}"
mode="${1:-full}"
case "$mode" in
  compiler) extras="nvcc,crt,cudart,cccl" ;;
  full) extras="nvcc,crt,cudart,cccl,cublas,curand" ;;
  *) echo "usage: $0 [full|compiler]" >&2; exit 2 ;;
esac
site="$cache/$version/site"
home="$site/nvidia/cu${version%%.*}"
stamp="$cache/$version/.installed-$mode"

if [ ! -f "$stamp" ] && [ ! -f "$cache/$version/.installed-full" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location --no-warn-conflicts \
    --target "$site" "cuda-toolkit[$extras]==$version.*" >&2
  # The wheels ship versioned libraries only (libcublas.so.13); the linker looks for libcublas.so.
  for lib in "$home"/lib/lib*.so.*; do
    [ -e "$lib" ] || continue
    base="${lib%%.so.*}.so"
    [ -e "$base" ] || ln -s "$(basename "$lib")" "$base"
  done
  # libcuda.so belongs to the driver, which a build machine need not have. Link against a stub
  # with the driver's soname (as CUDA's own lib/stubs/libcuda.so does): every driver entry point
  # cudarc declares, doing nothing. At run time the real libcuda.so.1 of the GPU machine is loaded.
  if [ "$mode" = full ]; then
    cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/ 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$cudarc" ]; then
      (cd "$(dirname "$0")/.." && cargo fetch >&2)
      cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/ | sort -V | tail -n 1)
    fi
    mkdir -p "$home/lib/stubs"
    grep -ohE 'pub unsafe fn cu[A-Za-z0-9_]+' "$cudarc/src/driver/sys/mod.rs" \
      | sed 's/pub unsafe fn //' | sort -u \
      | sed 's/.*/void &(void) {}/' > "$home/lib/stubs/libcuda-stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$home/lib/stubs/libcuda.so" "$home/lib/stubs/libcuda-stub.c"
  fi
  touch "$stamp"
fi
echo "$home"
