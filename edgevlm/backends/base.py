"""The contract between the pipeline and a backend's models: what each must provide and what it can do,
declared here rather than probed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

from edgevlm.cache import PrefixCache
from edgevlm.families import Family
from edgevlm.generation import DecodeState
from edgevlm.manifest import ModelSpec
from edgevlm.tokenizer import Prompt, Tokenizer


@dataclass
class Prepared:
    """A prompt ready for the model: token ids (image placeholders expanded) and image tensors."""

    input_ids: list[int]
    image_inputs: dict[str, Any] = field(default_factory=dict)
    image_features: Any = None  # set by Model.encode
    crops: int = 0  # image crops the vision tower encodes (where the backend counts them: ONNX Runtime)
    inputs_embeds: Any = None  # set by Model.embed, for backends that embed the prompt apart from the decoder


class State(DecodeState, Protocol):
    """A backend's decode state: the generation loop's DecodeState, plus what a stage reports."""

    reused: int  # prompt positions whose KV came from the prefix cache

    def kv_bytes(self) -> tuple[int, int]:
        """(allocated, used) bytes of the KV cache now."""
        ...


class Model(Protocol):
    name: str  # hub id or directory, as the user gave it
    family: Family
    tokenizer: Tokenizer
    max_context: int  # what this model may use: the memory plan's context (bundles), else native_context
    native_context: int  # what the model was trained for
    eos_ids: set[int]
    backend: str  # "onnxruntime" or "torch"
    device: str  # "cpu" or "cuda"
    weight_bytes: dict[str, int]  # per graph or part: vision, embed, decoder
    step_bytes: int  # weight bytes one decode step reads: the decoder's, less token-embedding rows not read
    # Capabilities. concurrent: this model may compute on one thread while the pipeline's other model computes
    # on another (the pipeline then overlaps the vision tower with the planner, and may pipeline frames: one's
    # extract beside another's think). One model still runs one stage at a time. prefix_cache: the KV of
    # recent prompts, which the pipeline sizes (None: the backend has none).
    concurrent: bool
    prefix_cache: PrefixCache | None
    spec: ModelSpec | None  # its bundle manifest entry (sizes, precision); None: not loaded from a bundle

    def prepare(self, prompt: Prompt | str, image: Image.Image | None = None) -> Prepared:
        """Tokenize a rendered prompt (a str is trusted: its special tokens are control tokens); with an
        image, preprocess it and expand its placeholder."""
        ...

    def encode(self, prepared: Prepared) -> None:
        """Run the vision tower (and projector) on the prepared image, if any."""
        ...

    def embed(self, prepared: Prepared) -> None:
        """Compute the prompt's input embeddings (image features placed), where the backend does that apart."""
        ...

    def prefill(self, prepared: Prepared) -> State:
        """Run the prompt through the decoder; the returned state decodes from there."""
        ...


def as_prompt(tokenizer: Tokenizer, prompt: Prompt | str) -> Prompt:
    """A Prompt as is; a str is a trusted rendered prompt (tests, calibration), its added tokens live."""
    return prompt if isinstance(prompt, Prompt) else tokenizer.markers(prompt)
