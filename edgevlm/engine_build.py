"""`edgevlm build BUNDLE`: one TensorRT engine per graph of a TensorRT-flavour bundle, built on the device that
will run them (a Jetson or a GPU host) through the `tensorrt` Python API, as edgevlm.engines plans them.

The engines go to BUNDLE/engines/ with a record of what they are bound to (TensorRT version, GPU name, compute
capability) in BUNDLE/engines/engines.json; the bundle's graphs and manifest are left as they are, so the
bundle still verifies and still runs under ONNX Runtime. Nothing of this runs without TensorRT: the import is
refused in one line when `tensorrt` is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from edgevlm import bundle as bundle_mod
from edgevlm import engines
from edgevlm.errors import DeviceError

RECORD = "engines.json"


def _tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise DeviceError("edgevlm build needs TensorRT's Python package (`tensorrt`), which is not importable "
                          "here: build on the Jetson or GPU host (JetPack ships it), or use the bundle's "
                          "trtexec.sh there") from None
    return tensorrt


def device() -> engines.Compatibility:
    """The TensorRT version and the GPU here (name, compute capability), from CUDA's runtime bindings when
    installed, else nvidia-smi."""
    trt = _tensorrt()
    try:
        from cuda.bindings import runtime as cudart  # cuda-python 12.x+
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            cudart = None
    if cudart is not None:
        err, props = cudart.cudaGetDeviceProperties(0)
        if int(err) == 0:
            name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
            return engines.Compatibility(trt.__version__, name.strip("\x00 "), f"{props.major}.{props.minor}")
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.splitlines()[0]
        name, cc = (x.strip() for x in out.rsplit(",", 1))
        return engines.Compatibility(trt.__version__, name, cc)
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        raise DeviceError("cannot tell which GPU this is: install cuda-python or make nvidia-smi work") from None


def build(path: str | Path, *, memory_budget: str | int | None = None, timing_cache: str | Path | None = None,
          log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> Path:
    """Build the engines of the bundle at `path`; returns the engines folder."""
    from edgevlm import memory

    trt = _tensorrt()
    b = bundle_mod.load(path)
    budget, source = memory.budget_for(memory_budget, b.target)
    plans = engines.plan(b, budget, source=source)
    here = device()
    cache_path = Path(timing_cache) if timing_cache else engines.timing_cache_path(here)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    out = b.path / engines.ENGINE_DIR
    tmp = b.path / f".{engines.ENGINE_DIR}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        built = {}
        for i, p in enumerate(plans, 1):
            log(f"[{i}/{len(plans)}] building {p.role} {p.graph} engine ({len(p.profiles)} profile(s), workspace "
                f"{p.workspace_bytes >> 20} MiB) ...")
            started = time.perf_counter()
            blob = _build_one(trt, logger, b.graph(p.onnx), p, cache_path)
            name = Path(p.engine).name
            (tmp / name).write_bytes(blob)
            built[f"{p.role}.{p.graph}"] = {"file": f"{engines.ENGINE_DIR}/{name}", "onnx": p.onnx,
                                            "sha256": bundle_mod.sha256(tmp / name),
                                            "profiles": [prof.name for prof in p.profiles]}
            log(f"[{i}/{len(plans)}] {p.role} {p.graph} done in {time.perf_counter() - started:.1f} s")
        (tmp / RECORD).write_text(json.dumps({"built_for": here.to_dict(), "engines": built}, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {out} ({here.describe()})")
    return out


def _build_one(trt, logger, onnx_path: Path, p: engines.EnginePlan, cache_path: Path) -> bytes:
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise engines.EngineError(f"TensorRT could not parse {p.onnx}: {errors[:300]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, p.workspace_bytes)
    if p.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    for prof in p.profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in prof.shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise engines.EngineError(f"TensorRT could not build an engine from {p.onnx} (see its log above)")
    with bundle_mod.atomic_file(cache_path) as tmp:
        Path(tmp).write_bytes(memoryview(config.get_timing_cache().serialize()))
    return bytes(blob)


def check_engines(path: str | Path) -> dict:
    """The engines record of a bundle, once its engines were built for this TensorRT and GPU (else a one-line
    EngineError saying to rebuild)."""
    b = bundle_mod.load(path, verify=False)
    record_path = b.path / engines.ENGINE_DIR / RECORD
    if not record_path.exists():
        raise engines.EngineError(f"{b.path} has no engines yet: run `edgevlm build {b.path}` on this device")
    record = json.loads(record_path.read_text())
    problem = engines.compatibility_problem(engines.Compatibility.from_dict(record["built_for"]), device(), b.path)
    if problem:
        raise engines.EngineError(problem)
    return record
