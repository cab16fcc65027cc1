"""Text-only causal LMs (Qwen3, Qwen2, Llama/SmolLM2): one decoder graph on input_ids with explicit KV."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from edgevlm.export import graphs


def export_model(model_dir: Path, out: Path, root: Path, *, step: Callable, fused: bool = True) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = model.config.get_text_config()
    out.mkdir(parents=True, exist_ok=True)
    with step("decoder"):
        decoder = graphs.export_decoder(model.model, model.lm_head, text, out / "decoder.onnx", embeds=False,
                                          fused=fused)
    return graphs.model_entry("causal_lm", {"decoder": decoder}, text, model_dir, out, root)


def load_hf_processor(model_dir: Path) -> None:
    """Text-only: the tokenizer is the whole processor."""
    return None
