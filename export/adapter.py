"""LoRA adapters (peft): a directory with adapter_config.json and the adapter's weights, tuned on top of
the base model its config names (`edgevlm tune --lora R --adapter-only` writes one; so does peft).

An adapter is a few MB where its merged model is hundreds; edgevlm merges it into its base on first
use and caches the result as a normal checkpoint, so the reference backend and `edgevlm export` treat
it like any other model directory. The base is resolved like any model (a directory, a hub id, a
.gguf file); a relative path is taken relative to the adapter's directory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from edgevlm.errors import ModelError, first_line

CONFIG = "adapter_config.json"


def is_adapter(path: Path) -> bool:
    return (path / CONFIG).is_file() and not (path / "config.json").exists()


def base_of(adapter: Path) -> str:
    """The base model the adapter names, as written (a path relative to the adapter made absolute)."""
    try:
        config = json.loads((adapter / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{adapter / CONFIG} is unreadable: {e}") from None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not base:
        raise ModelError(f"{adapter} is a LoRA adapter that names no base model (base_model_name_or_path)")
    relative = adapter / Path(base).expanduser()
    return str(relative) if not Path(base).expanduser().is_absolute() and relative.exists() else base


def _key(adapter: Path, base: Path) -> str:
    """Cache key: the present version of the adapter's files and of the base's they merge into (hub.source_key),
    so retraining either in place merges again."""
    from edgevlm.hub import source_key

    return f"{adapter.resolve().name}-{source_key(adapter, base)}"


def merged(adapter: Path, cache: Path, log=lambda m: print(m, file=sys.stderr, flush=True)) -> Path:
    """The cached merge of `adapter` into its base, made on first use."""
    from edgevlm.export.checkpoints import resolve

    base_name = base_of(adapter)
    try:
        base = resolve(base_name)
    except ModelError as e:
        raise ModelError(f"{adapter} is a LoRA adapter on {base_name}, which cannot be loaded: {e}") from None
    out = cache / _key(adapter, base)
    if (out / "config.json").exists():
        return out
    try:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    except ImportError as e:
        raise ModelError(f"{adapter} is a LoRA adapter; merging it needs torch, transformers and peft ({e}): "
                         "pip install 'edgevlm[export]'") from None
    from edgevlm.families import read_config
    from edgevlm.train.tune import save_model

    log(f"merging the LoRA adapter {adapter.name} into {base.name} (first use only)")
    auto = AutoModelForImageTextToText if "vision_config" in read_config(base) else AutoModelForCausalLM
    try:
        model = PeftModel.from_pretrained(auto.from_pretrained(base, dtype=torch.float32), adapter)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        first = first_line(e)
        raise ModelError(f"cannot apply the adapter {adapter} to {base_name}: {first[:300]}") from None
    save_model(model.merge_and_unload().eval(), base, out)
    return out
