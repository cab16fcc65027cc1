"""The thin layer between the TensorRT backend and the hardware: CUDA memory and streams through cuda-python
(`cuda.bindings.runtime`) and TensorRT 10's runtime API, one call each, nothing decided here (the decisions are
edgevlm.backends.trt_plan's). Importing this module imports neither; `available()` says what is missing.

`Cuda` has run on an H200 (tests/test_trt_backend.py, marked `cuda`); `Engine` has not run on a GPU in this
project: no machine here has TensorRT (see README, TensorRT backend and CUDA).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess

import numpy as np

from edgevlm.backends import trt_plan
from edgevlm.errors import DeviceError


def _cudart():
    try:
        from cuda.bindings import runtime  # cuda-python 12.6+
    except ImportError:
        try:
            from cuda import cudart as runtime  # older cuda-python
        except ImportError:
            raise DeviceError(trt_plan.missing_message(trt_plan.missing_for_tensorrt({"tensorrt": True,
                                                                                      "gpu": True}))) from None
    return runtime


def available() -> dict[str, bool]:
    """tensorrt and cuda-python importable, and a GPU CUDA can see (trt_plan.missing_for_tensorrt's keys)."""
    found = {"tensorrt": importlib.util.find_spec("tensorrt") is not None,
             "cuda": importlib.util.find_spec("cuda") is not None and _has_bindings()}
    gpu = False
    if found["cuda"]:
        try:
            err, count = _cudart().cudaGetDeviceCount()
            gpu = int(err) == 0 and count > 0
        except Exception:  # a driver that cannot load raises from the bindings themselves  # noqa: BLE001
            gpu = False
    elif shutil.which("nvidia-smi"):
        gpu = subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=30).returncode == 0
    found["gpu"] = gpu
    return found


def _has_bindings() -> bool:
    return any(importlib.util.find_spec(m) is not None for m in ("cuda.bindings", "cuda.cudart"))


def _check(result, what: str):
    """cuda-python returns (cudaError_t, *values): the values, or a DeviceError naming the call."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise DeviceError(f"CUDA {what} failed: {getattr(err, 'name', err)}")
    return values[0] if len(values) == 1 else values


class Cuda:
    """Device memory, one stream, copies on it; counts the bytes it holds (current and peak) for the profile."""

    def __init__(self):
        self.rt = _cudart()
        self.stream = _check(self.rt.cudaStreamCreate(), "cudaStreamCreate")
        self.held, self.peak = 0, 0
        self._sizes: dict[int, int] = {}

    @property
    def handle(self) -> int:
        return int(self.stream)

    def malloc(self, nbytes: int) -> int:
        ptr = int(_check(self.rt.cudaMalloc(max(nbytes, 1)), f"cudaMalloc of {nbytes} bytes"))
        self._sizes[ptr] = nbytes
        self.held += nbytes
        self.peak = max(self.peak, self.held)
        return ptr

    def free(self, ptr: int) -> None:
        _check(self.rt.cudaFree(ptr), "cudaFree")
        self.held -= self._sizes.pop(ptr, 0)

    def to_device(self, ptr: int, array: np.ndarray) -> None:
        """Copy a host array to ptr, in stream order (the array must live until the stream passes the copy)."""
        array = np.ascontiguousarray(array)
        _check(self.rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes,
                                       self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream), "copy to device")

    def to_host(self, out: np.ndarray, ptr: int) -> None:
        """Copy ptr into the contiguous host array `out`, in stream order; sync() before reading it."""
        _check(self.rt.cudaMemcpyAsync(out.ctypes.data, ptr, out.nbytes,
                                       self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream), "copy to host")

    def sync(self) -> None:
        _check(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        for ptr in list(self._sizes):
            self.free(ptr)
        _check(self.rt.cudaStreamDestroy(self.stream), "cudaStreamDestroy")


def _tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise DeviceError(trt_plan.missing_message(trt_plan.missing_for_tensorrt({"cuda": True, "gpu": True}))) \
            from None
    return tensorrt


class Engine:
    """One deserialized engine and one execution context on a Cuda's stream."""

    def __init__(self, blob: bytes, cuda: Cuda, label: str, profile_names=()):
        trt = _tensorrt()
        self.trt, self.cuda, self.label = trt, cuda, label
        self.profile_names = tuple(profile_names)  # as engines.json records them, in the engine's order
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(blob)
        if self.engine is None:
            raise trt_plan.EngineError(f"TensorRT could not load the {label} engine (built by another TensorRT?): "
                                       "rebuild it with `edgevlm build`")
        self.context = self.engine.create_execution_context()
        self.profile = 0
        self.nbytes = len(blob)
        size = getattr(self.engine, "device_memory_size_v2", None)
        self.activation_bytes = int(size if size is not None else self.engine.device_memory_size)

    def io(self) -> list[trt_plan.IOTensor]:
        out = []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            mode = self.engine.get_tensor_mode(name)
            dtype = self.engine.get_tensor_dtype(name).name
            out.append(trt_plan.IOTensor(name, mode == self.trt.TensorIOMode.INPUT, trt_plan.TRT_DTYPES.get(dtype,
                                                                                                          dtype)))
        return out

    def use_profile(self, index: int) -> None:
        if index != self.profile:
            if not self.context.set_optimization_profile_async(index, self.cuda.handle):
                raise trt_plan.EngineError(f"the {self.label} engine refused optimization profile {index}")
            self.profile = index

    def run(self, shapes: dict[str, tuple], addresses: dict[str, int], inputs: set[str]) -> None:
        """Enqueue one run: each input's shape, every tensor's device address (inputs and outputs)."""
        for name in inputs:
            if not self.context.set_input_shape(name, shapes[name]):
                raise trt_plan.EngineError(f"the {self.label} engine refused {name} of shape {shapes[name]} (outside "
                                           "its optimization profile): rebuild it for this context")
        for name, ptr in addresses.items():
            if not self.context.set_tensor_address(name, ptr):
                raise trt_plan.EngineError(f"the {self.label} engine refused the address of {name}")
        if not self.context.execute_async_v3(self.cuda.handle):
            raise trt_plan.EngineError(f"the {self.label} engine failed to run")

    def profile_max(self, name: str, index: int) -> tuple[int, ...]:
        """The largest shape of input `name` in optimization profile `index` (what the engine was built for)."""
        return tuple(self.engine.get_tensor_profile_shape(name, index)[2])

    def run_host(self, feeds: dict[str, np.ndarray], outputs: dict[str, str]) -> dict[str, np.ndarray]:
        """A run from host arrays to host arrays (`outputs`: name -> dtype), through device buffers held for this
        run only: the vision tower and the prompt's embedding, which run once per prompt."""
        held, addresses = [], {}
        try:
            for name, array in feeds.items():
                addresses[name] = ptr = self.cuda.malloc(array.nbytes)
                held.append(ptr)
                self.cuda.to_device(ptr, array)
                if not self.context.set_input_shape(name, array.shape):
                    raise trt_plan.EngineError(f"the {self.label} engine refused {name} of shape {array.shape}")
            out = {}
            for name, dtype in outputs.items():
                out[name] = np.empty(tuple(self.context.get_tensor_shape(name)), dtype)
                addresses[name] = ptr = self.cuda.malloc(out[name].nbytes)
                held.append(ptr)
            self.run({}, addresses, set())
            for name, array in out.items():
                self.cuda.to_host(array, addresses[name])
            self.cuda.sync()
            return out
        finally:
            for ptr in held:
                self.cuda.free(ptr)
