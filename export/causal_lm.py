"""Text-only causal LMs (Qwen3, Qwen2, Llama/SmolLM2): one decoder graph on input_ids with explicit KV."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from edgevlm.export import graphs


def export_model(model_dir: Path, out: Path, root: Path, *, quant: str, step: Callable) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = model.config.get_text_config()
    out.mkdir(parents=True, exist_ok=True)
    with step("decoder"):
        decoder = graphs.export_decoder(model.model, model.lm_head, text, out / "decoder.onnx", embeds=False)
        q = graphs.quantize(decoder, quant)
    graphs.copy_tokenizer(model_dir, out)
    max_context = int(text.max_position_embeddings)
    return {
        "family": "causal_lm",
        "graphs": {"decoder": graphs.graph_entry(decoder, root, q)},
        "kv": graphs.kv_layout(text, max_context),
        "max_context": max_context,
        "tokenizer": out.relative_to(root).as_posix(),
    }
