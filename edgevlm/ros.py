"""ROS image messages without ROS: `sensor_msgs/Image` and `CompressedImage` as frames the pipeline reads.

Any object with the messages' fields works (rclpy's, rosbags' deserialized ones, a dataclass): an Image's
height, width, encoding, is_bigendian, step and data; a CompressedImage's format and data. Rows padded past
width * pixel size (`step`) are cut, 16-bit data is read in the message's byte order, and every size is checked
against the data before anything is copied: a malformed message is a one-line ImageError.
"""

from __future__ import annotations

import numpy as np

from edgevlm.errors import ImageError
from edgevlm.images import MAX_PIXELS

# encoding -> (channels, numpy dtype, channel order to RGB(A) or None)
ENCODINGS = {
    "rgb8": (3, np.uint8, None), "bgr8": (3, np.uint8, [2, 1, 0]),
    "rgba8": (4, np.uint8, None), "bgra8": (4, np.uint8, [2, 1, 0, 3]),
    "mono8": (1, np.uint8, None), "8uc1": (1, np.uint8, None),
    "mono16": (1, np.uint16, None), "16uc1": (1, np.uint16, None),
    "rgb16": (3, np.uint16, None), "bgr16": (3, np.uint16, [2, 1, 0]),
}


def frame(msg) -> np.ndarray | bytes:
    """The image a message carries: an HxW or HxWxC array (RGB order) for a raw Image, the encoded bytes for a
    CompressedImage (JPEG or PNG; edgevlm.images decodes them with its checks)."""
    if hasattr(msg, "format") and not hasattr(msg, "encoding"):
        return _compressed(msg)
    return _raw(msg)


def _compressed(msg) -> bytes:
    fmt = str(msg.format).lower()
    if not any(kind in fmt for kind in ("jpeg", "jpg", "png")):
        raise ImageError(f"CompressedImage format {msg.format!r}: only JPEG and PNG are read")
    return bytes(np.asarray(msg.data, dtype=np.uint8))


def _raw(msg) -> np.ndarray:
    encoding = str(msg.encoding).lower()
    if encoding not in ENCODINGS:
        raise ImageError(f"Image encoding {msg.encoding!r} is not read; use one of: {', '.join(ENCODINGS)}")
    channels, dtype, order = ENCODINGS[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise ImageError(f"Image is {width}x{height}: no pixels")
    if height * width > MAX_PIXELS:
        raise ImageError(f"Image is {width}x{height}, over the {MAX_PIXELS}-pixel limit")
    row = width * channels * np.dtype(dtype).itemsize
    if step < row:
        raise ImageError(f"Image step {step} is shorter than a row of {width} {encoding} pixels ({row} bytes)")
    data = np.asarray(msg.data, dtype=np.uint8).reshape(-1)
    if data.size < step * (height - 1) + row:
        raise ImageError(f"Image data has {data.size} bytes; {width}x{height} {encoding} at step {step} needs "
                         f"{step * (height - 1) + row}")
    rows = np.lib.stride_tricks.as_strided(data, (height, row), (step, 1))  # each row without its padding
    kind = np.dtype(dtype).newbyteorder(">" if msg.is_bigendian else "<") if dtype is np.uint16 else dtype
    pixels = np.ascontiguousarray(rows).view(kind).reshape(height, width, channels)
    if order is not None:
        pixels = pixels[..., order]
    pixels = pixels.astype(dtype, copy=False) if dtype is np.uint8 else pixels.astype(np.uint16)
    return pixels[..., 0] if channels == 1 else pixels
