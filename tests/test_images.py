"""Reading odd images: every mode becomes 8-bit RGB the way a user expects; every bad input is one ImageError."""

import io
import os
import struct
import subprocess
import sys
import threading
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from edgevlm import images
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


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_turned_as_pillow_turns_it(tmp_path, orientation):
    from PIL import ImageOps

    a = np.random.default_rng(orientation).integers(0, 255, (12, 20, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.png"
    Image.fromarray(a).save(path, exif=exif)
    with Image.open(path) as im:
        want = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(load_image(path)), want)
    wide = tmp_path / "wide.png"
    Image.new("RGB", (5000, 100), (9, 9, 9)).save(wide, exif=exif)
    assert load_image(wide).size == ((82, MAX_SIDE) if orientation > 4 else (MAX_SIDE, 82))


def test_tiny_images_are_accepted():
    assert load_image(Image.new("RGB", (1, 1), (1, 2, 3))).size == (1, 1)


@pytest.mark.parametrize("fmt, size", [
    ("JPEG", (12000, 9000)),  # over MAX_PIXELS as declared, but decoded at half scale
    ("PNG", (8192, 6144)),
])
def test_huge_images_are_downscaled_on_load(tmp_path, fmt, size):
    path = tmp_path / f"huge.{fmt.lower()}"
    Image.new("L", size, 90).save(path, fmt)
    img = load_image(path)
    assert max(img.size) == MAX_SIDE and img.size == (MAX_SIDE, 3072)
    assert img.mode == "RGB"


def _png_header_only(width, height) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_decompression_bombs_are_refused_naming_pillows_limit():
    with pytest.raises(ImageError, match=f"{2 * Image.MAX_IMAGE_PIXELS:,} pixels Pillow opens"):
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


# --- memory bounds: a frame's size is checked before it is decoded, and nothing is copied at full size


def _no_decoding(monkeypatch):
    def refuse(self):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def test_a_frame_over_the_pixel_limit_is_refused_from_its_header_before_decoding(monkeypatch):
    header = _png_header_only(9000, 9000)  # 81 MP: under Pillow's own limit (and its warning's), over ours
    _no_decoding(monkeypatch)
    with pytest.raises(ImageError, match=r"is 9000x9000 pixels, more than the 67,108,864 accepted") as e:
        load_image(header)
    assert "\n" not in str(e.value)
    with pytest.raises(ImageError, match="the image is 9000x9000 pixels"):  # a PIL image opened, not yet loaded
        load_image(Image.open(io.BytesIO(header)))


def test_max_pixels_sets_the_limit_and_the_message_names_it(tmp_path):
    path = tmp_path / "small.png"
    Image.new("RGB", (100, 80), (1, 2, 3)).save(path)
    assert load_image(path, max_pixels=8000).size == (100, 80)
    with pytest.raises(ImageError, match=r"100x80 pixels, more than the 7,999 accepted"):
        load_image(path, max_pixels=7999)
    jpeg = tmp_path / "big.jpg"
    Image.new("L", (9000, 6000), 50).save(jpeg)
    # a JPEG is decoded at reduced scale (here 1/2), and that is the size the limit applies to
    assert load_image(jpeg, max_pixels=4500 * 3000).size == (MAX_SIDE, 2731)
    with pytest.raises(ImageError, match=r"9000x6000 pixels \(decoded at reduced scale: 4500x3000\), more than the "
                                         r"10,000,000 accepted"):
        load_image(jpeg, max_pixels=10_000_000)


def test_pil_images_and_arrays_over_the_limit_are_refused():
    with pytest.raises(ImageError, match="the image is 9000x8000 pixels, more than the 67,108,864 accepted"):
        load_image(Image.new("L", (9000, 8000)))
    huge = np.broadcast_to(np.zeros(3, np.uint8), (10000, 10000, 3))  # 300 MB as seen, nothing allocated
    with pytest.raises(ImageError, match="the array is 10000x10000 pixels, more than the 67,108,864 accepted"):
        load_image(huge)
    with pytest.raises(ImageError, match="10x10 pixels, more than the 99 accepted"):
        load_image(np.zeros((10, 10), np.float32), max_pixels=99)


def test_a_large_array_is_downscaled_without_a_full_size_copy():
    row = (np.arange(5000 * 3) * 37 % 65536).reshape(1, 5000, 3).astype(np.uint16)
    frame = np.broadcast_to(row, (6000, 5000, 3))  # 180 MB of 16-bit pixels as load_image sees them
    tracemalloc.start()
    try:
        img = load_image(frame)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert img.size == (3413, MAX_SIDE) and img.mode == "RGB"
    assert peak < frame.nbytes / 4, f"numpy held {peak / 1e6:.0f} MB converting a {frame.nbytes / 1e6:.0f} MB frame"
    expected = (row[0].astype(np.float64) / 65535 * 255).round()
    assert np.abs(np.asarray(img)[100, :, 1].mean() - expected[:, 1].mean()) < 2


def test_downscaling_in_bands_matches_one_resize(monkeypatch):
    monkeypatch.setattr(images, "BAND_PIXELS", 40_000)  # dozens of bands, each joined to the next
    a = np.random.default_rng(1).integers(0, 255, (1300, 5000, 3), dtype=np.uint8)
    got = np.asarray(load_image(a)).astype(int)
    want = np.asarray(Image.fromarray(a).resize((MAX_SIDE, 1065), Image.Resampling.BICUBIC)).astype(int)
    assert got.shape == want.shape
    diff = np.abs(got - want)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


# --- pipes: standard input and FIFOs are read whole, up to MAX_STREAM_BYTES


def _png_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def _feed(fifo, data: bytes) -> threading.Thread:
    def write():
        try:
            with open(fifo, "wb") as f:
                f.write(data)
        except BrokenPipeError:  # the reader stopped at its limit
            pass

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    return writer


def _finish(fifo, writer: threading.Thread) -> None:
    if writer.is_alive():  # a reader that never opened the FIFO leaves the writer blocked in open()
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
    writer.join(10)


def test_a_fifo_is_read_not_reported_empty(tmp_path):
    a = np.random.default_rng(2).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    fifo = tmp_path / "frame.png"
    os.mkfifo(fifo)
    writer = _feed(fifo, _png_bytes(a))
    try:
        img = load_image(fifo)
    finally:
        _finish(fifo, writer)
    np.testing.assert_array_equal(np.asarray(img), a)


@pytest.mark.parametrize("data, message", [(b"", "is empty"), (b"\0" * 50_000, "more than the 0.01 MB")])
def test_a_fifo_that_is_empty_or_over_the_limit_is_one_line(tmp_path, monkeypatch, data, message):
    monkeypatch.setattr(images, "MAX_STREAM_BYTES", 10_000)
    fifo = tmp_path / "frame.png"
    os.mkfifo(fifo)
    writer = _feed(fifo, data)
    try:
        with pytest.raises(ImageError, match=message) as e:
            load_image(fifo)
    finally:
        _finish(fifo, writer)
    assert str(fifo) in str(e.value) and "\n" not in str(e.value)


def test_dev_stdin_is_read_as_a_pipe():
    a = np.random.default_rng(3).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    code = "from edgevlm.images import load_image; print(load_image('/dev/stdin').size)"
    proc = subprocess.run([sys.executable, "-c", code], input=_png_bytes(a), capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().strip() == "(40, 30)"


def test_read_stream_refuses_more_than_the_limit(monkeypatch):
    monkeypatch.setattr(images, "MAX_STREAM_BYTES", 1000)
    assert images.read_stream(io.BytesIO(b"x" * 1000), "standard input") == b"x" * 1000
    with pytest.raises(ImageError, match="standard input holds more than the 0.001 MB"):
        images.read_stream(io.BytesIO(b"x" * 1001), "standard input")
    with pytest.raises(ImageError, match="standard input is empty"):
        images.read_stream(io.BytesIO(b""), "standard input")


def test_run_refuses_stdin_over_the_limit_in_one_line():
    from test_cli import ENV, assert_one_line_error

    # the limit lowered in the child, so the test pipes 300 kB instead of 256 MB
    code = "import sys; from edgevlm import cli, images; images.MAX_STREAM_BYTES = 100_000; cli.main(sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", code, "run", "-", "What is shown?", "--preset", "demo"],
                          input=b"\0" * 300_000, capture_output=True, env=ENV, timeout=300)
    assert_one_line_error(proc, 1, "standard input holds more than the 0.1 MB", "save the image to a file")


def test_run_refuses_to_wait_on_a_terminal_for_stdin():
    from test_cli import ENV, assert_one_line_error

    pty = pytest.importorskip("pty")
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "edgevlm", "run", "-", "q", "--preset", "demo"], stdin=follower,
                              capture_output=True, env=ENV, timeout=60)
    finally:
        os.close(follower)
        os.close(leader)
    assert_one_line_error(proc, 2, "standard input is not a pipe")
