"""The TensorRT backend's decisions, as pure functions (numpy only; nothing here touches a GPU): which backend a
bundle and device get, how an engine's I/O tensors map onto the manifest's graph I/O, the device KV buffers
and their bytes, the shapes of each decoder run and which optimization profile it uses. edgevlm.backends
.tensorrt carries them out through the thin device layer (edgevlm.backends.trt_device).

The KV cache stays on the device. TensorRT-flavour decoders are the traced graphs (edgevlm.export.tensorrt):
each layer's `present` is concat(past, new), a new [1, kv_heads, past + seq, head_dim] tensor whose row stride
differs from past's, and TensorRT does not let an output alias an input it is still reading. So each tensor
gets two device buffers of the whole planned context, used in turn (ping-pong): a run reads `past` from one
set and writes `present` into the other, which becomes the next run's `past`. That is the two-buffer KV the
memory plan counts for traced decoders (edgevlm.memory.costs), and what kv_bytes reports as allocated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgevlm.engines import PREFILL_CHUNK, EngineError
from edgevlm.errors import DeviceError
from edgevlm.manifest import ATTENTION_MASK, INPUT_IDS, INPUTS_EMBEDS, LOGITS, PAST, POSITION_IDS, PRESENT, Graph

# TensorRT's DataType names (trt.DataType.X.name) -> the manifest's dtype names.
TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
              "INT64": "int64", "BOOL": "bool", "UINT8": "uint8"}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "int32": 4, "int64": 8, "bool": 1, "uint8": 1}


# ---------------------------------------------------------------- which backend
def choose_backend(flavour: str, device: str, requested: str | None = None) -> str:
    """"onnxruntime" or "tensorrt" for a bundle of `flavour` on `device`. A TensorRT-flavour bundle on cuda runs
    its engines; everything else (and any bundle with `requested` "onnxruntime") runs on ONNX Runtime, whose
    CUDA provider `--device cuda` asks for. A DeviceError when TensorRT is asked for where it cannot run: on cpu,
    or on ONNX Runtime's graphs (contrib operators TensorRT cannot parse)."""
    if requested not in (None, "onnxruntime", "tensorrt"):
        raise DeviceError(f"unknown backend {requested!r}; use onnxruntime or tensorrt")
    if requested == "onnxruntime":
        return "onnxruntime"
    if requested == "tensorrt" and device != "cuda":
        raise DeviceError("the TensorRT backend runs on a GPU: use --device cuda")
    if requested == "tensorrt" and flavour != "tensorrt":
        raise DeviceError("this bundle holds ONNX Runtime graphs, which TensorRT cannot parse: export it with "
                          "--format tensorrt and run `edgevlm build` on it")
    return "tensorrt" if flavour == "tensorrt" and device == "cuda" else "onnxruntime"


def missing_for_tensorrt(found: dict[str, bool]) -> list[str]:
    """What the TensorRT backend needs that `found` (tensorrt, cuda, gpu: importable / present) says is not
    here, each with its fix, in the order to fix them."""
    fixes = {"tensorrt": "TensorRT's Python package `tensorrt` (JetPack ships it; on a GPU host pip install "
                         "tensorrt-cu12 or tensorrt-cu13, matching the CUDA driver)",
             "cuda": "CUDA's Python bindings (`cuda.bindings`: pip install 'edgevlm[cuda]')",
             "gpu": "an NVIDIA GPU that CUDA can see (nvidia-smi lists none, or the driver is missing)"}
    return [fixes[k] for k in fixes if not found.get(k, False)]


def missing_message(missing: list[str]) -> str:
    return ("--device cuda runs this TensorRT bundle's engines, which needs " + "; and ".join(missing)
            + " (or --backend onnxruntime: its graphs on ONNX Runtime's CUDA provider)")


# ---------------------------------------------------------------- engine I/O <-> the manifest's graph I/O
@dataclass(frozen=True)
class IOTensor:
    """One I/O tensor of an engine, as TensorRT describes it."""

    name: str
    is_input: bool
    dtype: str  # the manifest's dtype name (TRT_DTYPES)


def binding_table(engine_io: list[IOTensor], graph: Graph, label: str) -> dict[str, IOTensor]:
    """The engine's I/O by name, once it is the graph's: the same inputs and outputs (by name and direction) and
    dtypes, else a one-line EngineError naming the first difference (an engine built from another export)."""
    by_name = {t.name: t for t in engine_io}
    expected = [(t, True) for t in graph.inputs] + [(t, False) for t in graph.outputs]
    for tensor, is_input in expected:
        got = by_name.get(tensor.name)
        kind = "input" if is_input else "output"
        if got is None or got.is_input != is_input:
            raise EngineError(f"the {label} engine has no {kind} {tensor.name} (it was built from another export of "
                              "the graph): rebuild it with `edgevlm build`")
        if got.dtype != tensor.dtype:
            raise EngineError(f"the {label} engine's {kind} {tensor.name} is {got.dtype}, the graph's is "
                              f"{tensor.dtype}: rebuild it with `edgevlm build`")
    extra = sorted(set(by_name) - {t.name for t, _ in expected})
    if extra:
        raise EngineError(f"the {label} engine has I/O the graph has not ({', '.join(extra[:3])}): rebuild it with "
                          "`edgevlm build`")
    return by_name


def kv_names(graph: Graph) -> tuple[list[str], list[str]]:
    """The decoder's past inputs and present outputs, paired in order (past.i.key -> present.i.key)."""
    past = [t.name for t in graph.inputs if t.name.startswith(PAST)]
    present = [PRESENT + name[len(PAST):] for name in past]
    missing = sorted(set(present) - {t.name for t in graph.outputs})
    if missing:
        raise EngineError(f"the decoder graph has no output {missing[0]} for its input "
                          f"{PAST + missing[0][len(PRESENT):]}")
    return past, present


