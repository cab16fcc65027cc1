"""Reading images from whatever a caller has (path, pipe, bytes, PIL image, numpy array) into 8-bit RGB.

Every failure is an ImageError with one line saying what was wrong. Odd modes are normalised the
way a user expects: alpha is composited on white (as HF's convert_rgb does), 16-bit and float
images are scaled to 8 bits, CMYK and palettes are converted, EXIF rotation is applied.

No image can exhaust memory. A file's size is read from its header and checked against `max_pixels`
before anything is decoded (a JPEG is first told to decode at 1/2, 1/4 or 1/8 scale, and the size it
will decode to is what counts); the decoded frame is then converted and downscaled to MAX_SIDE a band
of rows at a time, so no second full-size copy is ever made. Arrays and PIL images handed in are held
to the same limit and converted the same way. Pipes and standard input are read up to MAX_STREAM_BYTES.
"""

from __future__ import annotations

import io
import math
import os
import stat
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from edgevlm.errors import ImageError, first_line

MAX_SIDE = 4096  # larger images are downscaled on load; every supported model works far below this
# The most pixels a frame may decode to. A file is decoded whole before it is downscaled (JPEG aside), at up to
# 4 bytes a pixel in Pillow: 8192x8192 is 268 MB. Loading such a PNG raises peak RSS by 325 MB (RGB) or 331 MB
# (RGBA); decoded whole and then converted and thumbnailed, it took 770 and 963 MB. Pillow itself refuses files
# over 2 x PIL.Image.MAX_IMAGE_PIXELS (179 MP) at open, so a larger max_pixels does not reach past that.
MAX_PIXELS = 8192 * 8192
# Standard input and pipes cannot be read lazily as a file is: their bytes are held whole while decoding.
MAX_STREAM_BYTES = 256_000_000
# Source pixels converted at a time: a conversion's temporaries (float64 for 16-bit and float frames) stay
# a few MB, whatever the frame's size.
BAND_PIXELS = 1 << 18

ImageInput = Union[str, os.PathLike, bytes, bytearray, "Image.Image", np.ndarray]

