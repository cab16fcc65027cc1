"""Memory planning: what a bundle needs on ONNX Runtime before it is loaded, and the longest context that
fits a memory budget.

    edgevlm run photo.jpg "..." --bundle B --memory-budget 6GB

Resident for the whole process: every graph's weights, the vision-feature and prefix caches at their
byte budgets, and the runtime itself (Python, ONNX Runtime, tokenizers). While one stage runs: its KV
cache (fp32, for the whole context: one buffer updated in place for fused decoders, two used in turn for
traced ones), its prefill activations (one chunk of
positions against the whole context: attention scores, MLP, the prompt's embeddings) and, for the
extractor, the vision tower on one batch of crops and the image features it keeps. The plan is the
peak over stages; the context is the largest (at most the model's own) whose peak fits.

Without a budget the target's (a Jetson's RAM less what the OS and CUDA keep) or, for a plain CPU or GPU
host, the memory available when the bundle loads is used, so the defaults never plan past the machine.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

from edgevlm.bundle import Bundle, graph_bytes
from edgevlm.errors import UsageError
from edgevlm.families import family_module
from edgevlm.images import MAX_PIXELS
from edgevlm.manifest import Dims, ModelSpec, VisionDims

RUNTIME_BYTES = 150_000_000  # Python + onnxruntime + tokenizers imported, sessions' arenas
# Decoding the largest frame load_image accepts: 8192x8192 raised peak RSS by 325-331 MB (edgevlm.images).
FRAME_BYTES = 5 * MAX_PIXELS
MIN_CONTEXT = 1024  # text room a plan must leave (a question, an instruction, an answer), besides an image
VISION_BATCH = 4  # crops per vision-tower run (OrtModel.encode): bounds the tower's attention memory
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


class MemoryBudgetError(UsageError):
    """The bundle cannot run within the memory budget."""


def parse_size(text: str | int | float) -> int:
    """'6GB', '6.5G', '512MiB', 1e9 -> bytes; a one-line UsageError for anything else."""
    if isinstance(text, bool):
        raise UsageError(f"cannot read {text!r} as a memory size; write it like 6GB, 512MB or 1.5GiB")
    if isinstance(text, int | float):
        if not math.isfinite(text):
            raise UsageError(f"a memory budget must be a finite size; got {text!r}")
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not match or match.group(2).lower() not in _UNITS:
            raise UsageError(f"cannot read {text!r} as a memory size; write it like 6GB, 512MB or 1.5GiB")
        value, unit = float(match.group(1)), match.group(2).lower()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise UsageError(f"a memory budget must be more than 0 bytes; got {text!r}")
    return size


def gb(n: float, up: bool = False) -> str:
    """Bytes as GB with two decimals (`up`: rounded up, for a figure that must be enough)."""
    return f"{(-(-int(n) // 10_000_000) * 10_000_000 if up else n) / 1e9:.2f} GB"


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def model_dims(spec: ModelSpec) -> Dims:
    """The manifest's `dims`, or a conservative estimate from the graphs' shapes and the KV layout."""
    if spec.dims is not None:
        return spec.dims

    def last_dim(graph: str, default: int) -> int:
        value = spec.graphs[graph].outputs[0].shape[-1] if graph in spec.graphs else default
        return value if isinstance(value, int) else default

    heads = 2 * spec.kv.kv_heads
    hidden = last_dim("embed", default=heads * spec.kv.head_dim)
    vision = None
    if spec.vision:
        shape = spec.graphs["vision"].outputs[0].shape
        tokens = shape[1] if isinstance(shape[1], int) else 1024
        feature = shape[-1] if isinstance(shape[-1], int) else hidden
        vision = VisionDims(hidden=feature, heads=16, intermediate=4 * feature, tokens=tokens,
                            max_crops=family_module(spec.family).max_crops(spec.preprocess), feature=feature)
    return Dims(hidden, heads, 4 * hidden, last_dim("decoder", default=152_000), vision)


def prefill_flops(spec: ModelSpec, positions: int, past: int = 0) -> float | None:
    """FLOPs (2 per multiply-add) of a prefill of `positions` after `past` cached ones: on every position the
    attention projections (grouped KV) and the MLP (gate, up, down), attention scores and values against the
    causal context, and the LM head on the last position only (the graphs return its logits alone). Norms,
    rotary and softmax are left out: the count is a floor. None without the manifest's sizes."""
    if spec.dims is None or positions <= 0:
        return None
    d, kv = spec.dims, spec.kv
    q, k = d.heads * kv.head_dim, kv.kv_heads * kv.head_dim
    per_position = d.hidden * (2 * q + 2 * k) + 3 * d.hidden * d.intermediate
    context = positions * past + positions * (positions + 1) / 2
    return 2.0 * kv.layers * per_position * positions + 4.0 * kv.layers * q * context + 2.0 * d.hidden * d.vocab


