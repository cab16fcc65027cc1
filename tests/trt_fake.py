"""Stand-ins for the two libraries under edgevlm.backends.trt_device (no GPU here): `cuda.bindings.runtime`, whose
"device memory" is host memory and whose copies are real memmoves between addresses, and `tensorrt`, whose
"engine" runs the bundle's ONNX graph on ONNX Runtime's CPU provider from and to those addresses. The device
layer itself runs unchanged on top of them, so what the backend sends it (addresses, shapes, profiles, copies)
is what gets computed. The fake engine holds the backend to TensorRT's rules: an input shape outside the
current profile's min..max is refused, as are unset addresses and a profile index the engine lacks.

On a machine with a GPU and onnxruntime-gpu but no TensorRT, `install_on_gpu` leaves CUDA real and fakes
`tensorrt` alone: its engines run each graph on ONNX Runtime's CUDA provider from and to the real device
addresses the backend gives them, so everything of the backend but TensorRT's own calls runs on the GPU."""

from __future__ import annotations

import ctypes
import importlib.machinery
import json
import sys
import types
from pathlib import Path

import numpy as np

from edgevlm import engines
from edgevlm.bundle import load as load_bundle

GPU = ("NVIDIA Fake", 9, 0)
VERSION = "10.99.0"
DTYPES = {"float32": "FLOAT", "float16": "HALF", "int64": "INT64", "int32": "INT32", "bool": "BOOL"}


class _Err(int):
    name = "cudaErrorFake"


class Runtime:
    """cuda.bindings.runtime: (err, value) tuples; memory is numpy host buffers, kept alive here."""

    class cudaMemcpyKind:  # noqa: N801 - the bindings' names
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    def __init__(self):
        self.buffers: dict[int, np.ndarray] = {}
        self.copies = {1: 0, 2: 0}  # bytes copied host -> device, device -> host
        self.streams = 0

    def cudaMalloc(self, n):  # noqa: N802
        buf = np.zeros(n, np.uint8)
        self.buffers[buf.ctypes.data] = buf
        return _Err(0), buf.ctypes.data

    def cudaFree(self, ptr):  # noqa: N802
        return (_Err(0) if self.buffers.pop(ptr, None) is not None else _Err(1),)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):  # noqa: N802
        ctypes.memmove(dst, src, n)
        self.copies[kind] += n
        return (_Err(0),)

    def cudaStreamCreate(self):  # noqa: N802
        self.streams += 1
        return _Err(0), self.streams

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        return (_Err(0),)

    def cudaStreamDestroy(self, stream):  # noqa: N802
        return (_Err(0),)

    def cudaGetDeviceCount(self):  # noqa: N802
        return _Err(0), 1

    def cudaGetDeviceProperties(self, index):  # noqa: N802
        return _Err(0), types.SimpleNamespace(name=GPU[0].encode(), major=GPU[1], minor=GPU[2])


def _read(ptr: int, shape, dtype) -> np.ndarray:
    out = np.empty(shape, dtype)
    ctypes.memmove(out.ctypes.data, ptr, out.nbytes)
    return out


class _Context:
    def __init__(self, engine):
        self.engine, self.profile, self.shapes, self.addresses = engine, 0, {}, {}

    def set_optimization_profile_async(self, index, stream):
        if not 0 <= index < len(self.engine.profiles):
            return False
        self.profile = index
        self.engine.switches += 1
        return True

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profiles[self.profile].shapes[name]
        if len(shape) != len(lo) or not all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def get_tensor_shape(self, name):
        feeds = {n: np.zeros(s, self.engine.dtypes[n]) for n, s in self.shapes.items()}
        index = [o.name for o in self.engine.session.get_outputs()].index(name)
        return self.engine.session.run(None, feeds)[index].shape

    def execute_async_v3(self, stream):
        (self._run_on_gpu if self.engine.gpu else self._run_on_host)()
        self.engine.runs.append({n: s for n, s in self.shapes.items()} | {"profile": self.profile})
        return True

    def _run_on_host(self):
        """The graph on ONNX Runtime's CPU provider, from and to the fake device memory (host addresses)."""
        session = self.engine.session
        feeds = {i.name: _read(self.addresses[i.name], self.shapes[i.name], self.engine.dtypes[i.name])
                 for i in session.get_inputs()}
        outputs = session.run(None, feeds)
        for o, value in zip(session.get_outputs(), outputs, strict=True):
            value = np.ascontiguousarray(value)
            ctypes.memmove(self.addresses[o.name], value.ctypes.data, value.nbytes)

    def _run_on_gpu(self):
        """The graph on ONNX Runtime's CUDA provider, its inputs read in place at their device addresses, its
        outputs copied device to device to theirs; after the backend's copies on its stream, before its next."""
        from cuda.bindings import runtime as rt

        session = self.engine.session
        _cuda_ok(rt.cudaDeviceSynchronize())
        binding = session.io_binding()
        for i in session.get_inputs():
            binding.bind_input(i.name, "cuda", 0, self.engine.dtypes[i.name], list(self.shapes[i.name]),
                               self.addresses[i.name])
        for o in session.get_outputs():
            binding.bind_output(o.name, "cuda")
        session.run_with_iobinding(binding)
        for o, value in zip(session.get_outputs(), binding.get_outputs(), strict=True):
            nbytes = int(np.prod(value.shape())) * np.dtype(self.engine.dtypes[o.name]).itemsize
            _cuda_ok(rt.cudaMemcpy(self.addresses[o.name], value.data_ptr(), nbytes,
                                   rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice))
        _cuda_ok(rt.cudaDeviceSynchronize())


