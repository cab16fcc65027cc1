"""Named model pairs. `paper-*` are the paper's Extract->Think systems (PAPER.md)."""

from __future__ import annotations

from dataclasses import dataclass

from edgevlm import demo
from edgevlm.errors import ModelError, UsageError


@dataclass(frozen=True)
class Preset:
    name: str
    extractor: str
    reasoner: str
    description: str


PRESETS = {
    p.name: p
    for p in (
        Preset("paper-0.6b", "markendo/llava-extract-qwen3-0.6B", "Qwen/Qwen3-1.7B",
               "the paper's 0.6B extractor (LLaVA-OneVision + Qwen3-0.6B) with Qwen3-1.7B reasoning"),
        Preset("paper-1.7b", "markendo/llava-extract-qwen3-1.7B", "Qwen/Qwen3-4B",
               "the paper's 1.7B extractor (LLaVA-OneVision + Qwen3-1.7B) with Qwen3-4B reasoning"),
        Preset("demo", str(demo.EXTRACTOR), str(demo.REASONER),
               "small models trained here on procedural scenes (edgevlm.demo; offline)"),
    )
}
DEFAULT_PRESET = "paper-0.6b"


def get_preset(name: str) -> Preset:
    try:
        preset = PRESETS[name]
    except KeyError:
        raise UsageError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
    if name == "demo" and not demo.available():
        raise ModelError("the demo models are not in this checkout: build them with `python -m edgevlm.demo train` "
                         "(about 20 minutes on 2 cores; README.md, Demo models)")
    return preset