def vision_flops(spec: ModelSpec, crops: int) -> float | None:
    """FLOPs of the vision tower on `crops` crops: per layer the attention projections and the two-matrix MLP on
    every token, and full (not causal) attention among a crop's tokens. The patch embedding and the projector
    are left out: a floor. None without the manifest's vision sizes (bundles before its `layers`)."""
    v = spec.dims.vision if spec.dims is not None else None
    if v is None or v.layers is None or crops <= 0:
        return None
    per_token = 4 * v.hidden * v.hidden + 2 * v.hidden * v.intermediate
    return float(crops * v.layers * (2 * v.tokens * per_token + 4 * v.tokens * v.tokens * v.hidden))


def compute_precision(quant: str) -> str:
    """The GEMM precision a graph of `quant` computes in on ONNX Runtime's CPU kernels: int8 and int4 weights
    with int8 activations (MatMulNBits, accuracy level 4), else fp32."""
    return "int8" if quant in ("int8", "int4") else "fp32"


def _tokens_per_crop(spec: ModelSpec) -> int:
    per_crop = spec.graphs["vision"].outputs[0].shape[1]
    return per_crop if isinstance(per_crop, int) else 1024


def image_tokens(spec: ModelSpec) -> int:
    """The most prompt positions one image can take (0 for a text-only model)."""
    if not spec.vision:
        return 0
    return family_module(spec.family).max_image_tokens(spec.preprocess, _tokens_per_crop(spec))


def check_image_budget(max_tokens) -> None:
    """A visual-token budget is None or a whole number, 1 or more (UsageError)."""
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise UsageError(f"max_image_tokens must be a whole number, 1 or more; got {max_tokens!r}")


def with_image_budget(spec: ModelSpec, max_tokens: int | None) -> ModelSpec:
    """`spec` with its images cut to at most `max_tokens` prompt positions each (a smaller AnyRes grid, a shorter
    resized edge: the family's `within`), its planned crops to match; unchanged for None or a text model."""
    check_image_budget(max_tokens)
    if max_tokens is None or not spec.vision:
        return spec
    module = family_module(spec.family)
    cfg = module.within(spec.preprocess, max_tokens, _tokens_per_crop(spec))
    dims = spec.dims
    if dims is not None and dims.vision is not None:
        dims = replace(dims, vision=replace(dims.vision, max_crops=module.max_crops(cfg)))
    return replace(spec, preprocess=cfg, dims=dims)


@dataclass
class ModelCost:
    role: str
    weights: int
    kv_per_token: int  # every KV buffer (one set, or two used in turn)
    dims: Dims
    embeds: bool  # the prompt goes in as embeddings (VLM decoders)
    max_context: int
    min_context: int  # MIN_CONTEXT plus the largest image's positions

    def stage_bytes(self, context: int, prefill_chunk: int) -> int:
        """KV + prefill activations at `context`, and for a VLM the vision tower and its features."""
        d, chunk = self.dims, min(prefill_chunk, context)
        kv = self.kv_per_token * context
        attention = 2 * d.heads * chunk * context * 4  # scores and their softmax
        body = chunk * (6 * d.hidden + 3 * d.intermediate) * 4 + 2 * d.vocab * 4
        prompt = context * d.hidden * 4 * (2 if self.embeds else 0)  # embeddings of the whole prompt (+ a copy)
        decode = kv + attention + body + prompt
        if not d.vision:
            return decode
        features, tower = self.vision_bytes()
        return features + max(tower, decode)

    def vision_bytes(self) -> tuple[int, int]:
        """(the image features kept, the vision tower's activations on one batch of crops); 0s without one."""
        v = self.dims.vision
        if not v:
            return 0, 0
        crops, batch, tokens = v.max_crops, min(VISION_BATCH, v.max_crops), v.tokens
        features = crops * tokens * v.feature * 4
        return features, batch * tokens * (6 * v.hidden + 2 * v.intermediate + 2 * v.heads * tokens) * 4


@dataclass
class MemoryPlan:
    budget: int | None
    source: str  # where the budget came from: "--memory-budget", a target's name, "available memory", "none"
    resident: dict[str, int]  # weights per model, caches, runtime
    max_context: dict[str, int]  # per role
    stage_peak: dict[str, int] = field(default_factory=dict)  # per role, at its planned context
    overlap: bool = False  # the planner and the vision tower may run at once (both fit beside each other)
    pipelining: bool = False  # two runs may be in flight: one model's stage beside the other's (both fit)

    @property
    def peak(self) -> int:
        return sum(self.resident.values()) + max(self.stage_peak.values(), default=0)

    def describe(self) -> str:
        budget = "no budget" if self.budget is None else f"budget {gb(self.budget)} ({self.source})"
        lines = [f"memory plan, {budget}: estimated peak {gb(self.peak)}"]
        lines.append("  resident: " + ", ".join(f"{k} {gb(v)}" for k, v in self.resident.items() if v))
        for role, context in self.max_context.items():
            lines.append(f"  {role}: context {context} tokens; KV, activations and vision at it "
                         f"{gb(self.stage_peak[role])}")
        lines.append(f"  planner beside the vision tower: {'fits' if self.overlap else 'does not fit (run in turn)'}")
        if len(self.stage_peak) > 1:
            lines.append("  one frame's extract beside another's think: "
                         + ("fits" if self.pipelining else "does not fit (run in turn)"))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"budget_mb": None if self.budget is None else round(self.budget / 1e6, 1), "source": self.source,
                "estimate_mb": round(self.peak / 1e6, 1), "max_context": dict(self.max_context),
                "resident_mb": {k: round(v / 1e6, 1) for k, v in self.resident.items()},
                "stage_mb": {k: round(v / 1e6, 1) for k, v in self.stage_peak.items()}, "overlap": self.overlap,
                "pipelining": self.pipelining}


