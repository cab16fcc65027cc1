"""Reading images from whatever a caller has (path, bytes, PIL image, numpy array) into 8-bit RGB.

Every failure is an ImageError with one line saying what was wrong. Odd modes are normalised the
way a user expects: alpha is composited on white (as HF's convert_rgb does), 16-bit and float
images are scaled to 8 bits, CMYK and palettes are converted, EXIF rotation is applied. Very large
images are downscaled on load so a 100-megapixel frame cannot exhaust memory.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edgevlm.errors import ImageError

MAX_PIXELS = 400_000_000  # refuse anything larger: a decompression bomb, not a camera frame
MAX_SIDE = 4096  # larger images are downscaled on load; every supported model works far below this

ImageInput = Union[str, os.PathLike, bytes, bytearray, "Image.Image", np.ndarray]


def load_image(source: ImageInput, *, bgr: bool = False) -> Image.Image:
    """Return an RGB PIL image. `bgr=True` says a numpy array is in OpenCV's BGR channel order."""
    if isinstance(source, Image.Image):
        return _normalise(source, "image")
    if isinstance(source, np.ndarray):
        return _normalise(_from_array(source, bgr), "array")
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageError("the image data is empty (0 bytes)")
        return _open(io.BytesIO(source), "image data")
    if isinstance(source, (str, os.PathLike)):
        text = str(source)
        if text.startswith(("http://", "https://")):
            raise ImageError(f"{text}: URLs are not fetched (edgevlm works offline); download the image first")
        path = Path(text.removeprefix("file://"))
        if not path.exists():
            raise ImageError(f"{path}: no such file")
        if path.is_dir():
            raise ImageError(f"{path} is a directory, not an image")
        if path.stat().st_size == 0:
            raise ImageError(f"{path} is empty (0 bytes)")
        return _open(path, str(path))
    raise ImageError(f"unsupported image type {type(source).__name__}; pass a path, bytes, PIL image or array")


def _open(fp, name: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(fp)
            w, h = image.size
            if w * h > MAX_PIXELS:
                raise ImageError(f"{name} is {w}x{h} pixels, more than the {MAX_PIXELS // 10**6} MP accepted")
            if max(w, h) > MAX_SIDE:
                # JPEG can decode at 1/2, 1/4, 1/8 scale: cheap and light on memory for huge frames
                image.draft("RGB", _fit(w, h, MAX_SIDE))
            image.load()
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(f"{name} is larger than the {MAX_PIXELS // 10**6} MP accepted") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name} is not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name} is corrupt or truncated ({e})") from None
    return _normalise(image, name)


def _fit(w: int, h: int, side: int) -> tuple[int, int]:
    scale = side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _from_array(a: np.ndarray, bgr: bool) -> Image.Image:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or a.size == 0:
        raise ImageError(f"an image array must be HxW, HxWx3 or HxWx4, got shape {a.shape}")
    a = _to_uint8(a)
    if bgr and a.ndim == 3:
        a = a[:, :, [2, 1, 0, 3][: a.shape[2]]]
    return Image.fromarray(np.ascontiguousarray(a))


def _to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.floating):
        finite = a[np.isfinite(a)]
        peak = float(finite.max()) if finite.size else 0.0
        scale = 255.0 if peak <= 1.0 else 1.0  # [0, 1] floats, else already 0..255
        return np.clip(np.nan_to_num(a) * scale, 0, 255).round().astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer):
        if a.dtype == np.uint16:
            bits = 16  # the dtype says the range, even for a dark frame
        else:  # PIL's "I" mode and wide ints: infer the range from the data
            peak = int(a.max())
            bits = 8 if peak <= 255 else 16 if peak < 65536 else 32
        if bits == 8:
            return np.clip(a, 0, 255).astype(np.uint8)
        return (np.clip(a, 0, None).astype(np.float64) / (2**bits - 1) * 255).round().astype(np.uint8)
    raise ImageError(f"unsupported image array dtype {a.dtype}")


def _normalise(image: Image.Image, name: str) -> Image.Image:
    try:
        image = ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError):
        pass  # a broken EXIF block is no reason to refuse the pixels
    if image.width == 0 or image.height == 0:
        raise ImageError(f"{name} has no pixels ({image.width}x{image.height})")
    if max(image.size) > MAX_SIDE:
        image = image.copy()
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BICUBIC)
    mode = image.mode
    if mode.startswith("I") or mode == "F":  # 16/32-bit integer or float grey
        a = np.asarray(image)
        image = Image.fromarray(_to_uint8(a.astype(np.uint16) if mode.startswith("I;16") else a))
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if mode == "RGB" else image.convert("RGB")
