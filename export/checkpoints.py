"""Checkpoints as transformers reads them: a model directory or hub id as found (edgevlm.hub.find), a GGUF
file imported (dequantized), a LoRA adapter merged into its base, and a LLaVA-NeXT checkpoint (the paper's
released extractors) converted to LLaVA-OneVision; each conversion once per version of its sources, cached
under edgevlm.hub.cache_dir().
"""

from __future__ import annotations

from pathlib import Path

from edgevlm.errors import ModelError
from edgevlm.hub import cache_dir, find


def resolve(model: str, gguf_file: str | None = None) -> Path:
    """A transformers checkpoint directory for `model` (a directory, a hub id, a .gguf file, or a directory
    holding `gguf_file`), or a one-line ModelError."""
    from edgevlm.export import adapter, gguf

    path = Path(model).expanduser()
    if gguf_file:
        path = (path if path.is_dir() else find(model)) / gguf_file
        if not path.is_file():
            raise ModelError(f"{path}: no such GGUF file")
    else:
        path = find(model)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return gguf.converted(path, cache_dir() / "gguf")
    if path.is_dir():
        return adapter.merged(path, cache_dir() / "merged") if adapter.is_adapter(path) else path
    raise ModelError(f"{model} is a file; a model is a directory (config.json, weights, tokenizer) or a .gguf file")


def resolve_extractor(model: str) -> Path:
    """Like `resolve`, converting an original LLaVA-NeXT checkpoint (the paper's) on first use."""
    from edgevlm.export import llava_next
    from edgevlm.families import read_config

    path = resolve(model)
    if read_config(path).get("model_type") != "llava_qwen3":
        return path
    return llava_next.converted(path, model, cache_dir() / "converted")
