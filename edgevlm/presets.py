"""Named model pairs. `paper-*` are the paper's Extract->Think systems (PAPER.md)."""

from __future__ import annotations

from dataclasses import dataclass

from edgevlm.errors import UsageError


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
    )
}
DEFAULT_PRESET = "paper-0.6b"


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UsageError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