# EXIF orientation -> the transpose that makes the frame upright (as PIL.ImageOps.exif_transpose does)
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def load_image(source: ImageInput, *, bgr: bool = False, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Return an RGB PIL image at most MAX_SIDE pixels a side. `bgr=True` says a numpy array is in OpenCV's BGR
    channel order. A frame of more than `max_pixels` pixels is refused, a file's before it is decoded (a file
    over twice PIL.Image.MAX_IMAGE_PIXELS is refused by Pillow itself, whatever `max_pixels` says)."""
    if isinstance(source, Image.Image):
        return _from_pil(source, "the image", max_pixels)
    if isinstance(source, np.ndarray):
        return _from_array(source, bgr, max_pixels)
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageError("the image data is empty (0 bytes)")
        return _from_file(io.BytesIO(source), "the image data", max_pixels)
    if isinstance(source, (str, os.PathLike)):
        text = str(source)
        if text.startswith(("http://", "https://")):
            raise ImageError(f"{text}: URLs are not fetched (edgevlm works offline); download the image first")
        return _from_path(Path(text.removeprefix("file://")), max_pixels)
    raise ImageError(f"unsupported image type {type(source).__name__}; pass a path, bytes, PIL image or array")


def read_stream(stream: BinaryIO, name: str) -> bytes:
    """Every byte of a pipe (standard input, a FIFO), refusing more than MAX_STREAM_BYTES in one line."""
    buf = io.BytesIO()  # its getvalue() hands over the buffer: the bytes are held once
    try:
        while chunk := stream.read(1 << 20):
            if buf.tell() + len(chunk) > MAX_STREAM_BYTES:
                raise ImageError(f"{name} holds more than the {MAX_STREAM_BYTES / 1e6:g} MB of image data read "
                                 "from a pipe; save the image to a file and pass its path")
            buf.write(chunk)
    except OSError as e:
        raise ImageError(f"{name} cannot be read ({e.strerror or e})") from None
    if not buf.tell():
        raise ImageError(f"{name} is empty (0 bytes)")
    return buf.getvalue()


def _from_path(path: Path, max_pixels: int) -> Image.Image:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except OSError as e:
        raise ImageError(f"{path} cannot be read ({e.strerror or e})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageError(f"{path} is a directory, not an image")
    regular = stat.S_ISREG(info.st_mode)
    if regular and info.st_size == 0:
        raise ImageError(f"{path} is empty (0 bytes)")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ImageError(f"{path} cannot be read ({e.strerror or e})") from None
    with f:
        if regular:  # Pillow reads what it needs: the header first, the pixels only once the size is accepted
            return _from_file(f, str(path), max_pixels)
        # a pipe or device (/dev/stdin, <(cat img.png)) has no size until read, and Pillow must seek in its bytes
        return _from_file(io.BytesIO(read_stream(f, str(path))), str(path), max_pixels)


def _from_file(fp: BinaryIO, name: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():  # Pillow warns between MAX_IMAGE_PIXELS and twice that; max_pixels decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(fp)  # the header only
        w, h = image.size
        if max(w, h) > MAX_SIDE:
            # JPEG decodes at 1/2, 1/4 or 1/8 scale: cheap, and the frame is never held at full size
            image.draft("RGB", _fit(w, h, MAX_SIDE))
    except Exception as e:  # any of Pillow's decode errors: see _unreadable
        raise _unreadable(name, e) from None
    _check_size(image.size, max_pixels, name, declared=(w, h))
    try:
        image.load()
    except Exception as e:  # any of Pillow's decode errors: see _unreadable
        raise _unreadable(name, e) from None
    return _finish(image, _upright(image), name, own=True)


def _from_pil(image: Image.Image, name: str, max_pixels: int) -> Image.Image:
    _check_size(image.size, max_pixels, name)
    try:
        image.load()  # a lazily opened file decodes here, its size already accepted
    except Exception as e:  # any of Pillow's decode errors: see _unreadable
        raise _unreadable(name, e) from None
    return _finish(image, _upright(image), name, own=False)


def _unreadable(name: str, e: Exception) -> ImageError:
    """Pillow's decoders raise a dozen types on malformed input (OSError, SyntaxError, EOFError, struct.error,
    IndexError, ...): each means the same to the caller, this file cannot be read."""
    if isinstance(e, Image.DecompressionBombError):
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        return ImageError(f"{name} has more than the {limit:,} pixels Pillow opens (twice "
                          "PIL.Image.MAX_IMAGE_PIXELS); downscale it first")
    if isinstance(e, UnidentifiedImageError):
        return ImageError(f"{name} is not an image file Pillow can read")
    if isinstance(e, MemoryError):
        return ImageError(f"{name} does not fit in the memory available once decoded; downscale it first")
    return ImageError(f"{name} is corrupt or truncated ({first_line(e)})")


def _check_size(size: tuple[int, int], max_pixels: int, name: str, declared: tuple[int, int] | None = None) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"{name} has no pixels ({w}x{h})")
    if w * h > max_pixels:
        scaled = f" (decoded at reduced scale: {w}x{h})" if declared and declared != size else ""
        dw, dh = declared or size
        raise ImageError(f"{name} is {dw}x{dh} pixels{scaled}, more than the {max_pixels:,} accepted; "
                         "downscale it first")


def _upright(image: Image.Image) -> Image.Transpose | None:
    """The transpose its EXIF orientation asks for, read once the pixels are loaded (reading it may load them)."""
    try:
        return _UPRIGHT.get(image.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # a broken EXIF block (any of Pillow's parse errors) is no reason to refuse the pixels
        return None


def _finish(image: Image.Image, upright: Image.Transpose | None, name: str, *, own: bool) -> Image.Image:
    """`image` in RGB, at most MAX_SIDE a side, upright. `own`: it is ours, and returned as is if it can be."""
    w, h = image.size
    target = _fit(w, h, MAX_SIDE) if max(w, h) > MAX_SIDE else (w, h)
    if own and image.mode == "RGB" and target == (w, h):
        out = image
    else:
        out = _resample((w, h), target, _pil_bands(image, name))
    # turned after the downscale, so the transpose copies the small frame, not the decoded one
    return out.transpose(upright) if upright is not None else out


def _fit(w: int, h: int, side: int) -> tuple[int, int]:
    scale = side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _from_array(a: np.ndarray, bgr: bool, max_pixels: int) -> Image.Image:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or a.size == 0:
        raise ImageError(f"an image array must be HxW, HxWx3 or HxWx4, got shape {a.shape}")
    if a.dtype.kind not in "buif":  # not timedelta64 either, which numpy counts as an integer
        raise ImageError(f"unsupported image array dtype {a.dtype}; pass uint8, uint16, float or bool pixels")
    h, w = a.shape[:2]
    _check_size((w, h), max_pixels, "the array")
    # the range of floats and wide ints is inferred from all the data, so every band is scaled alike
    fixed = a.dtype == np.bool_ or (a.dtype.kind == "u" and a.dtype.itemsize <= 2)
    peak = None if fixed else max(_peak(a[t:b]) for t, b in _bands(w, h))
    order = [2, 1, 0, 3][: a.shape[2]] if bgr and a.ndim == 3 else None

    def band(top: int, bottom: int) -> Image.Image:
        rows = _to_uint8(a[top:bottom], peak)
        if order is not None:
            rows = rows[:, :, order]
        return _to_rgb(Image.fromarray(np.ascontiguousarray(rows)), None, "the array")

    return _resample((w, h), _fit(w, h, MAX_SIDE) if max(w, h) > MAX_SIDE else (w, h), band)


def _pil_bands(image: Image.Image, name: str) -> Callable[[int, int], Image.Image]:
    w, h = image.size
    peak = None
    if image.mode in ("I", "F"):  # their range is inferred from the data, so from all of it
        peak = max(_peak(np.asarray(image.crop((0, t, w, b)))) for t, b in _bands(w, h))
    return lambda top, bottom: _to_rgb(image.crop((0, top, w, bottom)), peak, name)


def _bands(w: int, h: int) -> Iterator[tuple[int, int]]:
    rows = max(1, BAND_PIXELS // w)
    for top in range(0, h, rows):
        yield top, min(h, top + rows)


def _resample(size: tuple[int, int], target: tuple[int, int], band: Callable[[int, int], Image.Image]) -> Image.Image:
    """The frame at `target` size, built from bands: `band(top, bottom)` is source rows [top, bottom) in RGB.
    Only the output and one band are held beside the source."""
    (w, h), (tw, th) = size, target
    out = Image.new("RGB", target)
    if target == size:
        for top, bottom in _bands(w, h):
            out.paste(band(top, bottom), (0, top))
        return out
    sy = h / th
    # An output row reads the source rows within bicubic's support (2 x the scale) of it: each band brings that
    # margin, so the bands join as one resize would (tested to within 1 level in 10^4 pixels).
    margin = math.ceil(2 * sy) + 1
    step = max(1, round(BAND_PIXELS / (w * sy)))
    for oy in range(0, th, step):
        oy1 = min(th, oy + step)
        y0, y1 = oy * sy, min(h, oy1 * sy)
        top, bottom = max(0, math.floor(y0) - margin), min(h, math.ceil(y1) + margin)
        rows = band(top, bottom).resize((tw, oy1 - oy), Image.Resampling.BICUBIC, box=(0, y0 - top, w, y1 - top))
        out.paste(rows, (0, oy))
    return out


def _peak(a: np.ndarray) -> float:
    """The largest finite value (-inf if none): what a frame's range is inferred from when its dtype says nothing."""
    if a.dtype.kind == "f":
        a = a[np.isfinite(a)]
    return float(a.max()) if a.size else -math.inf


