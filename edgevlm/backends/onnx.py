"""The ONNX Runtime backend: runs a bundle's graphs with nothing but onnxruntime, numpy, tokenizers and PIL.

Per model: an optional vision graph (image crops -> features), an optional token-embedding graph
(VLMs, whose image features are placed into the embeddings in numpy), and a decoder graph with an
explicit KV cache. The cache lives in preallocated buffers bound to the graph by pointer (IO binding),
so no tensor is allocated or copied through Python per token. Fused decoders (edgevlm.export.fused,
manifest kv.shared) read and write one buffer per tensor in place; traced ones read `past` from one
buffer set and write `present` (past and new, concatenated) into the other.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Iterable
from dataclasses import replace

import numpy as np
from PIL import Image

from edgevlm import bundle, memory
from edgevlm.backends.base import Prepared, as_prompt
from edgevlm.bundle import Bundle, graph_bytes
from edgevlm.cache import PrefixCache
from edgevlm.errors import DeviceError, ModelError, first_line
from edgevlm.families import Family, family_module
from edgevlm.kv_cache import KVCache
from edgevlm.manifest import ATTENTION_MASK, INPUT_IDS, LOGITS, PAST, PIXEL_VALUES, POSITION_IDS
from edgevlm.tokenizer import Prompt, Tokenizer

log = logging.getLogger("edgevlm")
PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def _session(path, device: str, threads: int | None, exact_dequantize: bool = False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if exact_dequantize:
        # TensorRT-flavour graphs (DequantizeLinear weights): ONNX Runtime fuses each DequantizeLinear + MatMul into
        # MatMulNBits, by default with int8 activations (accuracy level 4); level 1 computes in fp32 what the
        # graph says, as TensorRT does, so their fidelity here is theirs, not the CPU kernel's.
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=PROVIDERS[device])
    except Exception as e:  # onnxruntime raises its own exception types for bad or unsupported graphs
        first = first_line(e)
        raise ModelError(f"cannot load {path.name}: {first[:300]}") from None
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        # onnxruntime-gpu lists CUDA but silently falls back to CPU without the CUDA libraries
        raise DeviceError("--device cuda was asked for, but ONNX Runtime cannot use CUDA here "
                          "(onnxruntime-gpu with its CUDA libraries is needed); use --device cpu")
    return session


def load(path: str, *, device: str = "cpu", threads: int | None = None, verify: bool = True,
         memory_budget: int | str | None = None, vision_cache_mb: float = 0, prefix_cache_mb: float = 0,
         max_image_tokens: int | None = None,
         pipelined: bool = False) -> tuple[OrtModel, OrtModel | None, memory.MemoryPlan]:
    """A bundle's extractor and reasoner (None if it has none), each given the context the memory plan
    fits in `memory_budget` beside the caches at their sizes (MemoryBudgetError when nothing fits), images cut
    to `max_image_tokens` prompt positions (default: the bundle's own budget, if it was exported with one).
    `pipelined`: the models will compute at once where the plan fits that, so on CPU each session gets half the
    cores unless `threads` (or EDGEVLM_THREADS) says otherwise: two pools of every core contend (measured in
    benchmarks/frame_pipelining.py)."""
    if device == "cuda":
        check_cuda_provider()
    b, plan = planned(path, verify=verify, memory_budget=memory_budget, vision_cache_mb=vision_cache_mb,
                      prefix_cache_mb=prefix_cache_mb, max_image_tokens=max_image_tokens)
    stale = bundle.full_range_int8(b.manifest.quantization)
    if stale and device == "cpu" and int8_sums_saturate():
        log.warning("%s: %s compute int8 on full-range int8 weights, which this CPU (no VNNI) sums inexactly, "
                    "so answers may differ from what the export checked: re-export the bundle", path, ", ".join(stale))
    if pipelined and plan.pipelining and device == "cpu" and not threads and not os.environ.get("EDGEVLM_THREADS"):
        threads = max(1, (os.cpu_count() or 1) // 2)
    models = {role: OrtModel(b, role, device=device, threads=threads, max_context=plan.max_context[role])
              for role in sorted(set(b.stages.values()))}
    return models[b.stages["extract"]], models.get(b.stages.get("think", "")), plan


def int8_sums_saturate(flags: Iterable[str] | None = None, machine: str | None = None) -> bool:
    """Whether ONNX Runtime's uint8 x int8 kernel here adds pairs of products in int16 (x86 without VNNI: AVX2, and
    AVX-512 without VNNI), which full-range int8 weights saturate (export/int8_compute.py). `flags`: the CPU's
    feature flags (default: /proc/cpuinfo's; where they cannot be read, False: nothing to warn about for sure)."""
    if (machine or platform.machine()).lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    if flags is None:
        flags = _cpu_flags()
        if flags is None:
            return False
    return not {"avx512_vnni", "avx_vnni"} & set(flags)


def _cpu_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            line = next((line for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    return set(line.split(":", 1)[1].split()) if line else None


def planned(path: str, *, verify: bool, memory_budget: int | str | None, vision_cache_mb: float,
            prefix_cache_mb: float, max_image_tokens: int | None) -> tuple[Bundle, memory.MemoryPlan]:
    """The bundle (its images cut to `max_image_tokens`) and its memory plan: what every backend loads from."""
    b = bundle.load(path, verify=verify)
    if max_image_tokens is not None:
        role = b.stages["extract"]
        models = {**b.models, role: memory.with_image_budget(b.models[role], max_image_tokens)}
        b = replace(b, manifest=replace(b.manifest, models=models))
    budget, source = memory.budget_for(memory_budget, b.manifest.target)
    plan = memory.plan(b, budget, source=source, vision_cache_mb=vision_cache_mb, prefix_cache_mb=prefix_cache_mb)
    return b, plan


def onnxruntime_distributions() -> dict[str, str]:
    """The installed distributions that provide the `onnxruntime` module, with their versions (onnxruntime,
    onnxruntime-gpu...: each wheel installs the same module, so a second one overwrites the first's files)."""
    from importlib import metadata

    names = metadata.packages_distributions().get("onnxruntime", [])
    return {name: metadata.version(name) for name in sorted(set(names))}


def cuda_provider_problem(distributions: dict[str, str], providers: list[str]) -> str | None:
    """Why ONNX Runtime cannot run on CUDA here, in one line naming the fix; None when its CUDA provider is
    there. `distributions`: onnxruntime_distributions(); `providers`: ort.get_available_providers()."""
    if "CUDAExecutionProvider" in providers:
        return None
    installed = ", ".join(f"{n} {v}" for n, v in distributions.items()) or "no onnxruntime distribution"
    if len(distributions) > 1:
        return (f"--device cuda: {installed} are all installed and overwrite one module's files; uninstall them "
                "all, then install onnxruntime-gpu alone (README: TensorRT backend and CUDA)")
    return (f"--device cuda needs ONNX Runtime's CUDA provider, which {installed} does not have: replace it with "
            "onnxruntime-gpu (pip uninstall -y onnxruntime && pip install 'onnxruntime-gpu[cuda,cudnn]'; README: "
            "TensorRT backend and CUDA), or use --device cpu")


def check_cuda_provider() -> None:
    import onnxruntime as ort

    problem = cuda_provider_problem(onnxruntime_distributions(), ort.get_available_providers())
    if problem:
        raise DeviceError(problem)


class OrtDecodeState:
    """One generation's KV cache and the latest logits."""

    def __init__(self, model: OrtModel, cache: KVCache, logits: np.ndarray, reused: int = 0):
        self._model, self.cache, self.logits = model, cache, logits
        self.prompt_len = cache.length
        self.reused = reused  # prompt positions taken from the prefix cache

    def step(self, token_id: int) -> np.ndarray:
        """The next-token logits: a view of this generation's buffer, which its next step overwrites."""
        ids = np.array([[token_id]], dtype=np.int64)
        self.logits = self._model.run_decoder(self._model.embed_ids(ids) if self._model.embeds else ids, self.cache)
        return self.logits

    def kv_bytes(self) -> tuple[int, int]:
        return self.cache.nbytes()


class OrtModel:
    """One model of a bundle (the extractor or the reasoner) on ONNX Runtime."""

    backend = "onnxruntime"
    concurrent = True  # sessions are thread-safe: the vision tower's and the other model's run beside these

    def __init__(self, bundle: Bundle, role: str, *, device: str = "cpu", threads: int | None = None,
                 prefill_chunk: int = 512, max_context: int | None = None):
        if device not in PROVIDERS:
            raise DeviceError(f"unknown device {device!r}; use cpu or cuda")
        self._setup(bundle, role, max_context)
        self.device, self.prefill_chunk = device, prefill_chunk
        entry = self.entry
        threads = threads or int(os.environ.get("EDGEVLM_THREADS", "0")) or None
        graphs = entry.graphs
        exact = bundle.manifest.flavour == "tensorrt"
        self.decoder = _session(bundle.graph(graphs["decoder"].file), device, threads, exact)
        self.embeds = "embed" in graphs
        self.embedder = _session(bundle.graph(graphs["embed"].file), device, threads, exact) if self.embeds else None
        self.vision = _session(bundle.graph(graphs["vision"].file), device, threads, exact) if entry.vision else None
        self.weight_bytes = {name: graph_bytes(bundle.file(g.file)) for name, g in graphs.items()}
        self.step_bytes = self.weight_bytes["decoder"] - graphs["decoder"].lookup_bytes
        names = [i.name for i in self.decoder.get_inputs()]
        self._input_name, self._past_names = names[0], [n for n in names if n.startswith(PAST)]
        self._mask = ATTENTION_MASK in names  # traced graphs; fused ones take the lengths from the positions
        self._present_names = [o.name for o in self.decoder.get_outputs()][1:]
        # The logits land in a buffer of each generation's: get_outputs() would wrap every present tensor
        # too, each step.
        vocab = self.decoder.get_outputs()[0].shape[-1]
        self._vocab = vocab if isinstance(vocab, int) else entry.dims.vocab if entry.dims else None

    def _setup(self, bundle: Bundle, role: str, max_context: int | None) -> None:
        """What every backend of a bundle's model has: its entry, tokenizer, family, context, arrays."""
        if role not in bundle.models:
            raise ModelError(f"the bundle at {bundle.path} has no {role}")
        entry = bundle.models[role]
        self.entry = self.spec = entry
        self.name = entry.name or f"{bundle.path}:{role}"
        self.module = family_module(entry.family)
        self.family: Family = self.module.FAMILY
        tokenizer_dir = bundle.dir(entry.tokenizer)
        self.tokenizer = Tokenizer(tokenizer_dir)
        # The memory plan may give the model less context than it was trained for (edgevlm.memory).
        self.native_context = entry.max_context
        self.max_context = min(self.native_context, max_context or self.native_context)
        self.family.check_template(self.tokenizer)
        self.vision_batch = memory.VISION_BATCH
        self.eos_ids = self.tokenizer.eos_token_ids(tokenizer_dir)
        if not self.eos_ids:
            raise ModelError(f"{self.name} defines no end-of-sequence token")
        self.arrays = {k: np.load(bundle.file(v)) for k, v in entry.arrays.items()}
        self.prefix_cache = PrefixCache(0)  # off until the pipeline gives it a budget

    # ---------------------------------------------------------------- Model protocol
    def prepare(self, prompt: Prompt | str, image: Image.Image | None = None) -> Prepared:
        prompt = as_prompt(self.tokenizer, prompt)
        if image is None:
            return Prepared(self.tokenizer.encode_prompt(prompt, add_special_tokens=self.family.vision))
        ids, inputs = self.module.prepare_inputs(prompt, image, self.entry.preprocess, self.tokenizer)
        return Prepared(ids, inputs, crops=len(inputs[PIXEL_VALUES]))

    def encode(self, prepared: Prepared) -> None:
        if not prepared.image_inputs:
            return
        # A few crops per run: the tower's attention memory grows with the batch (an AnyRes image is up to
        # 37 crops), and a Jetson shares that memory with everything else.
        pixels = prepared.image_inputs[PIXEL_VALUES]
        out = np.concatenate([self.vision.run(None, {PIXEL_VALUES: pixels[i:i + self.vision_batch]})[0]
                              for i in range(0, len(pixels), self.vision_batch)])
        prepared.image_features = self.module.image_features(out, prepared.image_inputs, self.entry.preprocess,
                                                             self.arrays)

    def embed(self, prepared: Prepared) -> None:
        """A VLM's prompt embeddings with the image features placed (decoders on token ids need none)."""
        if not self.embeds:
            return
        ids = np.array([prepared.input_ids], dtype=np.int64)
        x = self.embed_ids(ids)
        if prepared.image_features is not None:
            slots = ids[0] == self.entry.image_token_id
            if int(slots.sum()) != len(prepared.image_features):
                raise ModelError(f"{int(slots.sum())} image tokens but {len(prepared.image_features)} features")
            x[0, slots] = prepared.image_features
        prepared.inputs_embeds = x

    def decoder_input(self, prepared: Prepared) -> np.ndarray:
        """The decoder's first input for a prompt: token ids, or embeddings with the image features placed."""
        if not self.embeds:
            return np.array([prepared.input_ids], dtype=np.int64)
        if prepared.inputs_embeds is None:
            self.embed(prepared)
        return prepared.inputs_embeds

    def prefill(self, prepared: Prepared) -> OrtDecodeState:
        x = self.decoder_input(prepared)
        # Long prompts (an AnyRes image is thousands of tokens) go in chunks: attention scores for a chunk are
        # [heads, chunk, total] instead of [heads, total, total], which bounds prefill memory on small devices.
        kv = self.entry.kv
        cache = KVCache(len(self._past_names), kv.kv_heads, kv.head_dim, x.shape[1] + 256, self.max_context,
                        shared=kv.shared)
        if self._vocab:
            cache.logits = np.empty((1, 1, self._vocab), np.float32)
        ids, reused = prepared.input_ids, 0
        # Only the text before an image can be shared: image slots hold features, not what their ids say.
        image_id = self.entry.image_token_id
        shareable = ids.index(image_id) if image_id is not None and image_id in ids else len(ids)
        if self.prefix_cache.max_bytes:
            hit = self.prefix_cache.match(ids, min(shareable, len(ids) - 1))  # one position runs, for the logits
            if hit is not None:
                cache.load(*hit)
                reused = hit[1]
        for start in range(reused, x.shape[1], self.prefill_chunk):
            logits = self.run_decoder(x[:, start:start + self.prefill_chunk], cache)
        per_position = cache.nbytes()[1] // max(cache.length, 1)
        if shareable >= self.prefix_cache.min_tokens and 0 < per_position * shareable <= self.prefix_cache.max_bytes:
            self.prefix_cache.put(tuple(ids[:shareable]), cache.snapshot(shareable))
        return OrtDecodeState(self, cache, logits, reused)

    # ---------------------------------------------------------------- graphs
    def embed_ids(self, ids: np.ndarray) -> np.ndarray:
        return self.embedder.run(None, {INPUT_IDS: ids})[0]

    def run_decoder(self, x: np.ndarray, cache: KVCache) -> np.ndarray:
        """Feed x (ids or embeddings) after the cache's contents; return the last position's logits (a view
        of the cache's logits buffer where it has one, which the next run overwrites)."""
        seq, past = x.shape[1], cache.length
        total = past + seq
        cache.reserve(total)
        # A shared cache binds the same buffers at the same shape every step: bound once per generation
        # (and again if it grows). A one-token step then writes its token and position into arrays bound
        # with them and calls nothing else before the run (a fused graph takes no mask to rebind at each new
        # length): SmolLM2's int4 step is ~10 ms, and each binding call between two runs cost ~0.15 ms of it,
        # on caches the run has just flushed. Likewise the logits are handed back as a view, not copied.
        # Only on CPU: elsewhere ONNX Runtime copies a host input to the device that reads it when it is bound,
        # so a binding kept across runs feeds the first step's token (and KV) again (measured on an H200: the
        # fp32 reasoner's decode agreed with CPU on 1 position in 11).
        keep = cache.shared and self.device == "cpu"
        binding = cache.binding if keep and cache.binding_capacity == cache.capacity else None
        if binding is None:
            binding = self.decoder.io_binding()
            for name, pointer in zip(self._past_names, cache.read_pointers(), strict=True):
                binding.bind_input(name, "cpu", 0, np.float32, cache.past_shape(past), pointer)
            if cache.logits is None:
                binding.bind_output(LOGITS, "cpu")
            else:
                binding.bind_output(LOGITS, "cpu", 0, np.float32, list(cache.logits.shape), cache.logits.ctypes.data)
            for name, pointer in zip(self._present_names, cache.write_pointers(), strict=True):
                binding.bind_output(name, "cpu", 0, np.float32, cache.past_shape(total), pointer)
            if keep:
                cache.binding, cache.binding_capacity, cache.step_bound = binding, cache.capacity, False
        if self._mask:
            binding.bind_cpu_input(ATTENTION_MASK, np.ones((1, total), np.int64))
        if keep and seq == 1 and x.dtype == np.int64:
            if not cache.step_bound:
                binding.bind_input(self._input_name, "cpu", 0, np.int64, [1, 1], cache.step_token.ctypes.data)
                binding.bind_input(POSITION_IDS, "cpu", 0, np.int64, [1, 1], cache.step_position.ctypes.data)
                cache.step_bound = True
            cache.step_token[0, 0], cache.step_position[0, 0] = x[0, 0], past
            x = None
        if x is not None:
            binding.bind_cpu_input(self._input_name, x)
            binding.bind_cpu_input(POSITION_IDS, np.arange(past, total, dtype=np.int64)[None])
            cache.step_bound = False
        self.decoder.run_with_iobinding(binding)
        cache.advance(seq)
        if cache.logits is None:
            return binding.get_outputs()[0].numpy()[0, -1]
        return cache.logits[0, -1]
