"""LLaVA-OneVision (the paper's extractor architecture): SigLIP tower, 2-layer MLP projector, AnyRes crops.

The released extractors use the LLaVA-NeXT `qwen_1_5` conversation, whose default system prompt
every prompt of this family starts with.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgevlm import prompts
from edgevlm.families import Family

MODEL_TYPES = ("llava_onevision",)
FAMILY = Family(name="llava_onevision", vision=True, system_prompt=prompts.QWEN_1_5_SYSTEM)
PROCESSOR_CONFIG = "processor_config.json"
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
