"""LLaVA-OneVision: vision tower + projector on AnyRes crops, token embedding, decoder on inputs_embeds.

AnyRes packing (stitching crop features, unpadding, anyres_max downsampling, newlines) stays in numpy
(edgevlm.families.llava_onevision); the learned newline vector ships as image_newline.npy.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgevlm.export import graphs
from edgevlm.families import llava_onevision


class VisionFeatures(nn.Module):
    """pixel_values [crops, 3, h, w] -> projected features [crops, tokens, hidden] (before packing)."""

    def __init__(self, model):
        super().__init__()
        self.tower, self.projector = model.model.vision_tower, model.model.multi_modal_projector
        self.layer = model.config.vision_feature_layer
        self.drop_cls = model.config.vision_feature_select_strategy == "default"
        if not isinstance(self.layer, int):
            raise ValueError("multi-layer vision features are not supported yet")

    def forward(self, pixel_values):
        hidden = self.tower(pixel_values, output_hidden_states=True).hidden_states[self.layer]
        return self.projector(hidden[:, 1:] if self.drop_cls else hidden)


def export_model(model_dir: Path, out: Path, root: Path, *, quant: str, step: Callable,
                 vision_quant: str | None = None) -> dict:
    from transformers import LlavaOnevisionForConditionalGeneration

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = model.config.text_config
    pre = llava_onevision.preprocess_config(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    crop_h, crop_w = pre["crop_size"]
    with step("vision tower + projector"):
        vision = graphs.export(VisionFeatures(model), (torch.randn(2, 3, crop_h, crop_w),), out / "vision.onnx",
                               ["pixel_values"], ["image_features"], {"pixel_values": {0: "crops"}})
        vq = graphs.quantize(vision, vision_quant or quant)
    with step("token embedding"):
        embed = graphs.export_embedding(model.get_input_embeddings(), text.vocab_size, out / "embed.onnx")
        eq = graphs.quantize(embed, quant)
    with step("decoder"):
        decoder = graphs.export_decoder(model.model.language_model, model.lm_head, text, out / "decoder.onnx",
                                        embeds=True)
        dq = graphs.quantize(decoder, quant)
    np.save(out / "image_newline.npy", model.model.image_newline.detach().float().numpy())
    graphs.copy_tokenizer(model_dir, out)
    max_context = int(text.max_position_embeddings)
    return {
        "family": "llava_onevision",
        "graphs": {"vision": graphs.graph_entry(vision, root, vq), "embed": graphs.graph_entry(embed, root, eq),
                   "decoder": graphs.graph_entry(decoder, root, dq)},
        "arrays": {"image_newline": (out / "image_newline.npy").relative_to(root).as_posix()},
        "kv": graphs.kv_layout(text, max_context),
        "max_context": max_context,
        "preprocess": pre,
        "tokenizer": out.relative_to(root).as_posix(),
    }
