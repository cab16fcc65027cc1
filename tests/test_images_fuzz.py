"""load_image on arbitrary input (property-based): an RGB image within the limits, or one ImageError line.

Never another exception, never a hang. The pixel limit is kept small here so that a header claiming a large
frame is refused at once and nothing large is ever allocated; test_images.py checks the default limit.
"""

import io
import os
import struct
import time
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from edgevlm.errors import ImageError
from edgevlm.images import MAX_SIDE, load_image

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on the corrupt files fed to it

LIMIT = 1 << 16
SLOW = 30  # seconds: far beyond any example here on a 2-core machine; a decoder stuck in a loop would pass it
# EDGEVLM_FUZZ_EXAMPLES=5000 for a deeper search than CI's
FUZZ = settings(max_examples=int(os.environ.get("EDGEVLM_FUZZ_EXAMPLES", 120)), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def _holds(source, **options) -> Image.Image | None:
    """The property: a usable RGB image within the limits, or one ImageError line; the result, if any."""
    max_pixels = options.setdefault("max_pixels", LIMIT)
    start = time.perf_counter()
    try:
        img = load_image(source, **options)
    except ImageError as e:
        message = str(e)
        assert message.strip() and "\n" not in message and "\r" not in message, repr(message)
        img = None
    else:
        assert img.mode == "RGB" and 1 <= min(img.size) and max(img.size) <= MAX_SIDE
        assert img.width * img.height <= max_pixels
        assert len(img.tobytes()) == img.width * img.height * 3
    assert time.perf_counter() - start < SLOW
    return img


def _encoded(fmt: str, mode: str, **params) -> bytes:
    a = np.random.default_rng(0).integers(0, 255, (24, 37, 4), dtype=np.uint8)
    image = Image.fromarray(a, "RGBA").convert(mode)
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def _png16() -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.arange(24 * 37, dtype=np.uint16) * 71).reshape(24, 37)).save(buf, "PNG")
    return buf.getvalue()


SAMPLES = {
    "png-rgb": _encoded("PNG", "RGB"),
    "png-rgba": _encoded("PNG", "RGBA"),
    "png-palette": _encoded("PNG", "P"),
    "png-16bit": _png16(),
    "jpeg": _encoded("JPEG", "RGB", quality=80),
    "jpeg-progressive": _encoded("JPEG", "L", progressive=True),
    "jpeg-cmyk": _encoded("JPEG", "CMYK"),
    "gif": _encoded("GIF", "P"),
    "bmp": _encoded("BMP", "RGB"),
    "tiff": _encoded("TIFF", "RGBA"),
    "tiff-deflate": _encoded("TIFF", "RGB", compression="tiff_adobe_deflate"),
    "webp": _encoded("WEBP", "RGBA", quality=70),
    "webp-lossless": _encoded("WEBP", "RGB", lossless=True),
}
MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*",
         b"RIFF\x00\x00\x00\x00WEBPVP8 "]


def test_the_samples_load():
    for name, data in SAMPLES.items():
        assert _holds(data) is not None, name


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data):
    _holds(data)


@FUZZ
@given(st.sampled_from(MAGIC), st.binary(max_size=2048))
def test_random_bytes_after_a_format_signature(magic, rest):
    _holds(magic + rest)


@FUZZ
@given(st.sampled_from(sorted(SAMPLES)), st.floats(0, 1),
       st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=6))
def test_truncated_and_corrupted_real_files(name, keep, flips):
    data = bytearray(SAMPLES[name][: round(len(SAMPLES[name]) * keep)])
    for where, value in flips:
        if data:
            data[int(where * len(data))] = value
    _holds(bytes(data))


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@FUZZ
@given(width=st.one_of(st.integers(0, 300), st.integers(0, 2**31 - 1)),
       height=st.one_of(st.integers(0, 300), st.integers(0, 2**31 - 1)),
       depth=st.sampled_from([1, 2, 4, 8, 16, 3, 0, 255]), color=st.sampled_from([0, 2, 3, 4, 6, 1, 7]),
       interlace=st.sampled_from([0, 1, 2]), palette=st.booleans(), body=st.binary(max_size=512),
       compress=st.booleans(), max_pixels=st.sampled_from([LIMIT, 1000, 1]))
def test_pngs_with_any_header(width, height, depth, color, interlace, palette, body, compress, max_pixels):
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, interlace)
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
    if palette:
        data += _chunk(b"PLTE", bytes(range(48)))
    data += _chunk(b"IDAT", zlib.compress(body) if compress else body) + _chunk(b"IEND", b"")
    _holds(data, max_pixels=max_pixels)


_SHAPES = st.one_of(
    hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=24),
    st.tuples(st.integers(1, 3), st.integers(MAX_SIDE - 2, MAX_SIDE + 900)),  # long and thin: downscaled
    st.tuples(st.integers(MAX_SIDE + 1, MAX_SIDE + 900), st.integers(1, 2), st.sampled_from([1, 3, 4])),
)
_DTYPES = st.one_of(hnp.scalar_dtypes(), hnp.integer_dtypes(endianness="?"), hnp.floating_dtypes(endianness="?"),
                    hnp.unsigned_integer_dtypes(endianness="?"))


@FUZZ
@given(a=hnp.arrays(_DTYPES, _SHAPES), bgr=st.booleans(), max_pixels=st.sampled_from([LIMIT, 50]))
def test_arrays_of_any_shape_and_dtype(a, bgr, max_pixels):
    _holds(a, bgr=bgr, max_pixels=max_pixels)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "La", "P", "PA", "I", "I;16", "I;16B", "I;16L", "F", "RGB", "RGBA",
                                  "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"])
def test_pil_images_of_every_mode_become_rgb(mode):
    assert _holds(Image.new(mode, (5, 3))).size == (5, 3)
    assert _holds(Image.new(mode, (MAX_SIDE + 7, 2))).size == (MAX_SIDE, 2)
