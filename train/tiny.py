"""Tiny, randomly initialised models of every supported family, built from configs with no download.

They are saved as ordinary Hugging Face model directories (config, safetensors weights, a
tokenizer trained here, the family's chat template and image processor), so anything that
loads a hub checkpoint loads them too. Use them to test an integration offline:

    edgevlm make-tiny llava_onevision /tmp/extractor
    edgevlm make-tiny qwen3 /tmp/reasoner
    edgevlm run photo.jpg "What is shown?" --extractor /tmp/extractor --reasoner /tmp/reasoner

or from Python: ``edgevlm.train.tiny.make_tiny("qwen3", "/tmp/reasoner")``.

Their outputs are random text; what they exercise is shapes, plumbing and numerics. Needs
torch and transformers (``pip install edgevlm[export]``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from edgevlm import prompts
from edgevlm.bundle import atomic_directory
from edgevlm.errors import UsageError

# Chat templates. The Qwen3-style one honours `enable_thinking=False` the way Qwen3's does (an empty
# think block in the generation prompt); the LLaVA-OneVision one is the template the paper's authors
# ship with their converted extractors (edgevlm.export.llava_onevision); the Idefics3 one follows SmolVLM's.
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join('') %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + text + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)
# ChatML without thinking, like SmolLM2-Instruct's.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>",
    "<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
# Like Qwen3's <think> and </think>: added tokens, but not special (they survive decoding).
PLAIN_ADDED_TOKENS = ["<think>", "</think>"]

_CORPUS = [
    prompts.PLANNER_PREFIX, prompts.EXTRACT_PREFIX, prompts.REASONER_ROLE, prompts.POST_THINK_CHOICE,
    prompts.POST_DIRECT_CHOICE, prompts.POST_THINK_OPEN, prompts.POST_DIRECT_OPEN, prompts.QWEN_1_5_SYSTEM,
    prompts.DIRECT_POST_CHOICE, prompts.DIRECT_POST_OPEN,
    "A small cat sits on a red mat in the sun. There are two dogs and three birds near the blue house.",
    "The quick brown fox jumps over the lazy dog. What color is the car? How many people are there?",
    "Wait, but however the other option may be right. Hmm, let me check again. Now the waiter comes.",
    "Options: A: red, B: green, C: blue, D: yellow. Answer: B. The answer is on the last line.",
    "Question: What is written on the sign? Description: a stop sign at the corner of a street.",
    "0 1 2 3 4 5 6 7 8 9 10 left right top bottom center above below next to behind in front of",
] * 8

FAMILIES = ("qwen3", "llama", "llava_onevision", "llava_onevision_qwen2", "idefics3")


def build_tokenizer(vocab_size: int = 1024, corpus: list[str] | None = None):
    """A byte-level BPE trained here on the method's own prompts (and `corpus`), as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS + (corpus or []), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[3:]})
    fast.add_tokens(PLAIN_ADDED_TOKENS, special_tokens=False)
    fast.model_input_names = ["input_ids", "attention_mask"]
    return fast


def _text_config(vocab: int, **extra) -> dict:
    cfg = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
    )
    cfg.update(extra)
    return cfg


def _qwen3_text_config(tok) -> dict:
    return _text_config(
        len(tok), model_type="qwen3", head_dim=16, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
    )


def _save_generation_config(model, eos_ids: list[int], pad_id: int) -> None:
    model.generation_config.eos_token_id = eos_ids
    model.generation_config.pad_token_id = pad_id


def _qwen2_text_config(tok) -> dict:
    cfg = _qwen3_text_config(tok)
    del cfg["head_dim"]
    return {**cfg, "model_type": "qwen2"}


def _make_qwen3(out: Path, seed: int, *, tok=None, text_extra: dict | None = None) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = tok or build_tokenizer()
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    torch.manual_seed(seed)
    _save_causal_lm(Qwen3ForCausalLM(Qwen3Config(**{**_qwen3_text_config(tok), **(text_extra or {})})), tok, out)


