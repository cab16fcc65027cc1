"""The PyTorch reference backend: transformers models and processors, run step by step.

It is the numerical reference for every exported backend, so it does nothing clever: HF
processors prepare the inputs, the model's own `get_image_features` runs the vision side, and
the decoder runs with a DynamicCache one token at a time under the shared generation loop.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
from PIL import Image

from edgevlm.backends.base import Prepared, as_prompt
from edgevlm.errors import DeviceError, ModelError, first_line
from edgevlm.families import Family, export_module, vision_modules
from edgevlm.tokenizer import Part, Prompt, Tokenizer


def torch_device(device: str):
    import torch

    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda was asked for, but torch sees no CUDA GPU here; use --device cpu")
        return torch.device(device)
    raise DeviceError(f"unknown device {device!r}; use cpu or cuda")


BNB_QUANTS = ("int8", "nf4")
# Kept in full precision: the vision side (never 4-bit by default, as in export) and the LM head.
BNB_SKIP = [*vision_modules(), "lm_head"]


def bnb_config(quant: str, compute_dtype):
    """bitsandbytes weight quantization for the reference backend (CUDA; also runs, slowly, on CPU)."""
    from transformers import BitsAndBytesConfig

    # transformers matches these as regexes from the start of the module path (model.vision_tower.…)
    skip = [rf"(?:.*\.)?{name}" for name in BNB_SKIP]
    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    if quant == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                                  llm_int8_skip_modules=skip)
    raise ModelError(f"unknown --quant {quant!r} for the PyTorch backend; choose one of: {', '.join(BNB_QUANTS)}")


def _weight_bytes(model) -> dict[str, int]:
    """Parameter bytes per part: the vision side (tower + projector) and the decoder (the rest)."""
    parts = {"vision": 0, "decoder": 0}
    for name, p in model.named_parameters():
        vision = any(f"{skip}." in f"{name}." for skip in BNB_SKIP[:-1])
        parts["vision" if vision else "decoder"] += p.numel() * p.element_size()
    return {k: v for k, v in parts.items() if v}


def load(extractor: str, reasoner: str | None, *, device: str = "cpu", quant: str | None = None,
                    gguf_file: str | None = None) -> tuple[TorchModel, TorchModel | None]:
    """The extractor and (unless None) the reasoner as reference models, from directories or hub ids; GGUF
    files, LoRA adapters and LLaVA-NeXT checkpoints are converted on the export side first (and cached)."""
    from edgevlm.export.checkpoints import resolve, resolve_extractor
    from edgevlm.families import extractor_family, reasoner_family

    torch_device(device)  # fail on an unusable device before any download or conversion
    ex_dir = resolve_extractor(extractor)
    re_dir = resolve(reasoner, gguf_file=gguf_file) if reasoner else None
    ex = TorchModel(ex_dir, extractor_family(ex_dir), name=extractor, device=device, quant=quant)
    rs = TorchModel(re_dir, reasoner_family(re_dir), name=reasoner, device=device, quant=quant) if re_dir else None
    return ex, rs


def hf_prepare(processor, tokenizer: Tokenizer, prompt: Prompt, image: Image.Image) -> tuple[list[int], dict]:
    """The prompt's ids with its image placeholder expanded by the HF processor, and the processor's image
    tensors. The processor sees only the placeholder: the text around it is tokenized literal by edgevlm."""
    # channels_last: HF infers the layout from the shape, and guesses wrong for 1- or 3-pixel-high images
    out = processor(text=processor.image_token, images=image, return_tensors="pt", add_special_tokens=False,
                    input_data_format="channels_last")
    expansion = Prompt(tuple(Part(tokenizer.decode([i], False), i) for i in out["input_ids"][0].tolist()))
    return tokenizer.encode_prompt(prompt.expand(tokenizer.token_id(processor.image_token), expansion),
                                   add_special_tokens=True), out


class TorchDecodeState:
    def __init__(self, model, cache, logits: np.ndarray, prompt_len: int, device):
        self._model, self._cache, self._device = model, cache, device
        self.logits, self.prompt_len = logits, prompt_len
        self.reused = 0  # no prefix cache here

    def step(self, token_id: int) -> np.ndarray:
        import torch

        ids = torch.tensor([[token_id]], device=self._device)
        with torch.inference_mode():
            out = self._model(input_ids=ids, cache=self._cache, use_cache=True)
        self.logits = out.logits[0, -1].float().cpu().numpy()
        return self.logits

    def kv_bytes(self) -> tuple[int, int]:
        """(allocated, used); a DynamicCache grows by concatenation, so both are its contents."""
        used = sum(t.numel() * t.element_size() for layer in self._cache.layers
                   for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None)
        return used, used


class TorchModel:
    """A HF checkpoint directory loaded for the reference backend."""

    backend = "torch"
    concurrent = False  # transformers runs one forward at a time well; the pipeline runs its stages in turn
    prefix_cache = None  # transformers' DynamicCache is not reused across prompts
    spec = None  # an HF checkpoint, not a bundle

    def __init__(self, model_dir: str | Path, family: Family, *, name: str | None = None, device: str = "cpu",
                 quant: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

        self.dir = Path(model_dir)
        self.name = name or str(model_dir)
        self.family = family
        self._device = torch_device(device)
        self.device = self._device.type
        self.tokenizer = Tokenizer(self.dir)
        family.check_template(self.tokenizer)
        if self._device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32
        auto = AutoModelForImageTextToText if family.vision else AutoModelForCausalLM
        try:
            if quant:
                self.model = auto.from_pretrained(self.dir, dtype=dtype, quantization_config=bnb_config(quant, dtype),
                                                  device_map={"": self._device}).eval()
            else:
                self.model = auto.from_pretrained(self.dir, dtype=dtype).to(self._device).eval()
        except ImportError as e:
            raise ModelError(f"--quant {quant} needs bitsandbytes ({e}); pip install bitsandbytes==0.50.2") from None
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            first = first_line(e)
            raise ModelError(f"cannot load {self.name}: {first}") from None
        self.processor = export_module(family.name).load_hf_processor(self.dir)
        self.weight_bytes = _weight_bytes(self.model)
        table, head = self.model.get_input_embeddings().weight, self.model.get_output_embeddings()
        untied = head is None or head.weight.data_ptr() != table.data_ptr()  # a tied table is read whole by the head
        self.step_bytes = self.weight_bytes["decoder"] - (table.numel() * table.element_size() if untied else 0)
        config = self.model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.max_context = self.native_context = int(getattr(text_config, "max_position_embeddings", 0) or 4096)
        self.eos_ids = self.tokenizer.eos_token_ids(self.dir)
        if not self.eos_ids:
            raise ModelError(f"{self.name} defines no end-of-sequence token (tokenizer or generation config)")
        if family.vision:
            params = inspect.signature(self.model.get_image_features).parameters
            self._feature_args = {n for n, p in params.items() if p.kind != p.VAR_KEYWORD}

    def prepare(self, prompt: Prompt | str, image: Image.Image | None = None) -> Prepared:
        prompt = as_prompt(self.tokenizer, prompt)
        if image is None:
            return Prepared(self.tokenizer.encode_prompt(prompt))
        import torch

        ids, out = hf_prepare(self.processor, self.tokenizer, prompt, image)
        inputs = {k: v.to(self._device) if isinstance(v, torch.Tensor) else v
                  for k, v in out.items() if k in self._feature_args}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return Prepared(ids, inputs)

    def encode(self, prepared: Prepared) -> None:
        if not prepared.image_inputs:
            return
        import torch

        with torch.inference_mode():
            prepared.image_features = self.model.get_image_features(**prepared.image_inputs, return_dict=True)

    def embed(self, prepared: Prepared) -> None:
        """transformers embeds the prompt inside the model's forward."""

    def prefill(self, prepared: Prepared) -> TorchDecodeState:
        import torch
        from transformers import DynamicCache

        ids = torch.tensor([prepared.input_ids], device=self._device)
        cache = DynamicCache(config=self.model.config)
        kwargs = {}
        if prepared.image_features is not None:
            kwargs["mm_encoder_outputs"] = {"image": prepared.image_features}
        with torch.inference_mode():
            out = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1, **kwargs)
        logits = out.logits[0, -1].float().cpu().numpy()
        return TorchDecodeState(self.model, cache, logits, len(prepared.input_ids), self._device)
