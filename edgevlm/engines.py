"""TensorRT engine planning for a TensorRT-flavour bundle: what `edgevlm build` asks the builder for, and what
a JetPack user would type instead. Pure logic: nothing here imports tensorrt (edgevlm.engine_build does).

- Optimization profiles: min / opt / max of every dynamic axis of every graph, from the bundle's memory plan
  for its target (edgevlm.memory): the context the plan gives each model bounds the sequence axes; the
  vision tower runs at most VISION_BATCH crops at once (as the ONNX Runtime backend does). Decoders get two
  profiles, as prefill and decode shapes differ by orders of magnitude: `prefill` (a chunk of up to
  PREFILL_CHUNK positions after any cached ones) and `decode` (one position after 1 .. context - 1).
- Builder memory: the builder holds the graph's weights twice (the parsed network and the engine being
  built) beside its tactic workspace, on a Jetson all in the memory the OS and CUDA share. The workspace is
  what the target's budget leaves after that, capped (tactics that want more are rarely the fastest on
  Orin's memory bandwidth) and refused below a floor with a line saying what would fit.
- The timing cache lives outside the bundle, one per TensorRT version and GPU, so rebuilding is fast.
- The compatibility record: engines are built for one TensorRT version and one GPU (name, compute
  capability); any other is refused with one line saying to rebuild.
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

from edgevlm import memory
from edgevlm.bundle import Bundle, graph_bytes
from edgevlm.errors import EdgeVLMError, UsageError
from edgevlm.manifest import ATTENTION_MASK, PAST, PIXEL_VALUES, Graph

PREFILL_CHUNK = 512  # positions per prefill run (OrtModel.prefill_chunk): the prefill profile's largest
WORKSPACE_CAP = 2 << 30  # tactic workspace at most 2 GiB
WORKSPACE_FLOOR = 256 << 20  # below this the builder falls back to slow tactics or fails mid-build
ENGINE_DIR = "engines"


class EngineError(EdgeVLMError):
    """Engines that cannot be built here, or were built for another GPU or TensorRT version."""


@dataclass(frozen=True)
class Profile:
    """One optimization profile: input name -> (min, opt, max) shapes."""

    name: str
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


@dataclass(frozen=True)
class EnginePlan:
    role: str
    graph: str  # vision, embed, decoder
    onnx: str  # bundle-relative path of the graph
    engine: str  # bundle-relative path of the engine to write
    profiles: tuple[Profile, ...]
    fp16: bool  # let TensorRT run fp16 kernels (every precision but fp32)
    workspace_bytes: int


def _axis_ranges(graph: str, context: int, max_crops: int) -> list[dict[str, tuple[int, int, int]]]:
    """Per profile, (min, opt, max) of each named dynamic axis of a graph."""
    if graph == "vision":
        crops = max(1, min(memory.VISION_BATCH, max_crops))
        return [{"crops": (1, crops, crops)}]
    if graph == "embed":  # the whole prompt at once (OrtModel.embed)
        return [{"batch": (1, 1, 1), "sequence": (1, min(PREFILL_CHUNK, context), context)}]
    chunk = min(PREFILL_CHUNK, context)
    prefill = {"batch": (1, 1, 1), "sequence": (1, chunk, chunk), "past_sequence": (0, 0, context - 1),
               "total_sequence": (1, chunk, context)}
    half = max(1, context // 2)
    decode = {"batch": (1, 1, 1), "sequence": (1, 1, 1), "past_sequence": (1, half, context - 1),
              "total_sequence": (2, half + 1, context)}
    return [prefill, decode]


def axis_names(name: str) -> dict[int, str]:
    """The dynamic axes of a graph input by position (the exporter's layout, edgevlm.export.graphs; the graph
    files name them after the tracer's symbols)."""
    if name == PIXEL_VALUES:
        return {0: "crops"}
    if name == ATTENTION_MASK:
        return {0: "batch", 1: "total_sequence"}
    if name.startswith(PAST):
        return {0: "batch", 2: "past_sequence"}
    return {0: "batch", 1: "sequence"}  # input_ids, inputs_embeds, position_ids


def profiles(g: Graph, graph: str, context: int, max_crops: int = 1) -> tuple[Profile, ...]:
    """The optimization profiles of one graph of a bundle: its inputs' manifest shapes with every dynamic
    axis given its range."""
    names = ("prefill", "decode") if graph == "decoder" else ("default",)
    out = []
    for name, ranges in zip(names, _axis_ranges(graph, context, max_crops), strict=True):
        shapes = {}
        for tensor in g.inputs:
            axes = axis_names(tensor.name)
            dims = []
            for i, d in enumerate(tensor.shape):
                if isinstance(d, int):
                    dims.append((d, d, d))
                elif axes.get(i) in ranges:
                    dims.append(ranges[axes[i]])
                else:
                    raise EngineError(f"{graph} input {tensor.name}: no range planned for its axis {i} ({d!r})")
            shapes[tensor.name] = tuple(tuple(r[k] for r in dims) for k in range(3))
        out.append(Profile(name, shapes))
    return tuple(out)


def workspace_bytes(budget: int | None, weights: int, graph: str = "graph") -> int:
    """The builder's tactic workspace for a graph of `weights` bytes within `budget` (None: the cap)."""
    if budget is None:
        return WORKSPACE_CAP
    room = budget - 2 * weights - memory.RUNTIME_BYTES
    if room < WORKSPACE_FLOOR:
        need = 2 * weights + memory.RUNTIME_BYTES + WORKSPACE_FLOOR
        raise EngineError(f"building the {graph} engine needs about {memory.gb(need, up=True)} (its weights twice, "
                          f"the runtime and a {WORKSPACE_FLOOR >> 20} MiB workspace); the budget is "
                          f"{memory.gb(budget)}: export it int4 or int8, or pass a larger --memory-budget")
    return min(WORKSPACE_CAP, room) // (1 << 20) * (1 << 20)  # whole MiB, as trtexec takes it


def plan(bundle: Bundle, budget: int | None = None, *, source: str = "--memory-budget",
         default_budget: bool = True) -> list[EnginePlan]:
    """One engine per graph of a TensorRT-flavour bundle, shaped by its memory plan within `budget` (None: the
    bundle's target's budget, else the memory available here; with `default_budget` False, no budget: each
    model's whole context and the largest workspace)."""
    if bundle.manifest.flavour != "tensorrt":
        raise UsageError(f"{bundle.path} holds ONNX Runtime graphs (contrib operators TensorRT cannot parse); "
                         "export it again with --format tensorrt")
    if budget is None and default_budget:
        budget, source = memory.default_budget(bundle.target)
    contexts = memory.plan(bundle, budget, source=source).max_context
    plans = []
    for role in sorted(set(bundle.stages.values())):
        spec = bundle.models[role]
        crops = memory.model_dims(spec).vision.max_crops if spec.vision else 1
        for name, g in spec.graphs.items():
            weights = graph_bytes(bundle.path / g.file)
            plans.append(EnginePlan(
                role, name, g.file, f"{ENGINE_DIR}/{role}.{name}.plan", profiles(g, name, contexts[role], crops),
                fp16=g.quant != "fp32", workspace_bytes=workspace_bytes(budget, weights, f"{role} {name}")))
    return plans


def _shape_arg(shapes: dict, which: int) -> str:
    return ",".join(f"{name}:{'x'.join(map(str, s[which]))}" for name, s in shapes.items())


def trtexec_command(p: EnginePlan, timing_cache: str = "timing.cache") -> str:
    """The trtexec line that builds what `edgevlm build` builds for `p` (run from the bundle's folder). Each
    --minShapes/--optShapes/--maxShapes group is one optimization profile."""
    args = ["trtexec", f"--onnx={p.onnx}", f"--saveEngine={p.engine}"]
    for prof in p.profiles:
        args += [f"--minShapes={_shape_arg(prof.shapes, 0)}", f"--optShapes={_shape_arg(prof.shapes, 1)}",
                 f"--maxShapes={_shape_arg(prof.shapes, 2)}"]
    if p.fp16:
        args.append("--fp16")
    args += [f"--memPoolSize=workspace:{p.workspace_bytes >> 20}M", f"--timingCacheFile={timing_cache}",
             "--skipInference"]
    return " ".join(shlex.quote(a) for a in args)


def trtexec_script(plans: list[EnginePlan], target: str | None) -> str:
    """A shell script of trtexec lines, one engine each, for JetPack users who build by hand."""
    lines = ["#!/bin/sh", f"# TensorRT engines for this bundle (target {target or 'unspecified'}), as `edgevlm build` "
             "builds them.", "# Run from the bundle's folder on the device that will run them; JetPack puts trtexec "
             "in /usr/src/tensorrt/bin.", "set -e", f"mkdir -p {ENGINE_DIR}"]
    lines += [trtexec_command(p) for p in plans]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- compatibility
@dataclass(frozen=True)
class Compatibility:
    """What an engine is bound to: the TensorRT version that built it and the GPU it was built on."""

    tensorrt: str
    gpu: str
    compute_capability: str  # "8.7" (Orin), "9.0" (H100/H200) ...

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Compatibility:
        return cls(str(d["tensorrt"]), str(d["gpu"]), str(d["compute_capability"]))

    def describe(self) -> str:
        return f"TensorRT {self.tensorrt} on {self.gpu} (compute capability {self.compute_capability})"


def compatibility_problem(built: Compatibility, here: Compatibility, bundle: str | Path = "the bundle") -> str | None:
    """The one line refusing engines built for another TensorRT version or GPU; None when they match.
    TensorRT engines are not portable across versions or GPU models (without hardware/version-compatible
    builds, which cost speed), so any difference is refused."""
    if built == here:
        return None
    return (f"the engines in {bundle} were built with {built.describe()}, but this is {here.describe()}: "
            f"rebuild them here with `edgevlm build {bundle}`")


def timing_cache_path(here: Compatibility, root: str | Path | None = None) -> Path:
    """Where the builder's timing cache for this TensorRT version and GPU lives (outside any bundle)."""
    base = Path(root) if root is not None else Path.home() / ".cache" / "edgevlm" / "tensorrt"
    gpu = "".join(c if c.isalnum() else "-" for c in here.gpu).strip("-").lower()
    return base / f"trt{here.tensorrt}-{gpu}-sm{here.compute_capability.replace('.', '')}.timing"
