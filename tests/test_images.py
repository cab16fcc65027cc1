"""Reading odd images: every mode becomes 8-bit RGB the way a user expects; every bad input is one ImageError."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from edgevlm.errors import ImageError
from edgevlm.images import MAX_SIDE, load_image


def test_rgb_path_bytes_and_pil_give_the_same_pixels(tmp_path):
    a = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(a).save(path)
    for source in (path, str(path), path.read_bytes(), Image.fromarray(a), a):
        img = load_image(source)
        assert img.mode == "RGB" and img.size == (40, 30)
        np.testing.assert_array_equal(np.asarray(img), a)


def test_bgr_arrays_are_swapped_to_rgb():
    bgr = np.zeros((4, 4, 3), np.uint8)
    bgr[..., 0] = 200  # blue in OpenCV order
    assert np.asarray(load_image(bgr, bgr=True))[0, 0].tolist() == [0, 0, 200]
    assert np.asarray(load_image(bgr))[0, 0].tolist() == [200, 0, 0]


def test_grayscale_becomes_three_equal_channels():
    img = load_image(Image.new("L", (5, 3), 77))
    assert img.mode == "RGB" and np.asarray(img)[0, 0].tolist() == [77, 77, 77]


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (2, 1), (10, 20, 30, 255))
    rgba.putpixel((1, 0), (10, 20, 30, 0))
    px = np.asarray(load_image(rgba))
    assert px[0, 0].tolist() == [10, 20, 30] and px[0, 1].tolist() == [255, 255, 255]
    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0
    assert np.asarray(load_image(pal))[0].tolist() == [[255, 255, 255], [200, 100, 50]]


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    a = np.array([[0, 32896, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(a).save(path)  # a 16-bit grayscale PNG
    assert np.asarray(load_image(path))[0, :, 0].tolist() == [0, 128, 255]
    assert np.asarray(load_image(a))[0, :, 0].tolist() == [0, 128, 255]
    dark = np.array([[0, 200]], dtype=np.uint16)  # a dark 16-bit frame is still 16-bit
    assert np.asarray(load_image(dark))[0, :, 0].tolist() == [0, 1]


def test_float_arrays_in_unit_range_are_scaled():
    assert np.asarray(load_image(np.full((2, 2, 3), 0.5, np.float32)))[0, 0].tolist() == [128, 128, 128]


def test_cmyk_jpeg_is_converted(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path)  # pure red in CMYK
    r, g, b = np.asarray(load_image(path))[4, 4].tolist()
    assert r > 200 and g < 60 and b < 60


def test_exif_rotation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.new("RGB", (40, 20), (0, 128, 0)).save(path, exif=exif)
    assert load_image(path).size == (20, 40)


def test_tiny_images_are_accepted():
    assert load_image(Image.new("RGB", (1, 1), (1, 2, 3))).size == (1, 1)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_huge_images_are_downscaled_on_load(tmp_path, fmt):
    path = tmp_path / f"huge.{fmt.lower()}"
    Image.new("L", (12000, 9000), 90).save(path, fmt)
    img = load_image(path)
    assert max(img.size) == MAX_SIDE and img.size == (MAX_SIDE, 3072)
    assert img.mode == "RGB"


def _png_header_only(width, height) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_decompression_bombs_are_refused_before_decoding():
    with pytest.raises(ImageError, match="MP"):
        load_image(_png_header_only(30000, 30000))


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "no such file"),
    (lambda p: p.write_bytes(b""), "empty"),
    (lambda p: p.write_text("this is not an image"), "not an image"),
    (lambda p: p.mkdir(), "directory"),
])
def test_bad_files_give_one_line_errors(tmp_path, make, message):
    path = tmp_path / "img.png"
    make(path)
    with pytest.raises(ImageError, match=message) as e:
        load_image(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_images_are_reported(tmp_path, fmt):
    path = tmp_path / "cut.img"
    a = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(a).save(path, fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(path)


@pytest.mark.parametrize("source, message", [
    (np.zeros((4, 4, 2), np.uint8), "HxW"),
    (np.zeros((0, 4, 3), np.uint8), "HxW"),
    (b"", "empty"),
    ("https://example.com/cat.jpg", "URLs are not fetched"),
    (12, "unsupported image type"),
])
def test_bad_sources_give_one_line_errors(source, message):
    with pytest.raises(ImageError, match=message):
        load_image(source)
