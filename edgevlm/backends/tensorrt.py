"""The TensorRT backend: a TensorRT-flavour bundle's engines (`edgevlm build`) on an NVIDIA GPU, behind the same
Model protocol as ONNX Runtime's, so the Extract->Think pipeline, the vision and prefix caches and the profile
are the same.

What stays on the device: every layer's KV, in two buffer sets of the whole planned context used in turn
(edgevlm.backends.trt_plan says why), the attention mask (ones, written once), and for VLM decoders the step's
embedding (the embed engine writes straight into the decoder's input). What crosses per token: the token id and
its position in (8 bytes each), and the last position's logits out, because the generation loop's logits
processors (thinking budget, constraints, sampling) run in numpy on the host. The prompt's embeddings (image
features placed in numpy, as on ONNX Runtime) go in once per prefill chunk. The vision tower and the prompt's
embedding run through their engines from and to host arrays, once per prompt.

The decisions are edgevlm.backends.trt_plan's (pure, unit-tested); the hardware calls are
edgevlm.backends.trt_device's. Everything here but TensorRT's own calls has run on an H200, with stand-in engines
that run each graph on ONNX Runtime's CUDA provider at the device addresses this backend gives them
(tests/test_trt_backend.py, marked `cuda`); TensorRT itself has not (README, TensorRT backend and CUDA).
"""

from __future__ import annotations

import numpy as np

from edgevlm import bundle as bundle_mod
from edgevlm import memory
from edgevlm.backends import trt_plan
from edgevlm.backends.base import Prepared
from edgevlm.backends.onnx import OrtModel, planned
from edgevlm.bundle import Bundle
from edgevlm.engines import EngineError
from edgevlm.errors import DeviceError, ModelError
from edgevlm.manifest import ATTENTION_MASK, INPUT_IDS, INPUTS_EMBEDS, LOGITS, POSITION_IDS


def load(path: str, *, verify: bool = True, memory_budget: int | str | None = None, vision_cache_mb: float = 0,
         prefix_cache_mb: float = 0, max_image_tokens: int | None = None) -> tuple[TrtModel, TrtModel | None,
                                                                                     memory.MemoryPlan]:
    """As edgevlm.backends.onnx.load, on the bundle's engines: refused in one line (DeviceError) naming what is
    missing here (tensorrt, cuda-python, a GPU), or (EngineError) when the engines are not built for this GPU."""
    from edgevlm import engine_build
    from edgevlm.backends import trt_device

    missing = trt_plan.missing_for_tensorrt(trt_device.available())
    if missing:
        raise DeviceError(trt_plan.missing_message(missing))
    b, plan = planned(path, verify=verify, memory_budget=memory_budget, vision_cache_mb=vision_cache_mb,
                      prefix_cache_mb=prefix_cache_mb, max_image_tokens=max_image_tokens)
    record = engine_build.check_engines(b.path)
    models = {role: TrtModel(b, role, record, trt_device.Cuda(), max_context=plan.max_context[role],
                             verify=verify)
              for role in sorted(set(b.stages.values()))}
    return models[b.stages["extract"]], models.get(b.stages.get("think", "")), plan


