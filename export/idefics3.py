"""Idefics3 / SmolVLM: vision tower + pixel-shuffle connector on full crops, token embedding, decoder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from edgevlm.export import graphs
from edgevlm.families import idefics3


def load_hf_processor(model_dir: str | Path):
    """The HF processor (reference preprocessing). Uses the PIL image processor: no torchvision needed."""
    from transformers import AutoTokenizer, Idefics3ImageProcessorPil, Idefics3Processor

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    image_processor = Idefics3ImageProcessorPil.from_pretrained(model_dir)
    return Idefics3Processor.from_pretrained(model_dir, image_processor=image_processor, tokenizer=tokenizer)



class VisionFeatures(nn.Module):
    """pixel_values [crops, 3, m, m] -> connector features [crops, image_seq_len, hidden].

    The runtime always feeds full crops (one image is split into equal crops plus a global view), so
    every patch is valid and the position ids are plain 0..n-1: computing them from a patch mask (HF's
    bucketize path) would block a dynamic crop count in the exported graph.
    """

    def __init__(self, model):
        super().__init__()
        vision = model.model.vision_model
        self.patch_embedding = vision.embeddings.patch_embedding
        self.position_embedding = vision.embeddings.position_embedding
        self.encoder, self.post_layernorm = vision.encoder, vision.post_layernorm
        self.connector = model.model.connector

    def forward(self, pixel_values):
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        positions = torch.arange(patches.shape[1], device=patches.device)
        hidden = patches + self.position_embedding(positions)[None]
        hidden = self.encoder(inputs_embeds=hidden, attention_mask=None).last_hidden_state
        return self.connector(self.post_layernorm(hidden))


def export_model(model_dir: Path, out: Path, root: Path, *, step: Callable, fused: bool = True) -> dict:
    from transformers import Idefics3ForConditionalGeneration

    model = Idefics3ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    pre = idefics3.preprocess_config(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = pre["max_image_size"]
    exported = graphs.export_vlm_graphs(model, VisionFeatures(model), (m, m), model.model.text_model, out,
                                        step=step, vision_label="vision tower + connector", fused=fused)
    return graphs.model_entry("idefics3", exported, model.config.text_config, model_dir, out, root,
                              vision_config=model.config.vision_config, preprocess=pre)