def costs(bundle: Bundle) -> list[ModelCost]:
    out = []
    for role in sorted(set(bundle.stages.values())):
        spec = bundle.models[role]
        weights = sum(graph_bytes(bundle.file(g.file)) for g in spec.graphs.values())
        buffers = 1 if spec.kv.shared else 2  # one buffer updated in place, or two used in turn
        out.append(ModelCost(role, weights, buffers * spec.kv.bytes_per_position(), model_dims(spec),
                             "embed" in spec.graphs, spec.max_context,
                             min(spec.max_context, MIN_CONTEXT + image_tokens(spec))))
    return out


def plan(bundle: Bundle, budget: int | None = None, *, source: str = "--memory-budget", vision_cache_mb: float = 0,
         prefix_cache_mb: float = 0, prefill_chunk: int = 512) -> MemoryPlan:
    """The context each model gets within `budget` bytes (None: each model's own maximum).

    Raises MemoryBudgetError, naming the smallest budget that would do, when not even MIN_CONTEXT fits."""
    models = costs(bundle)
    resident = {f"{m.role} weights": m.weights for m in models}
    resident["vision cache"] = int(vision_cache_mb * 1e6)
    resident["prefix caches"] = int(prefix_cache_mb * 1e6) * len(models)
    resident["runtime"] = RUNTIME_BYTES
    resident["largest frame"] = FRAME_BYTES
    fixed = sum(resident.values())
    contexts, peaks = {}, {}
    for m in models:
        if budget is None:
            best = m.max_context
        else:
            room = budget - fixed
            low = m.min_context
            if m.stage_bytes(low, prefill_chunk) > room:
                need = fixed + max(x.stage_bytes(x.min_context, prefill_chunk) for x in models)
                parts = ", ".join(f"{k} {gb(v)}" for k, v in resident.items() if v)
                raise MemoryBudgetError(
                    f"a {gb(budget)} memory budget cannot hold this bundle: {parts}, and {gb(need - fixed)} for the "
                    f"{m.role}'s {low}-token minimum context; it needs at least {gb(need, up=True)}")
            best, high = low, m.max_context  # largest context that fits: stage_bytes grows with the context
            while best < high:
                mid = (best + high + 1) // 2
                best, high = (mid, high) if m.stage_bytes(mid, prefill_chunk) <= room else (best, mid - 1)
        contexts[m.role] = best
        peaks[m.role] = m.stage_bytes(best, prefill_chunk)
    # Overlap (Pipeline): the planner decodes while the vision tower encodes the image, so both are held at
    # once; allowed when that fits too. A planner prompt (a question and the few-shot block) stays within
    # MIN_CONTEXT positions, and KV pages are resident only as they fill.
    planner = bundle.stages.get("plan")
    by_role = {m.role: m for m in models}
    both = fixed + (by_role[planner].stage_bytes(min(contexts[planner], MIN_CONTEXT), prefill_chunk)
                    + max(sum(m.vision_bytes()) for m in models) if planner else 0)
    overlap = planner is not None and (budget is None or both <= budget)
    # Pipelining (Pipeline): two runs in flight, each model in a stage of its own at its planned context, and
    # the later run's vision tower overlapped beside them.
    vision = max(sum(m.vision_bytes()) for m in models)
    pipelining = len(models) > 1 and (budget is None or fixed + sum(peaks.values()) + vision <= budget)
    return MemoryPlan(budget, source if budget is not None else "none", resident, contexts, peaks, overlap,
                      pipelining)


def budget_for(memory_budget: str | int | None, target: str | None) -> tuple[int | None, str]:
    """(bytes, source): a --memory-budget as given, else the default for the bundle's target."""
    if memory_budget is not None:
        return parse_size(memory_budget), "--memory-budget"
    return default_budget(target)


def default_budget(target: str | None) -> tuple[int | None, str]:
    """The budget a bundle gets with no --memory-budget: its target's, else the memory available now."""
    from edgevlm.targets import TARGETS

    t = TARGETS.get(target or "")
    if t is not None and t.budget_gb:
        return int(t.budget_gb * 1e9), t.name
    available = available_bytes()
    return (int(available * 0.9), "available memory") if available else (None, "none")
