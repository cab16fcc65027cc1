"""The bundle manifest (manifest.json): its types, the graph input/output names, and what a sound one is
(bundle.schema.json, shipped with the package, and the rules a schema cannot state).

The exporter writes a manifest through these types and the runtime, memory planner, bench and CLI read it
through them: `Manifest.from_dict` checks the whole manifest first, so a consumer never guards a read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from functools import cache
from pathlib import Path

from edgevlm.schema import first_error, json_path

SCHEMA_FILE = Path(__file__).with_name("bundle.schema.json")
FORMAT = "edgevlm-bundle"
FORMAT_VERSION = 2  # 2: fused decoders take their lengths from the position ids, not an attention_mask
# What the graphs are written for: ONNX Runtime (its contrib operators: fused attention, MatMulNBits), or
# TensorRT's ONNX parser (standard operators only, weights as DequantizeLinear; they also run under ONNX Runtime).
FLAVOURS = ("onnxruntime", "tensorrt")


@cache
def schema() -> dict:
    """bundle.schema.json with every family's part: its name, the graphs its bundles hold, its preprocessing
    and arrays (from the family modules, so that adding a family edits no schema)."""
    from edgevlm.families import registry

    full = json.loads(SCHEMA_FILE.read_text())
    defs, families = full["$defs"], registry()
    defs["family"]["enum"] = sorted(families)
    defs["vision_family"]["enum"] = sorted(n for n, m in families.items() if m.FAMILY.vision)
    defs["text_family"]["enum"] = sorted(n for n, m in families.items() if not m.FAMILY.vision)
    rules = []
    for name, module in sorted(families.items()):
        then: dict = {"properties": {"graphs": {"required": list(module.GRAPHS)}}}
        if module.PREPROCESS_SCHEMA is not None:
            defs[f"preprocess_{name}"] = module.PREPROCESS_SCHEMA
            then["required"] = ["preprocess"]
            then["properties"]["preprocess"] = {"$ref": f"#/$defs/preprocess_{name}"}
        if module.ARRAYS:
            then["required"] = [*then.get("required", []), "arrays"]
            then["properties"]["arrays"] = {"required": list(module.ARRAYS)}
        rules.append({"if": {"required": ["family"], "properties": {"family": {"const": name}}}, "then": then})
    defs["model"]["allOf"] = rules
    return full


def is_relpath(value) -> bool:
    """Whether `value` is a path a manifest may name: relative, '/'-separated, no '.' or '..' parts."""
    return isinstance(value, str) and _relpath().search(value) is not None


@cache
def _relpath() -> re.Pattern:
    return re.compile(schema()["$defs"]["relpath"]["pattern"])


def problem(manifest) -> str | None:
    """The first way `manifest` is malformed, naming the field and what was expected
    (`models.extractor.kv.head_dim: expected an integer > 0, got 0`); None when it is sound."""
    found = first_error(manifest, schema())
    if found:
        return found
    for stage, role in manifest["stages"].items():
        if role not in manifest["models"]:
            return f"stages.{stage}: names the model {json.dumps(role)}, which the manifest's models do not have"
    return None


def named_paths(manifest: dict) -> Iterator[tuple[str, str, str]]:
    """(field, path, kind) for every bundle path a (sound) manifest's models name; kind is what
    edgevlm.bundle checks it as: "graph", "file" or "folder"."""
    for role, entry in manifest["models"].items():
        for name, graph in entry["graphs"].items():
            yield json_path(("models", role, "graphs", name, "file")), graph["file"], "graph"
        yield json_path(("models", role, "tokenizer")), entry["tokenizer"], "folder"
        for name, rel in entry.get("arrays", {}).items():
            yield json_path(("models", role, "arrays", name)), rel, "file"


# ---------------------------------------------------------------- graph I/O names
# Every graph of a bundle binds by these; the exporter names its inputs and outputs with them.
INPUT_IDS, INPUTS_EMBEDS, ATTENTION_MASK, POSITION_IDS, LOGITS = (
    "input_ids", "inputs_embeds", "attention_mask", "position_ids", "logits")
PIXEL_VALUES, IMAGE_FEATURES = "pixel_values", "image_features"  # vision graphs: crops -> features
PAST, PRESENT = "past.", "present."  # decoder KV inputs past.{layer}.key|value, outputs present.{layer}.key|value


def past_name(layer: int, kind: str) -> str:
    return f"{PAST}{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"{PRESENT}{layer}.{kind}"


# ---------------------------------------------------------------- the manifest as types
# Each type mirrors one object of bundle.schema.json: `from_dict` takes what the schema accepted (Manifest
# .from_dict checks it first), `to_dict` writes it back, leaving out what is absent.


def _present(**fields) -> dict:
    return {k: v for k, v in fields.items() if v is not None}


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    shape: tuple[int | str, ...]  # a str is a dynamic axis

    @classmethod
    def from_dict(cls, d: dict) -> Tensor:
        return cls(d["name"], d["dtype"], tuple(d["shape"]))

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Graph:
    file: str
    quant: str  # fp32, fp16, int8 or int4
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    lookup_bytes: int = 0  # initializer bytes only a Gather reads (a token embedding): a decode step reads a row

    @classmethod
    def from_dict(cls, d: dict) -> Graph:
        return cls(d["file"], d["quant"], tuple(map(Tensor.from_dict, d["inputs"])),
                   tuple(map(Tensor.from_dict, d["outputs"])), d.get("lookup_bytes", 0))

    def to_dict(self) -> dict:
        return {"file": self.file, "quant": self.quant, "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs], "lookup_bytes": self.lookup_bytes}


@dataclass(frozen=True)
class KV:
    """The decoder's cache: [batch, kv_heads, sequence, head_dim] float32 per layer, key and value."""

    layers: int
    kv_heads: int
    head_dim: int
    max_sequence: int
    shared: bool = False  # one buffer per tensor, updated in place by the graph (fused decoders)

    @classmethod
    def from_dict(cls, d: dict) -> KV:
        return cls(d["layers"], d["kv_heads"], d["head_dim"], d["max_sequence"], d.get("shared", False))

    def to_dict(self) -> dict:
        return {"layers": self.layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "max_sequence": self.max_sequence, "dtype": "float32", "layout": "batch,kv_heads,sequence,head_dim",
                "shared": self.shared}

    def bytes_per_position(self) -> int:
        """Key and value of every layer for one position."""
        return 2 * self.layers * self.kv_heads * self.head_dim * 4


