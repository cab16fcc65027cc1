"""Convert LLaVA-NeXT / LLaVA-OneVision training checkpoints with a Qwen3 LLM (`model_type: llava_qwen3`,
the format of the paper's released extractors) to transformers' LlavaOnevisionForConditionalGeneration.

Follows the facts of the authors' converter (PAPER.md): SigLIP-so400m tower with 26 layers and no
head, `<image>`/`<video>` added to the Qwen3 tokenizer, embeddings resized to vocab+2 padded to a
multiple of 64, weights renamed, `*.inv_freq` dropped. Two deliberate differences: the new
embedding rows are set to the mean embedding rather than sampled (they belong to no real token,
and conversion becomes deterministic), and weights keep their stored dtype.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from edgevlm.bundle import atomic_directory
from edgevlm.errors import ModelError
from edgevlm.export import llava_onevision as export_llava

# The paper's vision tower: SigLIP so400m-patch14-384 without its last layer and head.
SO400M = dict(
    model_type="siglip_vision_model", hidden_size=1152, image_size=384, intermediate_size=4304,
    num_attention_heads=16, num_hidden_layers=26, patch_size=14, vision_use_head=False,
)
# Original prefix -> transformers prefix (matched at the start of each weight name).
RENAMES = (
    ("model.vision_tower.vision_tower.", "model.vision_tower."),
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.layers.", "model.language_model.layers."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.norm.", "model.language_model.norm."),
)
# Base models of the released extractors, by (hidden_size, layers): where their tokenizer comes from.
QWEN3_BASES = {(1024, 28): "Qwen/Qwen3-0.6B", (2048, 28): "Qwen/Qwen3-1.7B", (2560, 36): "Qwen/Qwen3-4B"}
# Keys of a llava_qwen3 config that belong to the multimodal wrapper, not the Qwen3 text model.
_WRAPPER_KEY = re.compile(r"^(mm_|image_|vision_|tokenizer_|use_mm|unfreeze|tune_|pos_skipping|add_faster|"
                          r"faster_token|s2|architectures$|model_type$|_name_or_path$|transformers_version$)")


def rename(key: str) -> str:
    for old, new in RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def grid_pinpoints(value, crop: int) -> list[list[int]] | None:
    """LLaVA-NeXT writes pinpoints as a list or as a range string "(1x1),...,(6x6)" of crop multiples."""
    if isinstance(value, list):
        return [list(map(int, p)) for p in value]
    if isinstance(value, str) and "x" in value:
        found = re.findall(r"\((\d+)x(\d+)\)", value)
        (h0, w0), (h1, w1) = map(int, found[0]), map(int, found[-1])
        return [[i * crop, j * crop] for i in range(h0, h1 + 1) for j in range(w0, w1 + 1)]
    return None


def vision_tower_config(source: dict) -> dict:
    """The SigLIP config of `mm_vision_tower`: so400m (the paper's), or a local tower directory."""
    tower = str(source.get("mm_vision_tower") or "")
    if "siglip-so400m-patch14-384" in tower:
        return dict(SO400M)
    path = Path(tower)
    if (path / "config.json").exists():
        cfg = json.loads((path / "config.json").read_text())
        cfg = cfg.get("vision_config", cfg)
        cfg.update(model_type="siglip_vision_model", vision_use_head=False)
        return cfg
    raise ModelError(f"unknown vision tower {tower!r}: edgevlm converts SigLIP so400m-patch14-384 extractors")


def text_config(source: dict) -> dict:
    """The Qwen3 text config inside a llava_qwen3 config (the wrapper subclasses Qwen3Config)."""
    cfg = {k: v for k, v in source.items() if not _WRAPPER_KEY.match(k)}
    cfg["model_type"] = "qwen3"
    return cfg


def convert(source_dir: str | Path, out_dir: str | Path, *, tokenizer_dir: str | Path | None = None,
            vision_config: dict | None = None, log=print) -> Path:
    """Convert `source_dir` into `out_dir` (written atomically). The tokenizer comes from `tokenizer_dir`,
    else from the source directory, which then must have one."""
    import torch
    from safetensors.torch import load_file
    from transformers import (
        AddedToken,
        AutoTokenizer,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
    )

    source_dir, out_dir = Path(source_dir), Path(out_dir)
    source = json.loads((source_dir / "config.json").read_text())
    vision = dict(vision_config or vision_tower_config(source))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or source_dir)
    for token in ("<image>", "<video>"):
        tokenizer.add_tokens(AddedToken(token, special=True, normalized=False), special_tokens=True)
    shards = sorted(source_dir.glob("*.safetensors"))
    if not shards:
        raise ModelError(f"{source_dir} has no .safetensors weights to convert")
    log(f"converting {source_dir.name} from LLaVA-NeXT format ({len(shards)} weight files; first use only)")
    state = {}
    for shard in shards:
        state.update({rename(k): v for k, v in load_file(shard).items() if not k.endswith(".inv_freq")})
    dtype = next(iter(state.values())).dtype
    # LLaVA keeps the tower up to the selected layer (so400m: 26 of 27); what is stored is what runs.
    layers = {int(m.group(1)) for k in state if (m := re.match(r"model\.vision_tower\..*\.layers\.(\d+)\.", k))}
    if layers:
        vision["num_hidden_layers"] = max(layers) + 1
    text = text_config(source)
    pinpoints = grid_pinpoints(source.get("image_grid_pinpoints"), vision["image_size"])
    config = LlavaOnevisionConfig(
        text_config=text, vision_config=vision, use_image_newline_parameter=True,
        tie_word_embeddings=text.get("tie_word_embeddings", False),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        **({"image_grid_pinpoints": pinpoints} if pinpoints else {}),
    )
    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelError(f"{source_dir} does not match the LLaVA-OneVision layout "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    # The new rows (for <image>, <video> and padding) get the mean embedding: no real token uses them.
    vocab = config.text_config.vocab_size
    embed = model.get_input_embeddings().weight.data
    mean = embed.float().mean(0)
    model.resize_token_embeddings(vocab + 2, pad_to_multiple_of=64, mean_resizing=False)
    new_embed = model.get_input_embeddings().weight.data
    new_embed[vocab:] = mean.to(new_embed.dtype)
    if not config.tie_word_embeddings:
        head = model.get_output_embeddings().weight.data
        head[vocab:] = head[:vocab].float().mean(0).to(head.dtype)
    model.to(dtype)
    crop = vision["image_size"]
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": crop, "width": crop}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        resample=3, do_pad=True, **({"image_grid_pinpoints": pinpoints} if pinpoints else {}),
    )
    with atomic_directory(out_dir, overwrite=True) as tmp:  # replaces only a directory edgevlm wrote
        model.save_pretrained(tmp)
        export_llava.save_processor(
            tmp, tokenizer, image_processor, num_image_tokens=(crop // vision["patch_size"]) ** 2,
            chat_template=export_llava.CHAT_TEMPLATE,
        )
    return out_dir


def converted(source_dir: Path, model_id: str, cache: Path) -> Path:
    """The cached conversion of `source_dir`, made on first use. Keyed by the source snapshot and the
    present version of its files (hub.source_key), so a checkpoint retrained in place is converted again."""
    from edgevlm.export.checkpoints import resolve
    from edgevlm.hub import source_key

    out = cache / "--".join((re.sub(r"[^\w.-]+", "--", model_id), source_dir.resolve().name, source_key(source_dir)))
    if (out / "config.json").exists():
        return out
    tokenizer_dir = None
    if not (source_dir / "tokenizer.json").exists() and not (source_dir / "tokenizer_config.json").exists():
        source = json.loads((source_dir / "config.json").read_text())
        base = QWEN3_BASES.get((source.get("hidden_size"), source.get("num_hidden_layers")))
        if base is None:
            raise ModelError(f"{model_id} ships no tokenizer and its base Qwen3 model is not known")
        tokenizer_dir = resolve(base)
    return convert(source_dir, out, tokenizer_dir=tokenizer_dir, log=lambda m: print(m, file=sys.stderr))
