#!/usr/bin/env bash
# The device run: one command, a few minutes on one GPU (`conala bench gpu`): parity on the GPU against
# the CPU and HF's fixtures, bf16 generation and LoRA training against HF transformers (+ PEFT) on the
# same GPU, and one JSON of results (GPU name, driver, memory peak, rates, ratios, the mined projection).
#
# The device machines have no cargo and no network: build here, then carry the binary (stripped and
# xz-compressed, it stays well under the 64 MiB a run carries):
#   scripts/build-cuda.sh && mkdir -p .device && strip -o .device/conala target/release/conala \
#     && xz -T0 -9 -f .device/conala
#   # on the device, from the repository root:
#   scripts/gpu-check.sh .device/conala.xz "$OUT"
# The same steps on the CPU, small and without the Python anchors (what the tests run):
#   scripts/gpu-check.sh --cpu target/release/conala /tmp/gpu-check --no-python
# Arguments after OUT_DIR go to `conala bench gpu`.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=gpu
if [ "${1:-}" = --cpu ]; then
  mode=cpu
  shift
fi
usage="usage: $0 [--cpu] CONALA_BINARY[.xz] OUT_DIR [bench gpu options]"
bin="${1:?$usage}"
out="${2:?$usage}"
shift 2
mkdir -p "$out"

if [[ "$bin" == *.xz ]]; then
  plain="${TMPDIR:-/tmp}/conala-gpu-check"
  if command -v xz >/dev/null; then
    xz -dc "$bin" >"$plain"
  else
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$bin" "$plain"
  fi
  chmod +x "$plain"
  bin="$plain"
fi

if [ "$mode" = cpu ]; then
  exec "$bin" bench gpu --device cpu --quick --out "$out/gpu.json" "$@"
fi

# CUDA's libraries (cudart, cuBLAS, cuRAND, NVRTC) come with the image's PyTorch as nvidia-* wheels; the
# driver's libcuda.so.1 is the system's.
libs=$(python3 - <<'PY'
import glob, os, site
dirs = {os.path.dirname(p) for s in site.getsitepackages() + [site.getusersitepackages()]
        for p in glob.glob(os.path.join(s, "nvidia", "**", "lib*.so*"), recursive=True)}
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/nvidia-smi.txt"
"$bin" bench gpu --device cuda:0 --out "$out/gpu.json" "$@" 2>&1 | tee "$out/gpu.log"