@dataclass(frozen=True)
class VisionDims:
    hidden: int
    heads: int
    intermediate: int
    tokens: int  # per crop
    max_crops: int
    feature: int  # per token, after the projector
    layers: int | None = None  # the tower's (bundles before 2026-12 lack it: no vision compute roofline)

    @classmethod
    def from_dict(cls, d: dict) -> VisionDims:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def to_dict(self) -> dict:
        return _present(**asdict(self))


@dataclass(frozen=True)
class Dims:
    """The sizes the memory planner estimates activations from."""

    hidden: int
    heads: int
    intermediate: int
    vocab: int
    vision: VisionDims | None = None

    @classmethod
    def from_dict(cls, d: dict) -> Dims:
        vision = VisionDims.from_dict(d["vision"]) if "vision" in d else None
        return cls(d["hidden"], d["heads"], d["intermediate"], d["vocab"], vision)

    def to_dict(self) -> dict:
        return _present(hidden=self.hidden, heads=self.heads, intermediate=self.intermediate, vocab=self.vocab,
                        vision=self.vision.to_dict() if self.vision else None)


@dataclass(frozen=True)
class ModelSpec:
    """One model of a bundle (the extractor or the reasoner)."""

    family: str
    graphs: Mapping[str, Graph]  # decoder; vision and embed for VLMs
    kv: KV
    max_context: int
    tokenizer: str  # the folder of the tokenizer files
    dims: Dims | None = None
    preprocess: Mapping | None = None  # the family's image preprocessing (its module reads it)
    arrays: Mapping[str, str] = field(default_factory=dict)  # numpy arrays the family needs, by name
    source: Mapping | None = None  # {"model": hub id or directory, "revision": ...}

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        return cls(d["family"], {k: Graph.from_dict(g) for k, g in d["graphs"].items()}, KV.from_dict(d["kv"]),
                   d["max_context"], d["tokenizer"], Dims.from_dict(d["dims"]) if "dims" in d else None,
                   d.get("preprocess"), dict(d.get("arrays", {})), d.get("source"))

    def to_dict(self) -> dict:
        return _present(family=self.family, graphs={k: g.to_dict() for k, g in self.graphs.items()},
                        kv=self.kv.to_dict(), max_context=self.max_context,
                        dims=self.dims.to_dict() if self.dims else None, tokenizer=self.tokenizer,
                        preprocess=dict(self.preprocess) if self.preprocess is not None else None,
                        arrays=dict(self.arrays) or None, source=dict(self.source) if self.source else None)

    @property
    def image_token_id(self) -> int | None:
        return self.preprocess["image_token_id"] if self.preprocess else None

    @property
    def vision(self) -> bool:
        return "vision" in self.graphs

    @property
    def name(self) -> str | None:
        """The model it was exported from (hub id or directory), where recorded."""
        return (self.source or {}).get("model")


@dataclass(frozen=True)
class Manifest:
    """manifest.json. `files` is None only for a bundle being written (edgevlm.export), whose file table
    does not exist yet; the informational objects (quantization, provenance, fidelity) stay plain dicts."""

    stages: Mapping[str, str]  # plan/extract/think/direct -> role
    models: Mapping[str, ModelSpec]  # extractor, reasoner
    files: Mapping[str, dict] | None = None  # path -> {"sha256", "bytes"}
    created: str | None = None
    target: str | None = None
    quantization: Mapping | None = None
    provenance: Mapping | None = None
    fidelity: Mapping | None = None  # per stage: top1_agreement, mean_kl, exact_match, ...
    flavour: str = "onnxruntime"  # one of FLAVOURS; absent from manifests written before it existed

    @classmethod
    def from_dict(cls, d) -> Manifest:
        """The manifest `d`, once it is sound (else a ValueError saying the first way it is not)."""
        found = problem(d)
        if found:
            raise ValueError(found)
        return cls(dict(d["stages"]), {role: ModelSpec.from_dict(m) for role, m in d["models"].items()},
                   d["files"], d.get("created"), d.get("target"), d.get("quantization"), d.get("provenance"),
                   d.get("fidelity"), d.get("flavour", "onnxruntime"))

    def to_dict(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION,
                **_present(created=self.created, target=self.target, flavour=self.flavour, stages=dict(self.stages),
                           models={role: m.to_dict() for role, m in self.models.items()},
                           quantization=self.quantization, provenance=self.provenance, fidelity=self.fidelity,
                           files=self.files)}
