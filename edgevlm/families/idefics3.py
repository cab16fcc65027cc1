"""Idefics3 / SmolVLM: image split into crops plus a global view, pixel-shuffle connector."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from edgevlm.errors import UsageError
from edgevlm.families import Family
from edgevlm.tokenizer import Prompt, Tokenizer

MODEL_TYPES = ("idefics3",)
FAMILY = Family(name="idefics3", vision=True, image_token="<image>")
GRAPHS = ("vision", "embed", "decoder")
VISION_MODULES = ("vision_model", "connector")
ARRAYS = ()
PREPROCESS_SCHEMA = {
    "allOf": [
        {"$ref": "#/$defs/image_common"},
        {
            "type": "object",
            "required": ["longest_edge", "max_image_size", "do_image_splitting", "image_seq_len"],
            "additionalProperties": False,
            "properties": {
                "resample": True, "rescale_factor": True, "image_mean": True, "image_std": True, "image_token_id": True,
                "longest_edge": {"$ref": "#/$defs/positive"},
                "max_image_size": {"$ref": "#/$defs/positive"},
                "do_image_splitting": {"type": "boolean"},
                "image_seq_len": {"$ref": "#/$defs/positive"},
            },
        },
    ],
}


# ---------------------------------------------------------------- runtime preprocessing (numpy, no torch)
# Reproduces transformers' Idefics3ImageProcessor(Pil) and Idefics3Processor's prompt expansion (tests
# compare them). For one image every crop is full-size, so the vision graph needs no pixel mask.
MAX_IMAGE_SIZE = 4096  # HF's absolute cap on the resized image
MARKERS_PER_CROP = 4  # at most: the opening marker, the crop's name, a closing marker or a row's newline, and one


def preprocess_config(model_dir: str | Path) -> dict:
    """What the runtime needs to prepare images and expand the prompt, from a HF checkpoint directory."""
    model_dir = Path(model_dir)
    processor = json.loads((model_dir / "processor_config.json").read_text())
    image = processor.get("image_processor") or json.loads((model_dir / "preprocessor_config.json").read_text())
    config = json.loads((model_dir / "config.json").read_text())
    return {
        "longest_edge": int(image.get("size", {}).get("longest_edge", 4 * 364)),
        "max_image_size": int(image.get("max_image_size", {}).get("longest_edge", 364)),
        "do_image_splitting": bool(image.get("do_image_splitting", True)),
        "resample": int(image.get("resample", 1)),
        "rescale_factor": float(image.get("rescale_factor", 1 / 255)),
        "image_mean": [float(x) for x in image.get("image_mean", [0.5, 0.5, 0.5])],
        "image_std": [float(x) for x in image.get("image_std", [0.5, 0.5, 0.5])],
        "image_seq_len": int(processor.get("image_seq_len", 169)),
        "image_token_id": int(config["image_token_id"]),
    }


def _fit_longest(h: int, w: int, longest: int) -> tuple[int, int]:
    """HF's resize to a longest edge (even short side), then under the 4096 cap."""
    aspect = w / h
    if w >= h:
        w, h = longest, int(longest / aspect)
        h += h % 2
    else:
        h, w = longest, int(longest * aspect)
        w += w % 2
    h, w = max(h, 1), max(w, 1)
    aspect = w / h
    if w >= h and w > MAX_IMAGE_SIZE:
        w, h = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif h > w and h > MAX_IMAGE_SIZE:
        h, w = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    return max(h, 1), max(w, 1)


def _resize(image: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), resample=resample))


