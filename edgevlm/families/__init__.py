"""Model families: what differs between architectures, one module per family, found by its name.

A family is two modules: its runtime side here (edgevlm/families/<name>.py: prompting, preprocessing,
image features, the planner's image-token count; numpy only) and its export side
(edgevlm/export/<name>.py: the graphs, and the HF processor the reference backend uses). Both implement
the protocols below; nothing else names a family, so adding one touches those two files only.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np
from PIL import Image

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


class FamilyModule(Protocol):
    """The runtime side of a family: edgevlm/families/<name>.py, with FAMILY.name == <name>."""

    FAMILY: Family
    MODEL_TYPES: tuple[str, ...]  # config.json model_type values it loads; () for text LMs (any *ForCausalLM)
    GRAPHS: tuple[str, ...]  # the graphs its bundles hold, in export order
    VISION_MODULES: tuple[str, ...]  # parameter-name parts of its vision tower and projector (kept full precision)
    # The manifest's `preprocess` for this family: a JSON schema over bundle.schema.json's $defs (None: no images)
    PREPROCESS_SCHEMA: dict | None
    ARRAYS: tuple[str, ...]  # numpy arrays its bundles carry (manifest `arrays`), by name


class VisionFamilyModule(FamilyModule, Protocol):
    """What a family whose FAMILY.vision is true adds: images in, features placed, room planned."""

    def preprocess_config(self, model_dir: str | Path) -> dict:
        """The manifest's `preprocess`, from a HF checkpoint directory."""
        ...

    def prepare_inputs(self, prompt: Prompt, image: Image.Image, cfg: dict,
                       tokenizer: Tokenizer) -> tuple[list[int], dict[str, Any]]:
        """The prompt's ids with the image placeholder expanded, and the vision graph's inputs (pixel_values)."""
        ...

    def image_features(self, vision_output: np.ndarray, inputs: dict, cfg: dict, arrays: dict) -> np.ndarray:
        """The vision graph's output -> one feature row per image token of the expanded prompt."""
        ...

    def max_crops(self, cfg: dict) -> int:
        """The most crops one image becomes."""
        ...

    def max_image_tokens(self, cfg: dict, tokens_per_crop: int) -> int:
        """The most prompt positions one image can take (the memory planner's upper bound)."""
        ...

    def within(self, cfg: dict, max_tokens: int, tokens_per_crop: int) -> dict:
        """`cfg` with images cut (fewer or smaller crops) to at most `max_tokens` positions (a visual-token
        budget), or a UsageError naming the least this model's images can take."""
        ...


class ExportModule(Protocol):
    """The export side of a family: edgevlm/export/<name>.py (needs torch and transformers)."""

    def export_model(self, model_dir: Path, out: Path, root: Path, *, step, fused: bool = True) -> Any:
        """The family's fp32 graphs and their manifest.ModelSpec; `fused` False: decoders of standard ONNX
        operators only (the TensorRT flavour), not ONNX Runtime's fused ones."""
        ...

    def load_hf_processor(self, model_dir: str | Path) -> Any:
        """Vision families: the HF processor (the reference backend's preprocessing)."""
        ...


@cache
def registry() -> dict[str, ModuleType]:
    """Every family module in this package, by family name."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if isinstance(getattr(module, "FAMILY", None), Family) and module.FAMILY.name == info.name:
            found[info.name] = module
    return found


def family_module(name: str) -> FamilyModule:
    """The module of a family by its name (as bundles record it)."""
    modules = registry()
    if name not in modules:
        raise ModelError(f"unknown model family {name!r}; this edgevlm knows: {', '.join(sorted(modules))}")
    return modules[name]


def export_module(name: str) -> ExportModule:
    """The export side of a family (imports torch and transformers: the export toolchain and the reference
    backend only)."""
    family_module(name)  # a known family: never an arbitrary module name
    return importlib.import_module(f"edgevlm.export.{name}")


def vision_modules() -> tuple[str, ...]:
    """The parameter-name parts of every family's vision tower and projector."""
    return tuple(dict.fromkeys(m for module in registry().values() for m in module.VISION_MODULES))


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
    model_type = read_config(model_dir).get("model_type", "?")
    vision = [m for m in registry().values() if m.FAMILY.vision]
    for module in vision:
        if model_type in module.MODEL_TYPES:
            return module.FAMILY
    raise ModelError(f"{model_dir} is a {model_type!r} model; extractors must be one of: "
                     f"{', '.join(t for m in vision for t in m.MODEL_TYPES)}")


def reasoner_family(model_dir: str | Path) -> Family:
    """Any causal LM with a chat template can reason; VLMs and encoders cannot."""
    config = read_config(model_dir)
    archs = config.get("architectures") or []
    if not any(a.endswith("ForCausalLM") for a in archs):
        raise ModelError(
            f"{model_dir} is a {config.get('model_type', '?')!r} model ({', '.join(archs) or 'no architecture'}); "
            "the reasoner must be a text-only causal LM (e.g. Qwen3, Llama, SmolLM2)"
        )
    return family_module("causal_lm").FAMILY
