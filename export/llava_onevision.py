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


def export_model(model_dir: Path, out: Path, root: Path, *, step: Callable) -> dict:
    from transformers import LlavaOnevisionForConditionalGeneration

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    pre = llava_onevision.preprocess_config(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    exported = graphs.export_vlm_graphs(model, VisionFeatures(model), tuple(pre["crop_size"]),
                                        model.model.language_model, out, step=step,
                                        vision_label="vision tower + projector")
    newline = out / "image_newline.npy"
    np.save(newline, model.model.image_newline.detach().float().numpy())
    return graphs.model_entry("llava_onevision", exported, model.config.text_config, model_dir, out, root,
                              vision_config=model.config.vision_config, preprocess=pre,
                              arrays={"image_newline": newline.relative_to(root).as_posix()})
