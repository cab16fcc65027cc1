"""LLaVA-OneVision (the paper's extractor architecture): SigLIP tower, 2-layer MLP projector, AnyRes crops.

The released extractors use the LLaVA-NeXT `qwen_1_5` conversation, whose default system prompt
every prompt of this family starts with.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from edgevlm import prompts
from edgevlm.errors import UsageError
from edgevlm.families import Family
from edgevlm.tokenizer import Part, Prompt, Tokenizer

MODEL_TYPES = ("llava_onevision",)
FAMILY = Family(name="llava_onevision", vision=True, system_prompt=prompts.QWEN_1_5_SYSTEM, image_token="<image>")
GRAPHS = ("vision", "embed", "decoder")
VISION_MODULES = ("vision_tower", "multi_modal_projector")
ARRAYS = ("image_newline",)  # the learned row separator (numpy, in the bundle)
PREPROCESS_SCHEMA = {
    "allOf": [
        {"$ref": "#/$defs/image_common"},
        {
            "type": "object",
            "required": ["crop_size", "patch_size", "image_grid_pinpoints", "num_image_tokens", "vision_aspect_ratio",
                         "vision_feature_select_strategy"],
            "additionalProperties": False,
            "properties": {
                "resample": True, "rescale_factor": True, "image_mean": True, "image_std": True, "image_token_id": True,
                "crop_size": {"$ref": "#/$defs/pair", "description": "[height, width] of one crop"},
                "patch_size": {"$ref": "#/$defs/positive"},
                "image_grid_pinpoints": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/pair"}},
                "num_image_tokens": {"$ref": "#/$defs/positive"},
                "vision_aspect_ratio": {"type": "string", "pattern": "^anyres_max_[0-9]{1,6}$",
                                        "description": "anyres_max_N"},
                "vision_feature_select_strategy": {"enum": ["default", "full"]},
            },
        },
    ],
}
PROCESSOR_CONFIG = "processor_config.json"


# ---------------------------------------------------------------- runtime preprocessing (numpy, no torch)
# These reproduce transformers' LlavaOnevisionImageProcessor(Pil), processor and `pack_image_features`
# exactly (tests compare them); the ONNX backend uses them, the reference backend uses HF's own.


def preprocess_config(model_dir: str | Path) -> dict:
    """What the runtime needs to prepare images and place their features, from a HF checkpoint directory."""
    model_dir = Path(model_dir)
    image = json.loads((model_dir / "preprocessor_config.json").read_text())
    processor_path = model_dir / PROCESSOR_CONFIG
    processor = json.loads(processor_path.read_text()) if processor_path.exists() else {}
    config = json.loads((model_dir / "config.json").read_text())
    vision = config["vision_config"]
    size = image.get("size", {"height": 384, "width": 384})
    return {
        "crop_size": [int(size["height"]), int(size["width"])],
        "patch_size": int(vision["patch_size"]),
        "image_grid_pinpoints": config.get("image_grid_pinpoints") or image["image_grid_pinpoints"],
        "resample": int(image.get("resample", 3)),
        "rescale_factor": float(image.get("rescale_factor", 1 / 255)),
        "image_mean": [float(x) for x in image["image_mean"]],
        "image_std": [float(x) for x in image["image_std"]],
        "num_image_tokens": int(processor.get("num_image_tokens")
                                or (vision["image_size"] // vision["patch_size"]) ** 2),
        "vision_aspect_ratio": config.get("vision_aspect_ratio", "anyres_max_9"),
        "vision_feature_select_strategy": config.get("vision_feature_select_strategy", "full"),
        "image_token_id": int(config["image_token_index"]),
    }


def select_best_resolution(size: tuple[int, int], pinpoints: list) -> tuple[int, int]:
    """The pinpoint keeping the most of the image's resolution, then wasting the least (LLaVA-NeXT's rule)."""
    h, w = size
    best, best_effective, best_waste = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / w, ph / h)
        effective = min(int(w * scale) * int(h * scale), w * h)
        waste = ph * pw - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (ph, pw), effective, waste
    return best


def _resize(image: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    # HF resizes uint8 HWC through PIL; the same call gives the same pixels
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), resample=resample))


def _normalize(image: np.ndarray, cfg: dict) -> np.ndarray:
    x = (image.astype(np.float64) * cfg["rescale_factor"]).astype(np.float32)
    x = (x - np.asarray(cfg["image_mean"], np.float32)) / np.asarray(cfg["image_std"], np.float32)
    return x.transpose(2, 0, 1)


def preprocess(image: Image.Image, cfg: dict) -> tuple[np.ndarray, tuple[int, int]]:
    """AnyRes: the whole image at crop size, then crops of it resized to the best pinpoint.

    Returns pixel_values [1 + crops, 3, crop_h, crop_w] float32 and the original (height, width).
    """
    rgb = np.asarray(image.convert("RGB"))
    h, w = rgb.shape[:2]
    ch, cw = cfg["crop_size"]
    resample = cfg["resample"]
    target_h, target_w = select_best_resolution((h, w), cfg["image_grid_pinpoints"])
    # resize keeping the aspect ratio (ceil, as HF's get_patch_output_size), then pad centred with zeros
    scale_w, scale_h = target_w / w, target_h / h
    if scale_w < scale_h:
        new_w, new_h = target_w, min(math.ceil(h * scale_w), target_h)
    else:
        new_h, new_w = target_h, min(math.ceil(w * scale_h), target_w)
    resized = _resize(rgb, new_h, new_w, resample)
    top, left = (target_h - new_h) // 2, (target_w - new_w) // 2
    padded = np.zeros((target_h, target_w, 3), np.uint8)
    padded[top:top + new_h, left:left + new_w] = resized
    crops = [_resize(rgb, ch, cw, resample)]
    crops += [padded[i:i + ch, j:j + cw] for i in range(0, target_h, ch) for j in range(0, target_w, cw)]
    return np.stack([_normalize(_resize(c, ch, cw, resample), cfg) for c in crops]), (h, w)


def _unpadded_grid(h: int, w: int, grid_h: int, grid_w: int) -> tuple[int, int, int, int]:
    """Rows/cols of the crop-feature grid that hold image rather than padding: (top, bottom, left, right)."""
    if w / h > grid_w / grid_h:
        new_h = int(round(h * (grid_w / w), 7))
        pad = (grid_h - new_h) // 2
        return pad, grid_h - pad, 0, grid_w
    new_w = int(round(w * (grid_h / h), 7))
    pad = (grid_w - new_w) // 2
    return 0, grid_h, pad, grid_w - pad


def _layout(size: tuple[int, int], cfg: dict) -> tuple[int, int, int, tuple[int, int, int, int], float]:
    """Feature-grid side per crop, crop rows and cols, the unpadded box, and the anyres_max downsampling ratio."""
    side = int(math.isqrt(cfg["num_image_tokens"]))
    target_h, target_w = select_best_resolution(size, cfg["image_grid_pinpoints"])
    rows, cols = target_h // cfg["crop_size"][0], target_w // cfg["crop_size"][1]
    box = _unpadded_grid(size[0], size[1], rows * side, cols * side)
    max_patches = int(cfg["vision_aspect_ratio"].removeprefix("anyres_max_"))
    ratio = math.sqrt((box[1] - box[0]) * (box[3] - box[2]) / (max_patches * side**2))
    return side, rows, cols, box, ratio


def num_image_tokens(size: tuple[int, int], cfg: dict) -> int:
    """How many <image> tokens one image of `size` (height, width) becomes."""
    _, _, _, box, ratio = _layout(size, cfg)
    cur_h, cur_w = box[1] - box[0], box[3] - box[2]
    if ratio > 1.1:
        cur_h, cur_w = int(cur_h // ratio), int(cur_w // ratio)
    n = cur_h * cur_w + cur_h + cfg["num_image_tokens"]  # unpadded grid + a newline per row + the base crop
    return n - 1 if cfg["vision_feature_select_strategy"] == "default" else n


def pack_features(features: np.ndarray, size: tuple[int, int], newline: np.ndarray, cfg: dict) -> np.ndarray:
    """[1 + crops, tokens, hidden] vision features -> [num_image_tokens, hidden] in prompt order:
    the base crop, then the crop grid stitched, unpadded, downsampled past anyres_max, a newline per row."""
    side, rows, cols, (top, bottom, left, right), ratio = _layout(size, cfg)
    base, grid = features[0], features[1:]
    hidden = grid.shape[-1]
    grid = grid.reshape(rows, cols, side, side, hidden).transpose(4, 0, 2, 1, 3).reshape(hidden, rows * side,
                                                                                         cols * side)
    grid = grid[:, top:bottom, left:right]
    if ratio > 1.1:
        grid = interpolate_bilinear(grid, int(grid.shape[1] // ratio), int(grid.shape[2] // ratio))
    grid = np.concatenate([grid, np.broadcast_to(newline[:, None, None], (hidden, grid.shape[1], 1))], axis=2)
    return np.concatenate([base, grid.reshape(hidden, -1).T], axis=0)


def interpolate_bilinear(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """torch.nn.functional.interpolate(mode="bilinear", align_corners=False) on float32 [C, H, W], computed in
    torch's order (float32 source indices; width pass inside the height pass) so results agree to rounding."""
    x = x.astype(np.float32, copy=False)

    def axis(n_in: int, n_out: int):
        scale = np.float64(np.float32(n_in / n_out))  # a float scale, applied in double as torch's C++ does
        src = np.maximum(scale * (np.arange(n_out) + 0.5) - 0.5, 0).astype(np.float32)
        lo = np.minimum(src.astype(np.int64), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = (src - lo).astype(np.float32)
        return lo, hi, np.float32(1) - frac, frac

    h0, h1, hl0, hl1 = axis(x.shape[1], out_h)
    w0, w1, wl0, wl1 = axis(x.shape[2], out_w)
    rows0, rows1 = x[:, h0], x[:, h1]
    top = wl0 * rows0[:, :, w0] + wl1 * rows0[:, :, w1]
    bottom = wl0 * rows1[:, :, w0] + wl1 * rows1[:, :, w1]
    return hl0[None, :, None] * top + hl1[None, :, None] * bottom


def prepare_inputs(prompt: Prompt, image: Image.Image, cfg: dict, tokenizer: Tokenizer) -> tuple[list[int], dict]:
    """Token ids with the image placeholder expanded, and what the vision graph and packing need."""
    pixel_values, size = preprocess(image, cfg)
    token = cfg["image_token_id"]
    run = Prompt((Part(tokenizer.decode([token], False), token),) * num_image_tokens(size, cfg))
    ids = tokenizer.encode_prompt(prompt.expand(token, run), add_special_tokens=True)
    return ids, {"pixel_values": pixel_values, "size": size}


def image_features(vision_output: np.ndarray, inputs: dict, cfg: dict, arrays: dict) -> np.ndarray:
    return pack_features(vision_output, inputs["size"], arrays["image_newline"], cfg)


# ---------------------------------------------------------------- the memory planner's bounds
def max_crops(cfg: dict) -> int:
    """The AnyRes grid's most crops, plus the base view."""
    crop = cfg["crop_size"]
    return 1 + max((w // crop[1]) * (h // crop[0]) for h, w in cfg["image_grid_pinpoints"])


def max_image_tokens(cfg: dict, tokens_per_crop: int) -> int:
    """The base crop's tokens, the grid's (pooled past anyres_max_N crops' worth, to at most 1.1^2 times that:
    pooling starts at a ratio of 1.1) and a newline per feature row: an upper bound of num_image_tokens over
    image sizes."""
    grid = max_crops(cfg) - 1
    pooled = min(grid, 1.21 * int(cfg["vision_aspect_ratio"].rsplit("_", 1)[1]))
    return tokens_per_crop + math.floor(pooled * tokens_per_crop) + grid * int(tokens_per_crop ** 0.5)


def within(cfg: dict, max_tokens: int, tokens_per_crop: int) -> dict:
    """`cfg` keeping only the AnyRes grids whose images stay within `max_tokens` prompt positions (an image then
    gets the best of those grids); UsageError when even the smallest grid takes more."""
    fits = [p for p in cfg["image_grid_pinpoints"]
            if max_image_tokens({**cfg, "image_grid_pinpoints": [p]}, tokens_per_crop) <= max_tokens]
    if not fits:
        least = min(max_image_tokens({**cfg, "image_grid_pinpoints": [p]}, tokens_per_crop)
                    for p in cfg["image_grid_pinpoints"])
        raise UsageError(f"max image tokens {max_tokens}: this model's smallest AnyRes grid takes up to {least} "
                         "positions an image; give at least that")
    return {**cfg, "image_grid_pinpoints": fits}
