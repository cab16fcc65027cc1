"""Model families: what differs between architectures, kept in one module per family.

This package is torch-free. A family's module may hold functions that need transformers
(loading the HF processor for the reference backend); they import it inside the function.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgevlm.errors import ModelError
from edgevlm.tokenizer import TEXT, Prompt, Tokenizer


@dataclass(frozen=True)
class Family:
    """How a family is prompted. `vision` families take an image; the others are text-only LMs."""

    name: str
    vision: bool
    system_prompt: str | None = None
    image_token: str | None = None  # the placeholder the chat template writes where the image goes

    def messages(self, prompt: str, with_image: bool = False) -> list[dict]:
        """One user turn (after the family's default system prompt, if any) in chat-template form."""
        if not self.vision:
            msgs = [{"role": "user", "content": prompt}]
            if self.system_prompt:
                msgs.insert(0, {"role": "system", "content": self.system_prompt})
            return msgs
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
        msgs = [{"role": "user", "content": content}]
        if self.system_prompt:
            msgs.insert(0, {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        return msgs

    def render(self, tokenizer: Tokenizer, prompt: str, *, with_image: bool = False,
               enable_thinking: bool | None = None) -> Prompt:
        """A stage's prompt as the model reads it: one user turn through the chat template, `prompt` literal."""
        kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        return tokenizer.render(self.messages(TEXT, with_image=with_image), prompt, **kwargs)

    def check_template(self, tokenizer: Tokenizer) -> None:
        """Render every prompt shape the stages use, so a broken chat template fails when the model loads,
        not at its first question."""
        if self.vision:
            prompt = self.render(tokenizer, "", with_image=True)
            image_id = tokenizer.token_id(self.image_token)
            if image_id is None or all(part.token_id != image_id for part in prompt.parts):
                raise ModelError(f"the model's chat template puts no image placeholder ({self.image_token}) in the "
                                 "prompt")
        else:
            for thinking in (False, True):
                self.render(tokenizer, "", enable_thinking=thinking)


def family_module(name: str):
    """The module of a family by its name (as bundles record it)."""
    from edgevlm.families import causal_lm, idefics3, llava_onevision

    modules = {m.FAMILY.name: m for m in (causal_lm, idefics3, llava_onevision)}
    if name not in modules:
        raise ModelError(f"unknown model family {name!r}; this edgevlm knows: {', '.join(modules)}")
    return modules[name]


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{model_dir} is not a model directory (no config.json)") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {path}: {e}") from None


def extractor_family(model_dir: str | Path) -> Family:
    """The family of a VLM checkpoint directory, or a one-line error naming the supported ones."""
    from edgevlm.families import idefics3, llava_onevision

    model_type = read_config(model_dir).get("model_type", "?")
    for module in (llava_onevision, idefics3):
        if model_type in module.MODEL_TYPES:
            return module.FAMILY
    raise ModelError(
        f"{model_dir} is a {model_type!r} model; extractors must be one of: "
        f"{', '.join(llava_onevision.MODEL_TYPES + idefics3.MODEL_TYPES)}"
    )


def reasoner_family(model_dir: str | Path) -> Family:
    """Any causal LM with a chat template can reason; VLMs and encoders cannot."""
    from edgevlm.families import causal_lm

    config = read_config(model_dir)
    archs = config.get("architectures") or []
    if not any(a.endswith("ForCausalLM") for a in archs):
        raise ModelError(
            f"{model_dir} is a {config.get('model_type', '?')!r} model ({', '.join(archs) or 'no architecture'}); "
            "the reasoner must be a text-only causal LM (e.g. Qwen3, Llama, SmolLM2)"
        )
    return causal_lm.FAMILY