def preprocess(image: Image.Image, cfg: dict) -> tuple[np.ndarray, int, int]:
    """Crops of max_image_size (row-major) plus the global view: pixel_values [crops, 3, m, m], rows, cols."""
    rgb = np.asarray(image.convert("RGB"))
    m, resample = cfg["max_image_size"], cfg["resample"]
    rgb = _resize(rgb, *_fit_longest(*rgb.shape[:2], cfg["longest_edge"]), resample)
    if cfg["do_image_splitting"]:
        h, w = rgb.shape[:2]
        if w >= h:
            w = math.ceil(w / m) * m
            h = math.ceil(int(w / (rgb.shape[1] / rgb.shape[0])) / m) * m
        else:
            h = math.ceil(h / m) * m
            w = math.ceil(int(h * (rgb.shape[1] / rgb.shape[0])) / m) * m
        rgb = _resize(rgb, h, w, resample)
        h, w = rgb.shape[:2]
        if h > m or w > m:
            rows, cols = (h - m) // m + 1, (w - m) // m + 1
            frames = [rgb[r * m:(r + 1) * m, c * m:(c + 1) * m] for r in range(rows) for c in range(cols)]
            frames.append(_resize(rgb, m, m, resample))
        else:
            rows, cols, frames = 0, 0, [rgb]
    else:
        rows, cols, frames = 0, 0, [_resize(rgb, m, m, resample)]
    mean, std = np.asarray(cfg["image_mean"], np.float32), np.asarray(cfg["image_std"], np.float32)
    pixels = [((f.astype(np.float64) * cfg["rescale_factor"]).astype(np.float32) - mean) / std for f in frames]
    return np.stack([p.transpose(2, 0, 1) for p in pixels]), rows, cols


def image_text(rows: int, cols: int, cfg: dict) -> str:
    """What the one `<image>` becomes: the crop grid's tokens, exactly as Idefics3Processor writes them."""
    run = "<image>" * cfg["image_seq_len"]
    glob = f"<fake_token_around_image><global-img>{run}<fake_token_around_image>"
    if rows == 0 and cols == 0:
        return glob
    return "".join("".join(f"<fake_token_around_image><row_{r + 1}_col_{c + 1}>{run}" for c in range(cols)) + "\n"
                   for r in range(rows)) + "\n" + glob


def prepare_inputs(prompt: Prompt, image: Image.Image, cfg: dict, tokenizer: Tokenizer) -> tuple[list[int], dict]:
    """Token ids of the expanded prompt, and the crops for the vision graph."""
    pixel_values, rows, cols = preprocess(image, cfg)
    expanded = prompt.expand(cfg["image_token_id"], tokenizer.markers(image_text(rows, cols, cfg)))
    return tokenizer.encode_prompt(expanded, add_special_tokens=True), {"pixel_values": pixel_values}


def image_features(vision_output: np.ndarray, inputs: dict, cfg: dict, arrays: dict) -> np.ndarray:
    """Crop features in crop order, one row per <image> token."""
    return vision_output.reshape(-1, vision_output.shape[-1])


# ---------------------------------------------------------------- the memory planner's bounds
def max_crops(cfg: dict) -> int:
    """The tiles of the largest resized image, plus the global view (one crop where nothing is split)."""
    per_side = -(-cfg["longest_edge"] // cfg["max_image_size"])
    return 1 if per_side == 1 or not cfg["do_image_splitting"] else 1 + per_side * per_side


def max_image_tokens(cfg: dict, tokens_per_crop: int) -> int:
    """Every crop's tokens and the markers around it (<fake_token_around_image>, its <row_r_col_c> or
    <global-img>, the closing one on the global view, a newline per row): an upper bound over image sizes."""
    return max_crops(cfg) * (tokens_per_crop + MARKERS_PER_CROP)


def within(cfg: dict, max_tokens: int, tokens_per_crop: int) -> dict:
    """`cfg` with the longest resized edge cut (in whole crops, down to one crop without splitting) until no
    image takes more than `max_tokens` prompt positions; UsageError when even one crop takes more."""
    m = cfg["max_image_size"]
    for per_side in range(-(-cfg["longest_edge"] // m), 0, -1):
        trial = {**cfg, "longest_edge": min(per_side * m, cfg["longest_edge"])}
        if max_image_tokens(trial, tokens_per_crop) <= max_tokens:
            return trial
    least = max_image_tokens({**cfg, "longest_edge": m}, tokens_per_crop)
    raise UsageError(f"max image tokens {max_tokens}: one crop of this model takes up to {least} positions; give "
                     "at least that")