class _HostRunner:
    """An engine run from host arrays (the vision tower, the prompt's embedding), shaped like an ONNX Runtime
    session's `run`, so OrtModel's encode and embed work unchanged."""

    def __init__(self, engine, graph):
        self.engine, self.outputs = engine, {t.name: np.dtype(t.dtype) for t in graph.outputs}

    def run(self, _names, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        out = self.engine.run_host(feeds, self.outputs)
        return [out[name] for name in self.outputs]


class TrtModel(OrtModel):
    """One model of a TensorRT-flavour bundle on its engines."""

    backend = "tensorrt"
    # One CUDA stream per process and one execution context per engine: nothing here has been run from two
    # threads at once on a GPU, so the pipeline runs these models' stages in turn (no overlap, no pipelining).
    concurrent = False

    def __init__(self, bundle: Bundle, role: str, record: dict, cuda, *, max_context: int | None = None,
                 verify: bool = True):
        from edgevlm.backends import trt_device

        self._setup(bundle, role, max_context)
        self.device, self.cuda = "cuda", cuda
        entry, graphs = self.entry, self.entry.graphs
        if entry.kv.shared:
            raise EngineError(f"{self.name}: a fused decoder (ONNX Runtime's contrib operators) has no TensorRT "
                              "engine; export the bundle with --format tensorrt")
        self.engines, self.tables = {}, {}
        for name, graph in graphs.items():
            key = f"{role}.{name}"
            entry_record = record["engines"].get(key)
            if entry_record is None:
                raise EngineError(f"{bundle.path} has no {key} engine: run `edgevlm build {bundle.path}` again")
            file = bundle.path / entry_record["file"]
            if verify and bundle_mod.sha256(file) != entry_record["sha256"]:
                raise EngineError(f"{file} changed since it was built: run `edgevlm build {bundle.path}` again")
            engine = trt_device.Engine(file.read_bytes(), cuda, f"{role} {name}", entry_record.get("profiles", ()))
            self.tables[name] = trt_plan.binding_table(engine.io(), graph, f"{role} {name}")
            self.engines[name] = engine
        self.embeds = "embed" in graphs
        self.embedder = _HostRunner(self.engines["embed"], graphs["embed"]) if self.embeds else None
        self.vision = _HostRunner(self.engines["vision"], graphs["vision"]) if entry.vision else None
        self.weight_bytes = {name: e.nbytes for name, e in self.engines.items()}  # what the GPU holds
        self.step_bytes = self.weight_bytes["decoder"] - graphs["decoder"].lookup_bytes
        self._decoder_setup()

    def _decoder_setup(self) -> None:
        graph, engine = self.entry.graphs["decoder"], self.engines["decoder"]
        self._graph, self._engine = graph, engine
        self._past, self._present = trt_plan.kv_names(graph)
        # The engine's own context (its profiles' largest past + 1) bounds the plan's, when built for less.
        built = engine.profile_max(self._past[0], 0)[2] + 1
        self.max_context = min(self.max_context, built)
        kv = self.entry.kv
        self.kv = trt_plan.KVPlan(len(self._past), kv.kv_heads, kv.head_dim, self.max_context,
                                  trt_plan.ITEMSIZE[self.tables["decoder"][self._past[0]].dtype])
        self._input = INPUTS_EMBEDS if self.embeds else INPUT_IDS
        first = next(t for t in graph.inputs if t.name == self._input)
        self._hidden = first.shape[-1] if self.embeds else None
        logits = next(t for t in graph.outputs if t.name == LOGITS)
        self.logits = np.empty((1, 1, logits.shape[-1]), np.dtype(self.tables["decoder"][LOGITS].dtype))
        c, chunk = self.cuda, trt_plan.PREFILL_CHUNK
        self._sets = [[c.malloc(self.kv.buffer_bytes) for _ in self._past] for _ in range(2)]
        width = self._hidden * 4 if self.embeds else 8
        self._x = c.malloc(chunk * width)
        self._positions = c.malloc(chunk * 8)
        self._logits = c.malloc(self.logits.nbytes)
        self._mask = None
        if any(t.name == ATTENTION_MASK for t in graph.inputs):
            self._mask = c.malloc(self.max_context * 8)
            c.to_device(self._mask, np.ones(self.max_context, np.int64))
        self._token = np.zeros((1, 1), np.int64)  # host staging of a step's inputs, alive across the copy
        self._position = np.zeros((1, 1), np.int64)
        if self.embeds:
            self._token_device = c.malloc(8)
        self.generation = 0
        c.sync()

    def gpu_bytes(self) -> int:
        """What this model holds on the GPU at most: its engines' weights and activation memory, and the buffers
        it allocated (the KV sets, its I/O), counted by its own CUDA helper (one stream and count per model)."""
        return sum(e.nbytes + e.activation_bytes for e in self.engines.values()) + self.cuda.peak

    # ---------------------------------------------------------------- Model protocol
    def prefill(self, prepared: Prepared) -> TrtDecodeState:
        x = self.decoder_input(prepared)
        if x.shape[1] > self.max_context:
            raise ModelError(f"a prompt of {x.shape[1]} positions is longer than the model's {self.max_context}")
        self.generation += 1
        state = TrtDecodeState(self)
        ids, reused = prepared.input_ids, 0
        image_id = self.entry.image_token_id
        shareable = ids.index(image_id) if image_id is not None and image_id in ids else len(ids)
        if self.prefix_cache.max_bytes:
            hit = self.prefix_cache.match(ids, min(shareable, len(ids) - 1))
            if hit is not None:
                rows = trt_plan.restore_rows(hit[0], self.kv, hit[1])
                for ptr, row in zip(self._sets[state.kv.read], rows, strict=True):
                    self.cuda.to_device(ptr, row)
                state.kv.length = reused = hit[1]
        for past, seq in trt_plan.chunks(reused, x.shape[1]):
            self.cuda.to_device(self._x, np.ascontiguousarray(x[:, past:past + seq]))
            self.cuda.to_device(self._positions, trt_plan.positions(past, seq))
            self._run(state.kv, past, seq)
            self.cuda.sync()  # the chunk's host arrays are let go here
        state.reused, state.prompt_len = reused, state.kv.length
        state.logits = self._fetch_logits()
        if shareable >= self.prefix_cache.min_tokens and 0 < self.kv.used_bytes(shareable) <= \
                self.prefix_cache.max_bytes:
            self.prefix_cache.put(tuple(ids[:shareable]), self._snapshot(state.kv, shareable))
        return state

    # ---------------------------------------------------------------- the decoder
    def _run(self, kv: trt_plan.PingPong, past: int, seq: int) -> None:
        """Enqueue one decoder run of `seq` positions (already in the input buffers) after `past` cached ones."""
        engine = self._engine
        engine.use_profile(trt_plan.profile_for(past, seq, self.max_context, engine.profile_names))
        shapes = trt_plan.run_shapes(self._graph, self.kv, past, seq, self._hidden)
        addresses = {self._input: self._x, POSITION_IDS: self._positions, LOGITS: self._logits}
        if self._mask is not None:
            addresses[ATTENTION_MASK] = self._mask
        addresses.update(zip(self._past, self._sets[kv.read], strict=True))
        addresses.update(zip(self._present, self._sets[kv.write], strict=True))
        engine.run(shapes, addresses, {t.name for t in self._graph.inputs})
        kv.advance(seq)

    def step(self, kv: trt_plan.PingPong, token_id: int) -> np.ndarray:
        self._token[0, 0], self._position[0, 0] = token_id, kv.length
        if self.embeds:  # the embed engine writes the token's embedding into the decoder's input buffer
            self.cuda.to_device(self._token_device, self._token)
            self.engines["embed"].run({INPUT_IDS: (1, 1)}, {INPUT_IDS: self._token_device, INPUTS_EMBEDS: self._x},
                                      {INPUT_IDS})
        else:
            self.cuda.to_device(self._x, self._token)
        self.cuda.to_device(self._positions, self._position)
        self._run(kv, kv.length, 1)
        return self._fetch_logits()

    def _fetch_logits(self) -> np.ndarray:
        self.cuda.to_host(self.logits, self._logits)
        self.cuda.sync()
        return self.logits[0, -1]

    def _snapshot(self, kv: trt_plan.PingPong, n: int) -> tuple[np.ndarray, int]:
        dtype = np.dtype(self.tables["decoder"][self._past[0]].dtype)
        host = [np.empty(self.kv.shape(kv.length), dtype) for _ in self._past]
        for array, ptr in zip(host, self._sets[kv.read], strict=True):
            self.cuda.to_host(array, ptr)
        self.cuda.sync()
        return trt_plan.snapshot_rows(host, self.kv, kv.length, n)


class TrtDecodeState:
    """One generation on a TrtModel: which KV set holds its cache, and how long it is. The model's KV buffers
    serve one generation at a time, so a state the model has since started another generation over refuses to
    step (a ModelError, not another generation's logits)."""

    def __init__(self, model: TrtModel):
        self._model, self.generation = model, model.generation
        self.kv = trt_plan.PingPong()
        self.logits: np.ndarray | None = None
        self.reused = self.prompt_len = 0

    def step(self, token_id: int) -> np.ndarray:
        if self.generation != self._model.generation:
            raise ModelError("this decode state's KV buffers were taken by a newer generation on the same model")
        if self.kv.length >= self._model.max_context:
            raise ModelError(f"the context of {self._model.max_context} positions is full")
        self.logits = self._model.step(self.kv, token_id)
        return self.logits

    def kv_bytes(self) -> tuple[int, int]:
        return self._model.kv.allocated_bytes(), self._model.kv.used_bytes(self.kv.length)