def _make_llama(out: Path, seed: int) -> None:
    """SmolLM2's architecture (Llama, tied embeddings) with a ChatML template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    tok.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(**_text_config(
        len(tok), rope_parameters={"rope_type": "default", "rope_theta": 1e5}, tie_word_embeddings=True,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
    ))
    _save_causal_lm(LlamaForCausalLM(config), tok, out)


def _save_causal_lm(model, tok, out: Path) -> None:
    _save_generation_config(
        model, [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")],
        tok.convert_tokens_to_ids("<|endoftext|>"),
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)


# The SigLIP tower of the paper's extractor, shrunk: same family and layout, 16 tokens per 32x32 crop.
TINY_SIGLIP = dict(
    model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=2, image_size=32, patch_size=8, vision_use_head=False,
)
# AnyRes pinpoints shaped like the paper's (1x1 ... 3x3 crops of the base size).
TINY_GRIDS = [(h, w) for h in range(1, 4) for w in range(1, 4)]


def _make_llava_onevision(out: Path, seed: int, text: str = "qwen3", *, tok=None, vision: dict = TINY_SIGLIP,
                          text_extra: dict | None = None, pinpoints: list | None = None) -> None:
    import torch
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
    )

    from edgevlm.export import llava_onevision as export_llava

    tok = tok or build_tokenizer()
    crop = vision["image_size"]
    pinpoints = pinpoints or [[crop * h, crop * w] for h, w in TINY_GRIDS]
    cfg = LlavaOnevisionConfig(
        vision_config=dict(vision),
        text_config={**(_qwen3_text_config(tok) if text == "qwen3" else _qwen2_text_config(tok)), **(text_extra or {})},
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints, vision_feature_select_strategy="full", vision_feature_layer=-1,
        use_image_newline_parameter=True, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(cfg)
    _save_generation_config(
        model, [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")],
        tok.convert_tokens_to_ids("<|endoftext|>"),
    )
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": crop, "width": crop}, image_grid_pinpoints=pinpoints, do_pad=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], resample=3,
    )
    model.save_pretrained(out)
    export_llava.save_processor(
        out, tok, image_processor, num_image_tokens=(crop // vision["patch_size"]) ** 2,
        chat_template=export_llava.CHAT_TEMPLATE,
    )


def _make_idefics3(out: Path, seed: int) -> None:
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    tok = build_tokenizer()
    eou = tok.convert_tokens_to_ids("<end_of_utterance>")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8)
    text = _text_config(
        len(tok), model_type="llama", rope_parameters={"rope_type": "default", "rope_theta": 1e4},
        eos_token_id=eou, pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
    )
    cfg = Idefics3Config(
        vision_config=vision, text_config=text, scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(cfg)
    _save_generation_config(model, [eou, tok.convert_tokens_to_ids("<|im_end|>")],
                            tok.convert_tokens_to_ids("<|endoftext|>"))
    # SmolVLM's layout: the image is split into crops of max_image_size plus one global view.
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=True, size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    image_seq_len = (32 // 8) ** 2 // 2**2
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tok, image_seq_len=image_seq_len,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)


_MAKERS: dict[str, Callable[[Path, int], None]] = {
    "qwen3": _make_qwen3,
    "llama": _make_llama,
    "llava_onevision": _make_llava_onevision,
    "llava_onevision_qwen2": lambda out, seed: _make_llava_onevision(out, seed, text="qwen2"),
    "idefics3": _make_idefics3,
}


def make_tiny(family: str, out_dir: str | os.PathLike, seed: int = 0, overwrite: bool = False) -> Path:
    """Build a tiny random model of `family` (one of FAMILIES) and save it to `out_dir`.

    The directory is written atomically: it appears complete or not at all. `overwrite` replaces one that
    edgevlm wrote; anything else there is refused.
    """
    if family not in _MAKERS:
        raise UsageError(f"unknown family {family!r}; choose one of: {', '.join(FAMILIES)}")
    out = Path(out_dir)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with atomic_directory(out, overwrite=overwrite) as tmp:  # replaces only a directory edgevlm wrote
        _MAKERS[family](tmp, seed)
    return out


# ---------------------------------------------------------------- full-size random models (benchmarks)
QWEN3_SHAPES = {
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
}
PAPER_PINPOINTS = [[384 * h, 384 * w] for h in range(1, 7) for w in range(1, 7)]


def make_paper_shaped(kind: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """A random model with the real architecture's shapes (no download), for export and speed benchmarks:
    `extractor-0.6b` (the paper's: SigLIP so400m + projector + Qwen3-0.6B, 384 px AnyRes up to 6x6 crops),
    `qwen3-0.6b`, `qwen3-1.7b`. The tokenizer is the tiny one; the vocabulary is Qwen3's size. Written
    atomically; it replaces only a directory edgevlm wrote."""
    if kind != "extractor-0.6b" and kind not in QWEN3_SHAPES:
        raise UsageError(f"unknown shape {kind!r}; choose extractor-0.6b, {', '.join(QWEN3_SHAPES)}")
    with atomic_directory(Path(out_dir), overwrite=True) as tmp:
        _make_paper_shaped(kind, tmp, seed)
    return Path(out_dir)


def _make_paper_shaped(kind: str, out: Path, seed: int) -> None:
    import torch
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    from edgevlm.export import llava_onevision as export_llava
    from edgevlm.export.llava_next import SO400M

    tok = build_tokenizer()
    text = {**_qwen3_text_config(tok), **QWEN3_SHAPES["qwen3-0.6b" if kind == "extractor-0.6b" else kind],
            "vocab_size": 151936, "max_position_embeddings": 40960}
    torch.manual_seed(seed)
    if kind == "extractor-0.6b":
        config = LlavaOnevisionConfig(
            vision_config=dict(SO400M), text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
            video_token_index=tok.convert_tokens_to_ids("<video>"), image_grid_pinpoints=PAPER_PINPOINTS,
            vision_feature_select_strategy="full", vision_feature_layer=-1, use_image_newline_parameter=True,
            tie_word_embeddings=True)
        model = LlavaOnevisionForConditionalGeneration(config)
        model.save_pretrained(out)
        image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": 384, "width": 384}, image_grid_pinpoints=PAPER_PINPOINTS, do_pad=True,
            image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=3)
        export_llava.save_processor(out, tok, image_processor, num_image_tokens=729,
                                       chat_template=export_llava.CHAT_TEMPLATE)
    else:
        tok.chat_template = QWEN3_CHAT_TEMPLATE
        _save_causal_lm(Qwen3ForCausalLM(Qwen3Config(**text)), tok, out)
