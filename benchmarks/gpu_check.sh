#!/usr/bin/env bash
# The GPU check, one command on a machine with an NVIDIA GPU (no network needed; under 8 minutes on the demo):
#   bash benchmarks/gpu_check.sh [--without-tensorrt] [WORKDIR]
# It exports the demo preset twice (fp32 for ONNX Runtime CPU, the reference; the TensorRT flavour, fp16),
# builds the TensorRT engines, runs the cuda-marked tests, then benchmarks/gpu_check.py: answers and top-1
# agreement against fp32 CPU, and decode tok/s, for the TensorRT backend and ONNX Runtime's CUDA provider side
# by side. Before any of that it fails fast (exit 2) listing everything missing. PYTHON picks the interpreter.
# Bundles already in WORKDIR (fp32/, trt/) are used as they are: export them elsewhere and copy them over to check
# a GPU host that has no export toolchain. --without-tensorrt checks the rest where TensorRT is not installed
# (no engines built, no TensorRT row) and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
with_trt=1
if [[ ${1:-} == --without-tensorrt ]]; then with_trt=0; shift; fi
WORK=${1:-$(mktemp -d /tmp/edgevlm-gpu-check.XXXXXX)}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
started=$(date +%s)

missing=()
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  missing+=("nvidia-smi: no NVIDIA driver or GPU visible")
fi
((with_trt == 0)) || "$PY" -c "import tensorrt" 2>/dev/null ||
  missing+=("tensorrt: TensorRT's Python package (JetPack ships it; pip install tensorrt-cu12 or tensorrt-cu13)")
"$PY" -c "
try:
    from cuda.bindings import runtime
except ImportError:
    from cuda import cudart" 2>/dev/null ||
  missing+=("cuda bindings: cuda-python (pip install 'edgevlm[cuda]')")
"$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" \
  2>/dev/null || missing+=("onnxruntime-gpu: ONNX Runtime's CUDA provider (README: TensorRT backend and CUDA)")
[[ -f $WORK/fp32/manifest.json && -f $WORK/trt/manifest.json ]] || "$PY" -c "import torch, transformers, onnx" \
  2>/dev/null || missing+=("the export toolchain: pip install 'edgevlm[export]'")
"$PY" -c "import pytest" 2>/dev/null || missing+=("pytest: pip install 'edgevlm[dev]'")
if ((${#missing[@]})); then
  echo "gpu_check: cannot run here; missing:" >&2
  printf '  - %s\n' "${missing[@]}" >&2
  if ((${#missing[@]} == 1)) && [[ ${missing[0]} == tensorrt:* ]]; then
    echo "gpu_check: --without-tensorrt checks everything else here" >&2
  fi
  exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
systems=onnxruntime-cuda,onnxruntime-cuda-fp32
if ((with_trt)); then
  "$PY" -c "import tensorrt; print('tensorrt', tensorrt.__version__)"
  systems=tensorrt,$systems
else
  echo "gpu_check: --without-tensorrt: TensorRT is NOT checked here (no engines, no tensorrt row)"
fi

step() { echo "[gpu_check +$(( $(date +%s) - started ))s] $*" >&2; }
for flavour in fp32 trt; do
  if [[ -f $WORK/$flavour/manifest.json ]]; then
    step "using the bundle already in $WORK/$flavour"
  else
    step "exporting the demo ($flavour) into $WORK/$flavour"
    args=(); [[ $flavour == trt ]] && args=(--format tensorrt)
    timeout 150 "$PY" -m edgevlm export --out "$WORK/$flavour" --preset demo --overwrite "${args[@]}"
  fi
done
if ((with_trt)); then
  step "building the engines"
  timeout 150 "$PY" -m edgevlm build "$WORK/trt" --timing-cache "$WORK/timing.cache"
fi
step "the cuda-marked tests"
timeout 240 "$PY" -m pytest -q -m cuda -rs tests/test_trt_backend.py tests/test_tensorrt.py tests/test_backend_torch.py
step "parity and decode speed"
timeout 240 "$PY" benchmarks/gpu_check.py --fp32 "$WORK/fp32" --trt "$WORK/trt" --systems "$systems" \
  --json "$WORK/gpu_check.json"
step "done: $WORK/gpu_check.json"
