"""One loader for `run`, `bench` and `eval`: a Source names the models (an exported bundle, or an HF pair) and
how they load; it is checked when made, so that a bad combination fails before an image or a model is read.

    source = Source(bundle="out/", memory_budget="6GB")
    pipe = source.load()
    scores = each([Source(bundle=a), Source(bundle=b)], lambda source, pipe: ...)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from edgevlm import bundle
from edgevlm.errors import UsageError
from edgevlm.memory import parse_size
from edgevlm.pipeline import PREFIX_CACHE_MB, VISION_CACHE_MB, Pipeline
from edgevlm.presets import DEFAULT_PRESET, get_preset
from edgevlm.profiler import reset_peak_rss

T = TypeVar("T")
QUANTS = ("int8", "nf4")  # bitsandbytes, PyTorch backend only: a bundle carries its own precision


@dataclass(frozen=True)
class Source:
    """Where a pipeline's models come from, and how they load: an exported `bundle` on ONNX Runtime (its memory
    plan fitted to `memory_budget`), or HF checkpoints on the PyTorch reference backend (`extractor` and
    `reasoner`, each else the `preset`'s; `quant`, `gguf_file` as Pipeline.from_pretrained takes them).
    The cache sizes are megabytes, 0 = off (the prefix cache is ONNX Runtime's only)."""

    bundle: str | None = None
    extractor: str | None = None
    reasoner: str | None = None
    preset: str | None = None
    quant: str | None = None
    gguf_file: str | None = None
    device: str = "cpu"
    memory_budget: str | int | None = None
    vision_cache_mb: float = VISION_CACHE_MB
    prefix_cache_mb: float = PREFIX_CACHE_MB
    pipelined: bool | None = None  # bundles: Pipeline's frame pipelining (None: its default)
    max_image_tokens: int | None = None  # bundles: a visual-token budget (Pipeline.from_bundle)
    backend: str | None = None  # bundles: "onnxruntime" keeps a TensorRT bundle off its engines (from_bundle)

    def __post_init__(self) -> None:
        pair = [f"--{name.replace('_', '-')}" for name in ("extractor", "reasoner", "preset", "quant", "gguf_file")
                if getattr(self, name)]
        if self.bundle and pair:
            raise UsageError(f"--bundle already fixes the models and their precision; drop {'/'.join(pair)}")
        if self.quant and self.quant not in QUANTS:
            raise UsageError(f"unknown --quant {self.quant!r}; choose int8 or nf4 (bundles carry their own precision)")
        if self.memory_budget is not None:
            parse_size(self.memory_budget)  # a malformed size fails before anything loads
            if not self.bundle:
                raise UsageError("--memory-budget plans an exported bundle's memory (--bundle); the PyTorch "
                                 "backend loads checkpoints as they are")
        if self.max_image_tokens is not None and not self.bundle:
            raise UsageError("--max-image-tokens cuts an exported bundle's images (--bundle); the PyTorch backend "
                             "preprocesses as the checkpoint's processor does")
        if self.backend is not None and not self.bundle:
            raise UsageError("--backend picks what runs an exported bundle (--bundle); HF checkpoints run on the "
                             "PyTorch backend")
        if self.preset:
            get_preset(self.preset)  # an unknown name is a usage error before anything loads

    def load(self, *, load_reasoner: bool = True) -> Pipeline:
        """The pipeline. `load_reasoner=False` skips an HF pair's reasoner (enough for mode direct); a bundle
        loads what it holds."""
        if self.bundle:
            return Pipeline.from_bundle(self.bundle, device=self.device, memory_budget=self.memory_budget,
                                        vision_cache_mb=self.vision_cache_mb, prefix_cache_mb=self.prefix_cache_mb,
                                        pipelined=self.pipelined, max_image_tokens=self.max_image_tokens,
                                        backend=self.backend)
        return Pipeline.from_pretrained(self.extractor, self.reasoner, preset=self.preset, device=self.device,
                                        load_reasoner=load_reasoner, quant=self.quant, gguf_file=self.gguf_file,
                                        vision_cache_mb=self.vision_cache_mb)

    @property
    def name(self) -> str:
        """What is being loaded, for a progress line."""
        return self.bundle or self.preset or "the HF pair"

    def label(self) -> str:
        """The system's name in tables and plots: a bundle's label (folder and precision), else "torch " and
        the preset's or the extractor's name."""
        if self.bundle:
            return bundle.load(self.bundle, verify=False).label
        if self.preset or not self.extractor:
            return "torch " + (self.preset or DEFAULT_PRESET)
        return "torch " + os.path.basename(str(self.extractor).rstrip("/"))


def sources(bundles: Sequence[str], **options) -> list[Source]:
    """The systems a command compares: each of `bundles`, or else the one HF pair; `options` as Source takes."""
    return [Source(bundle=b, **options) for b in bundles] or [Source(**options)]


def each(sources: Sequence[Source], work: Callable[[Source, Pipeline], T], *, load_reasoner: bool = True,
         progress: Callable[[str], None] = lambda m: None) -> list[T]:
    """`work(source, pipeline)` for each source in turn. Pipelines load one at a time, each let go before the
    next loads (two might not fit the memory), each peak RSS counted from its own load where the OS allows."""
    done = []
    for source in sources:
        progress(f"loading {source.name}")
        reset_peak_rss()
        pipe = source.load(load_reasoner=load_reasoner)
        done.append(work(source, pipe))
        del pipe
    return done
