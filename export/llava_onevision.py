"""LLaVA-OneVision: vision tower + projector on AnyRes crops, token embedding, decoder on inputs_embeds.

AnyRes packing (stitching crop features, unpadding, anyres_max downsampling, newlines) stays in numpy
(edgevlm.families.llava_onevision); the learned newline vector ships as image_newline.npy.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgevlm.export import graphs
from edgevlm.families import llava_onevision
from edgevlm.families.llava_onevision import PROCESSOR_CONFIG

# The chat template the paper's authors ship with their converted extractors: images first, then text.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _processor_class():
    from transformers import LlavaOnevisionProcessor

    class ImageOnlyProcessor(LlavaOnevisionProcessor):
        # The stock processor insists on a video processor, which needs torchvision; images need none.
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyProcessor


def save_processor(out_dir, tokenizer, image_processor, *, num_image_tokens: int, chat_template: str,
                   vision_feature_select_strategy: str = "full") -> None:
    """Write tokenizer, image processor, chat template and processor_config.json the way HF lays them out."""
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    config = {
        "processor_class": "LlavaOnevisionProcessor", "image_token": "<image>", "video_token": "<video>",
        "num_image_tokens": num_image_tokens, "vision_feature_select_strategy": vision_feature_select_strategy,
    }
    (Path(out_dir) / PROCESSOR_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def load_hf_processor(model_dir: str | Path):
    """The HF processor (reference preprocessing and image-token expansion), without torchvision."""
    from transformers import AutoTokenizer, LlavaOnevisionImageProcessorPil

    model_dir = Path(model_dir)
    config_path = model_dir / PROCESSOR_CONFIG
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return _processor_class()(
        image_processor=LlavaOnevisionImageProcessorPil.from_pretrained(model_dir),
        tokenizer=tokenizer,
        num_image_tokens=config.get("num_image_tokens"),
        vision_feature_select_strategy=config.get("vision_feature_select_strategy"),
        chat_template=tokenizer.chat_template,
    )



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


def export_model(model_dir: Path, out: Path, root: Path, *, step: Callable, fused: bool = True) -> dict:
    from transformers import LlavaOnevisionForConditionalGeneration

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    pre = llava_onevision.preprocess_config(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    exported = graphs.export_vlm_graphs(model, VisionFeatures(model), tuple(pre["crop_size"]),
                                        model.model.language_model, out, step=step,
                                        vision_label="vision tower + projector", fused=fused)
    newline = out / "image_newline.npy"
    np.save(newline, model.model.image_newline.detach().float().numpy())
    return graphs.model_entry("llava_onevision", exported, model.config.text_config, model_dir, out, root,
                              vision_config=model.config.vision_config, preprocess=pre,
                              arrays={"image_newline": newline.relative_to(root).as_posix()})
