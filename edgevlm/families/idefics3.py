"""Idefics3 / SmolVLM: image split into crops plus a global view, pixel-shuffle connector."""

from __future__ import annotations

from pathlib import Path

from edgevlm.families import Family

MODEL_TYPES = ("idefics3",)
FAMILY = Family(name="idefics3", vision=True)


def load_hf_processor(model_dir: str | Path):
    """The HF processor (reference preprocessing). Uses the PIL image processor: no torchvision needed."""
    from transformers import AutoTokenizer, Idefics3ImageProcessorPil, Idefics3Processor

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    image_processor = Idefics3ImageProcessorPil.from_pretrained(model_dir)
    return Idefics3Processor.from_pretrained(model_dir, image_processor=image_processor, tokenizer=tokenizer)
