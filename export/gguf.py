"""GGUF import: llama.cpp weights (any quantization transformers can read) as a normal HF checkpoint.

transformers dequantizes a GGUF file into a torch model; edgevlm saves that once as a model directory
(config, safetensors, tokenizer with its chat template, generation config) in its cache, so the
reference backend and `edgevlm export` treat it like any other checkpoint.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
from pathlib import Path

from edgevlm.errors import ModelError, first_line


def _key(path: Path) -> str:
    """Cache key: name, size and a hash of the file's first and last MiB (cheap on 100 MB-10 GB files)."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(size - (1 << 20), 0))
        digest.update(f.read(1 << 20))
    return f"{path.stem}-{size}-{digest.hexdigest()[:16]}"


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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def converted(gguf: Path, cache: Path) -> Path:
    """The cached HF checkpoint of a GGUF file, made on first use."""
    out = cache / _key(gguf)
    return out if (out / "config.json").exists() else convert(gguf, out)