def _to_uint8(a: np.ndarray, peak: float | None = None) -> np.ndarray:
    """8-bit pixels; `peak` is the whole frame's (_peak) when `a` is a band of it."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype.kind == "f":
        peak = _peak(a) if peak is None else peak
        scale = 255.0 if peak <= 1.0 else 1.0  # [0, 1] floats, else already 0..255
        if a.dtype.itemsize < 4:
            a = a.astype(np.float32)  # float16 overflows long before the clip below
        # clipped before scaling, so a huge value never overflows to inf
        return (np.clip(np.nan_to_num(a), 0, 255 / scale) * scale).round().astype(np.uint8)
    if a.dtype.kind in "iu":
        if a.dtype.kind == "u" and a.dtype.itemsize == 2:
            bits = 16  # the dtype says the range, even for a dark frame
        else:  # PIL's "I" mode and wide ints: infer the range from the data
            peak = _peak(a) if peak is None else peak
            bits = 8 if peak <= 255 else 16 if peak < 65536 else 32
        if bits == 8:
            return np.clip(a, 0, 255).astype(np.uint8)
        top = 2**bits - 1
        return (np.clip(a, 0, top).astype(np.float64) / top * 255).round().astype(np.uint8)
    raise ImageError(f"unsupported image array dtype {a.dtype}; pass uint8, uint16, float or bool pixels")


def _to_rgb(image: Image.Image, peak: float | None, name: str) -> Image.Image:
    mode = image.mode
    try:
        if mode.startswith("I") or mode == "F":  # 16/32-bit integer or float grey
            a = np.asarray(image)
            image = Image.fromarray(_to_uint8(a.astype(np.uint16) if mode.startswith("I;16") else a, peak))
        if mode == "La":  # premultiplied grey: Pillow converts it to LA and to nothing else
            image = image.convert("LA")
        if image.mode in ("RGBA", "LA", "PA", "RGBa") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image if image.mode == "RGB" else image.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(f"{name} has {mode} pixels, which cannot be made RGB ({first_line(e)})") from None
