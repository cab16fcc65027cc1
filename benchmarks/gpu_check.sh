#!/usr/bin/env bash
# The GPU check, one command on a machine with an NVIDIA GPU (no network needed; under 8 minutes on the demo):
#   bash benchmarks/gpu_check.sh [WORKDIR]
# It exports the demo preset twice (fp32 for ONNX Runtime CPU, the reference; the TensorRT flavour, fp16),
# builds the TensorRT engines, runs the cuda-marked tests, then benchmarks/gpu_check.py: answers and top-1
# agreement against fp32 CPU, and decode tok/s, for the TensorRT backend and ONNX Runtime's CUDA provider side
# by side. Before any of that it fails fast (exit 2) listing everything missing. PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
WORK=${1:-$(mktemp -d /tmp/edgevlm-gpu-check.XXXXXX)}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
started=$(date +%s)

missing=()
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  missing+=("nvidia-smi: no NVIDIA driver or GPU visible")
fi
"$PY" -c "import tensorrt" 2>/dev/null ||
  missing+=("tensorrt: TensorRT's Python package (JetPack ships it; pip install tensorrt-cu12 or tensorrt-cu13)")
"$PY" -c "
try:
    from cuda.bindings import runtime
except ImportError:
    from cuda import cudart" 2>/dev/null ||
  missing+=("cuda bindings: cuda-python (pip install 'edgevlm[cuda]')")
"$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" \
  2>/dev/null || missing+=("onnxruntime-gpu: ONNX Runtime's CUDA provider (README: TensorRT backend and CUDA)")
"$PY" -c "import torch, transformers, onnx" 2>/dev/null ||
  missing+=("the export toolchain: pip install 'edgevlm[export]'")
"$PY" -c "import pytest" 2>/dev/null || missing+=("pytest: pip install 'edgevlm[dev]'")
if ((${#missing[@]})); then
  echo "gpu_check: cannot run here; missing:" >&2
  printf '  - %s\n' "${missing[@]}" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$PY" -c "import tensorrt, onnxruntime; print('tensorrt', tensorrt.__version__, '| onnxruntime', onnxruntime.__version__)"

step() { echo "[gpu_check +$(( $(date +%s) - started ))s] $*" >&2; }
step "exporting the demo: fp32 (ONNX Runtime) and the TensorRT flavour (fp16) into $WORK"
timeout 150 "$PY" -m edgevlm export --out "$WORK/fp32" --preset demo --overwrite
timeout 150 "$PY" -m edgevlm export --out "$WORK/trt" --preset demo --format tensorrt --overwrite
step "building the engines"
timeout 150 "$PY" -m edgevlm build "$WORK/trt" --timing-cache "$WORK/timing.cache"
step "the cuda-marked tests"
timeout 120 "$PY" -m pytest -q -m cuda tests/test_trt_backend.py tests/test_tensorrt.py
step "parity and decode speed"
timeout 120 "$PY" benchmarks/gpu_check.py --fp32 "$WORK/fp32" --trt "$WORK/trt" --json "$WORK/gpu_check.json"
step "done: $WORK/gpu_check.json"