# ---------------------------------------------------------------- the KV buffers
@dataclass(frozen=True)
class KVPlan:
    """Device KV of one model: `tensors` (2 per layer) each in two buffers of `context` positions."""

    tensors: int
    kv_heads: int
    head_dim: int
    context: int
    itemsize: int = 4  # the engine's KV dtype (float32: the graphs keep their I/O in float32)

    @property
    def position_bytes(self) -> int:
        """One position of one tensor."""
        return self.kv_heads * self.head_dim * self.itemsize

    @property
    def buffer_bytes(self) -> int:
        """One buffer: a tensor at the whole context."""
        return self.position_bytes * self.context

    def allocated_bytes(self) -> int:
        return 2 * self.tensors * self.buffer_bytes

    def used_bytes(self, length: int) -> int:
        """What the cache's contents take: the read set's first `length` positions."""
        return self.tensors * self.position_bytes * length

    def shape(self, length: int) -> tuple[int, int, int, int]:
        return (1, self.kv_heads, length, self.head_dim)


@dataclass
class PingPong:
    """Which buffer set a run reads `past` from and writes `present` into, and how long the cache is."""

    length: int = 0
    read: int = 0  # 0 or 1

    @property
    def write(self) -> int:
        return 1 - self.read

    def advance(self, new: int) -> None:
        """A run wrote length + new positions into the write set: it becomes the read set."""
        self.read, self.length = self.write, self.length + new


# ---------------------------------------------------------------- runs
def chunks(start: int, total: int, chunk: int = PREFILL_CHUNK) -> list[tuple[int, int]]:
    """Prefill runs as (past, seq): positions start .. total in chunks of at most `chunk` (the prefill profile's
    largest sequence, edgevlm.engines)."""
    return [(p, min(chunk, total - p)) for p in range(start, total, chunk)]


def profile_for(past: int, seq: int, context: int, names: tuple[str, ...]) -> int:
    """The index of the optimization profile that covers a run of `seq` positions after `past` cached ones
    (edgevlm.engines._axis_ranges: `decode` is one position after 1 .. context - 1; `prefill` a chunk of up to
    PREFILL_CHUNK after 0 .. context - 1). A run past the context is an EngineError: the buffers end there."""
    if seq < 1 or past < 0 or past + seq > context:
        raise EngineError(f"a decoder run of {seq} positions after {past} does not fit the engine's context of "
                          f"{context}")
    if seq > PREFILL_CHUNK:
        raise EngineError(f"a decoder run of {seq} positions is longer than a prefill chunk ({PREFILL_CHUNK})")
    want = "decode" if seq == 1 and past >= 1 else "prefill"
    if want == "decode" and "decode" not in names:
        want = "prefill"  # an engine built with one profile runs steps in it too
    if want not in names:
        raise EngineError(f"the decoder engine has no {want} profile (it has {', '.join(names) or 'none'}): "
                          "rebuild it with `edgevlm build`")
    return names.index(want)


def run_shapes(graph: Graph, kv: KVPlan, past: int, seq: int, hidden: int | None = None) -> dict[str, tuple]:
    """Every input's shape for one decoder run (TensorRT's set_input_shape), and every output's it will write."""
    total = past + seq
    shapes: dict[str, tuple] = {}
    for t in graph.inputs:
        if t.name == INPUTS_EMBEDS:
            width = hidden if hidden is not None else t.shape[-1]
            if not isinstance(width, int):
                raise EngineError(f"the decoder's {INPUTS_EMBEDS} has no fixed width: {t.shape}")
            shapes[t.name] = (1, seq, width)
        elif t.name in (INPUT_IDS, POSITION_IDS):
            shapes[t.name] = (1, seq)
        elif t.name == ATTENTION_MASK:
            shapes[t.name] = (1, total)
        elif t.name.startswith(PAST):
            shapes[t.name] = kv.shape(past)
        else:
            raise EngineError(f"the decoder has an input edgevlm does not feed: {t.name}")
    for t in graph.outputs:
        if t.name.startswith(PRESENT):
            shapes[t.name] = kv.shape(total)
        elif t.name == LOGITS:
            shapes[t.name] = (1, 1, t.shape[-1])
    return shapes


def positions(past: int, seq: int) -> np.ndarray:
    return np.arange(past, past + seq, dtype=np.int64)[None]


# ---------------------------------------------------------------- prefix-cache snapshots
def snapshot_rows(tensors: list[np.ndarray], kv: KVPlan, length: int, n: int) -> tuple[np.ndarray, int]:
    """The first n positions of a cache of `length` (host copies of the read set, each [1, kv_heads, length,
    head_dim] contiguous) in the ONNX Runtime cache's snapshot layout ([tensors, kv_heads * n * head_dim], n), so
    the prefix cache holds one kind of entry."""
    rows = [t.reshape(kv.kv_heads, length, kv.head_dim)[:, :n] for t in tensors]
    return np.ascontiguousarray(np.stack(rows)).reshape(len(tensors), -1), n


def restore_rows(snapshot: tuple[np.ndarray, int], kv: KVPlan, n: int) -> np.ndarray:
    """A snapshot's first n positions as [tensors, kv_heads, n, head_dim], each tensor contiguous: what goes into
    the read set's buffers for a cache of length n."""
    data, length = snapshot
    return np.ascontiguousarray(data.reshape(kv.tensors, kv.kv_heads, length, kv.head_dim)[:, :, :n])
