"""The ONNX Runtime backend: runs a bundle's graphs with nothing but onnxruntime, numpy, tokenizers and PIL.

Per model: an optional vision graph (image crops -> features), an optional token-embedding graph
(VLMs, whose image features are placed into the embeddings in numpy), and a decoder graph with an
explicit KV cache. The cache stays in ONNX Runtime's own tensors between steps (IO binding): each
step's `present` outputs are bound as the next step's `past` inputs without a trip through numpy.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from edgevlm.backends.base import Prepared
from edgevlm.bundle import Bundle
from edgevlm.errors import DeviceError, ModelError
from edgevlm.families import Family, family_module
from edgevlm.tokenizer import Tokenizer

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def _session(path, device: str, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=PROVIDERS[device])
    except Exception as e:  # onnxruntime raises its own exception types for bad or unsupported graphs
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load {path.name}: {first[:300]}") from None
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        # onnxruntime-gpu lists CUDA but silently falls back to CPU without the CUDA libraries
        raise DeviceError("--device cuda was asked for, but ONNX Runtime cannot use CUDA here "
                          "(onnxruntime-gpu with its CUDA libraries is needed); use --device cpu")
    return session


class OrtDecodeState:
    """One generation's KV cache (ONNX Runtime values) and the latest logits."""

    def __init__(self, model: OrtModel, past: list, logits: np.ndarray, prompt_len: int):
        self._model, self._past = model, past
        self.logits, self.prompt_len, self.length = logits, prompt_len, prompt_len

    def step(self, token_id: int) -> np.ndarray:
        ids = np.array([[token_id]], dtype=np.int64)
        x = self._model.embed(ids) if self._model.embeds else ids
        self.length += 1
        self.logits, self._past = self._model.run_decoder(x, self._past, self.length)
        return self.logits


class OrtModel:
    """One model of a bundle (the extractor or the reasoner) on ONNX Runtime."""

    def __init__(self, bundle: Bundle, role: str, *, device: str = "cpu", threads: int | None = None):
        if device not in PROVIDERS:
            raise DeviceError(f"unknown device {device!r}; use cpu or cuda")
        if role not in bundle.models:
            raise ModelError(f"the bundle at {bundle.path} has no {role}")
        entry = bundle.models[role]
        self.entry, self.device = entry, device
        self.name = entry.get("source", {}).get("model") or f"{bundle.path}:{role}"
        self.module = family_module(entry["family"])
        self.family: Family = self.module.FAMILY
        self.tokenizer = Tokenizer(bundle.file(entry["tokenizer"]))
        self.max_context = int(entry["max_context"])
        self.eos_ids = self.tokenizer.eos_token_ids(bundle.file(entry["tokenizer"]))
        if not self.eos_ids:
            raise ModelError(f"{self.name} defines no end-of-sequence token")
        threads = threads or int(os.environ.get("EDGEVLM_THREADS", "0")) or None
        graphs = entry["graphs"]
        self.decoder = _session(bundle.file(graphs["decoder"]["file"]), device, threads)
        self.embeds = "embed" in graphs
        self.embedder = _session(bundle.file(graphs["embed"]["file"]), device, threads) if self.embeds else None
        self.vision = _session(bundle.file(graphs["vision"]["file"]), device, threads) if "vision" in graphs else None
        self.arrays = {k: np.load(bundle.file(v)) for k, v in entry.get("arrays", {}).items()}
        kv = entry["kv"]
        self._empty_past = np.zeros((1, kv["kv_heads"], 0, kv["head_dim"]), np.float32)
        names = [i.name for i in self.decoder.get_inputs()]
        self._past_names = names[3:]
        self._out_names = [o.name for o in self.decoder.get_outputs()]

    # ---------------------------------------------------------------- Model protocol
    def prepare(self, prompt: str, image: Image.Image | None = None) -> Prepared:
        if image is None:
            return Prepared(self.tokenizer.encode(prompt, add_special_tokens=self.family.vision))
        ids, inputs = self.module.prepare_inputs(prompt, image, self.entry["preprocess"], self.tokenizer)
        return Prepared(ids, inputs)

    def encode(self, prepared: Prepared) -> None:
        if not prepared.image_inputs:
            return
        out = self.vision.run(None, {"pixel_values": prepared.image_inputs["pixel_values"]})[0]
        prepared.image_features = self.module.image_features(out, prepared.image_inputs, self.entry["preprocess"],
                                                             self.arrays)

    def prefill(self, prepared: Prepared) -> OrtDecodeState:
        ids = np.array([prepared.input_ids], dtype=np.int64)
        x = ids
        if self.embeds:
            x = self.embed(ids)
            if prepared.image_features is not None:
                slots = ids[0] == self.entry["preprocess"]["image_token_id"]
                if int(slots.sum()) != len(prepared.image_features):
                    raise ModelError(f"{int(slots.sum())} image tokens but {len(prepared.image_features)} features")
                x[0, slots] = prepared.image_features
        past = [self._empty_past] * len(self._past_names)
        logits, past = self.run_decoder(x, past, len(prepared.input_ids))
        return OrtDecodeState(self, past, logits, len(prepared.input_ids))

    # ---------------------------------------------------------------- graphs
    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.embedder.run(None, {"input_ids": ids})[0]

    def run_decoder(self, x: np.ndarray, past: list, total: int) -> tuple[np.ndarray, list]:
        """Feed x (ids or embeddings) after `past`; return last-position logits and the new cache."""
        seq = x.shape[1]
        binding = self.decoder.io_binding()
        binding.bind_cpu_input(self.decoder.get_inputs()[0].name, x)
        binding.bind_cpu_input("attention_mask", np.ones((1, total), np.int64))
        binding.bind_cpu_input("position_ids", np.arange(total - seq, total, dtype=np.int64)[None])
        for name, value in zip(self._past_names, past, strict=True):
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        for name in self._out_names:
            binding.bind_output(name, "cpu")
        self.decoder.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy()[0, -1], outputs[1:]