def _cuda_ok(result) -> None:
    err = result[0] if isinstance(result, tuple) else result
    assert int(err) == 0, err


class _Engine:
    """An engine blob is JSON naming the ONNX graph and the profiles `edgevlm build` would give it."""

    def __init__(self, blob: bytes, gpu: bool = False):
        import onnxruntime as ort

        spec = json.loads(blob)
        self.gpu = gpu
        self.session = ort.InferenceSession(spec["onnx"], providers=["CUDAExecutionProvider"] if gpu else
                                            ["CPUExecutionProvider"])
        self.profiles = [engines.Profile(p["name"], {k: tuple(map(tuple, v)) for k, v in p["shapes"].items()})
                         for p in spec["profiles"]]
        self.io = [(i.name, True, i.type) for i in self.session.get_inputs()]
        self.io += [(o.name, False, o.type) for o in self.session.get_outputs()]
        self.dtypes = {n: np.float32 if "float)" in t else np.int64 for n, _, t in self.io}
        self.num_io_tensors, self.device_memory_size_v2 = len(self.io), 1000
        self.switches, self.runs = 0, []

    def get_tensor_name(self, i):
        return self.io[i][0]

    def get_tensor_mode(self, name):
        return next(FakeTensorRT.TensorIOMode.INPUT if inp else FakeTensorRT.TensorIOMode.OUTPUT
                    for n, inp, _ in self.io if n == name)

    def get_tensor_dtype(self, name):
        return types.SimpleNamespace(name="FLOAT" if self.dtypes[name] is np.float32 else "INT64")

    def get_tensor_profile_shape(self, name, index):
        return self.profiles[index].shapes[name]

    def create_execution_context(self):
        self.context = _Context(self)
        return self.context


class FakeTensorRT(types.ModuleType):
    __version__ = VERSION

    class TensorIOMode:
        INPUT, OUTPUT = "INPUT", "OUTPUT"

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    def __init__(self, gpu: bool = False):
        super().__init__("tensorrt")
        self.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
        self.loaded: list[_Engine] = []
        self.gpu = gpu

    def Runtime(self, logger):  # noqa: N802
        fake = self

        class _Runtime:
            def deserialize_cuda_engine(self, blob):
                engine = _Engine(blob, fake.gpu)
                fake.loaded.append(engine)
                return engine

        return _Runtime()


def install(monkeypatch) -> tuple[FakeTensorRT, Runtime]:
    """Make `import tensorrt` and `from cuda.bindings import runtime` find the fakes, for this test."""
    trt, rt = FakeTensorRT(), Runtime()
    cuda = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    for module in (cuda, bindings):
        module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None, is_package=True)
        module.__path__ = []
    runtime = types.ModuleType("cuda.bindings.runtime")
    runtime.__spec__ = importlib.machinery.ModuleSpec(runtime.__name__, None)
    for name in dir(rt):
        if name.startswith("cuda"):
            setattr(runtime, name, getattr(rt, name))
    cuda.bindings, bindings.runtime = bindings, runtime
    for name, module in (("tensorrt", trt), ("cuda", cuda), ("cuda.bindings", bindings),
                         ("cuda.bindings.runtime", runtime)):
        monkeypatch.setitem(sys.modules, name, module)
    return trt, rt


def install_on_gpu(monkeypatch) -> FakeTensorRT:
    """Make `import tensorrt` find the fake, whose engines run on ONNX Runtime's CUDA provider; CUDA stays real."""
    trt = FakeTensorRT(gpu=True)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


def build(path: Path, budget: int | None = None, built_for: engines.Compatibility | None = None) -> None:
    """What `edgevlm build` writes (engines/*.plan and engines.json), with fake engines planned as it plans them,
    recorded as built for the fake GPU (or `built_for`)."""
    from edgevlm import bundle as bundle_mod
    from edgevlm.engine_build import RECORD

    b = load_bundle(path)
    out = b.path / engines.ENGINE_DIR
    out.mkdir(exist_ok=True)
    record = {}
    for p in engines.plan(b, budget, default_budget=budget is not None):
        blob = {"onnx": str(b.graph(p.onnx)),
                "profiles": [{"name": prof.name, "shapes": prof.shapes} for prof in p.profiles]}
        (b.path / p.engine).write_text(json.dumps(blob))
        record[f"{p.role}.{p.graph}"] = {"file": p.engine, "onnx": p.onnx,
                                         "sha256": bundle_mod.sha256(b.path / p.engine),
                                         "profiles": [prof.name for prof in p.profiles]}
    built_for = built_for or engines.Compatibility(VERSION, GPU[0], f"{GPU[1]}.{GPU[2]}")
    (out / RECORD).write_text(json.dumps({"built_for": built_for.to_dict(), "engines": record}))
