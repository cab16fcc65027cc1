"""GGUF import: llama.cpp weights (any quantization transformers can read) as a normal HF checkpoint.

transformers dequantizes a GGUF file into a torch model; edgevlm saves that once as a model directory
(config, safetensors, tokenizer with its chat template, generation config) in its cache, so the
reference backend and `edgevlm export` treat it like any other checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

from edgevlm.bundle import atomic_directory
from edgevlm.errors import ModelError, first_line


def _key(path: Path) -> str:
    """Cache key: the name and the file's present version (hub.source_key: a file rewritten in place is
    imported again; a hash of its first and last MiB missed a change in between)."""
    from edgevlm.hub import source_key

    return f"{path.stem}-{source_key(path)}"


def convert(gguf: Path, out: Path, log=lambda m: print(m, file=sys.stderr, flush=True)) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"importing {gguf.name} (GGUF, dequantized to float32; first use only)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        first = first_line(e)
        raise ModelError(f"cannot read {gguf}: {first}") from None
    # transformers marks the model as GGUF-quantized and refuses to save it; its weights are plain floats now
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(out, overwrite=True) as tmp:  # replaces only a directory edgevlm wrote
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def converted(gguf: Path, cache: Path) -> Path:
    """The cached HF checkpoint of a GGUF file, made on first use."""
    out = cache / _key(gguf)
    return out if (out / "config.json").exists() else convert(gguf, out)
