"""ROS without ROS (edgevlm.ros, edgevlm.replay): image messages in every common encoding, padded rows and either
byte order decoded to the pixels they hold, malformed ones refused in one line; `edgevlm replay` answers the
frames of rosbag2 recordings (sqlite3 and MCAP) that the tests write with rosbags."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from edgevlm import ros
from edgevlm.errors import EdgeVLMError, ImageError, UsageError
from edgevlm.images import load_image
from edgevlm.replay import frames, parse_every

rosbags = pytest.importorskip("rosbags")
from rosbags.typesys import Stores, get_typestore  # noqa: E402

TYPES = get_typestore(Stores.ROS2_HUMBLE)
ImageMsg = TYPES.types["sensor_msgs/msg/Image"]
Compressed = TYPES.types["sensor_msgs/msg/CompressedImage"]
Header = TYPES.types["std_msgs/msg/Header"]
Time = TYPES.types["builtin_interfaces/msg/Time"]


def header(ns: int = 0):
    return Header(stamp=Time(sec=ns // 10**9, nanosec=ns % 10**9), frame_id="camera")


def raw_message(rgb: np.ndarray, encoding: str, pad: int = 0, bigendian: bool = False):
    """An Image message holding `rgb` (HxWx3 uint8) in `encoding`, each row padded by `pad` bytes."""
    h, w, _ = rgb.shape
    pixels = {"rgb8": rgb, "bgr8": rgb[..., ::-1], "rgba8": np.dstack([rgb, np.full((h, w), 255, np.uint8)]),
              "bgra8": np.dstack([rgb[..., ::-1], np.full((h, w), 255, np.uint8)]), "mono8": rgb[..., 0],
              "mono16": rgb[..., 0].astype(np.uint16) * 257, "rgb16": rgb.astype(np.uint16) * 257,
              "bgr16": rgb[..., ::-1].astype(np.uint16) * 257}[encoding]
    if pixels.dtype == np.uint16:
        pixels = pixels.astype(">u2" if bigendian else "<u2")
    rows = pixels.reshape(h, -1).view(np.uint8)
    data = np.concatenate([rows, np.full((h, pad), 7, np.uint8)], axis=1).reshape(-1)
    return ImageMsg(header=header(), height=h, width=w, encoding=encoding, is_bigendian=int(bigendian),
                    step=rows.shape[1] + pad, data=data)


RGB = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16", "rgb16", "bgr16"])
@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize("bigendian", [False, True])
def test_every_encoding_decodes_to_the_pixels_it_holds(encoding, pad, bigendian):
    pixels = ros.frame(raw_message(RGB, encoding, pad, bigendian))
    if encoding.startswith("mono"):
        expected = RGB[..., 0] if encoding == "mono8" else RGB[..., 0].astype(np.uint16) * 257
    elif encoding.endswith("16"):
        expected = RGB.astype(np.uint16) * 257
    else:
        expected = RGB if encoding in ("rgb8", "bgr8") else np.dstack([RGB, np.full(RGB.shape[:2], 255, np.uint8)])
    np.testing.assert_array_equal(pixels, expected)
    assert np.asarray(load_image(pixels)).shape[:2] == RGB.shape[:2]


def test_compressed_images_are_their_encoded_bytes():
    buf = io.BytesIO()
    Image.fromarray(RGB).save(buf, format="PNG")
    msg = Compressed(header=header(), format="rgb8; png compressed bgr8", data=np.frombuffer(buf.getvalue(), np.uint8))
    np.testing.assert_array_equal(np.asarray(load_image(ros.frame(msg))), RGB)
    with pytest.raises(ImageError, match="only JPEG and PNG"):
        ros.frame(Compressed(header=header(), format="tiff", data=np.zeros(4, np.uint8)))


@pytest.mark.parametrize("change, needle", [
    ({"encoding": "yuv422"}, "is not read"),
    ({"height": 0}, "no pixels"),
    ({"step": 2}, "shorter than a row"),
    ({"height": 6}, "needs"),
    ({"height": 10**5, "width": 10**5}, "pixel limit"),
])
def test_a_malformed_message_is_a_one_line_image_error(change, needle):
    msg = raw_message(RGB, "rgb8")
    fields = {k: getattr(msg, k) for k in ("header", "height", "width", "encoding", "is_bigendian", "step", "data")}
    with pytest.raises(ImageError, match=needle) as e:
        ros.frame(ImageMsg(**{**fields, **change}))
    assert "\n" not in str(e.value)


@settings(max_examples=200, deadline=None)
@given(h=st.integers(-2, 40), w=st.integers(-2, 40), step=st.integers(-5, 200), size=st.integers(0, 5000),
       encoding=st.sampled_from([*ros.ENCODINGS, "nope"]), bigendian=st.booleans())
def test_any_image_message_decodes_or_is_an_image_error(h, w, step, size, encoding, bigendian):
    """Property: whatever a camera driver (or a corrupt bag) sends, a frame or a one-line ImageError."""
    msg = ImageMsg(header=header(), height=max(h, 0), width=max(w, 0), encoding=encoding, is_bigendian=int(bigendian),
                   step=max(step, 0), data=np.zeros(size, np.uint8))
    try:
        pixels = ros.frame(msg)
    except ImageError as e:
        assert "\n" not in str(e)
    else:
        assert pixels.shape[:2] == (h, w)


def test_every_is_a_duration():
    assert parse_every("2s") == 2 and parse_every("500ms") == 0.5 and parse_every("1.5") == 1.5
    with pytest.raises(UsageError):
        parse_every("soon")


def write_bag(path, storage: str, n: int = 6, seconds_apart: float = 0.5) -> None:
    from rosbags.rosbag2 import StoragePlugin, Writer

    plugin = {"sqlite3": StoragePlugin.SQLITE3, "mcap": StoragePlugin.MCAP}[storage]
    with Writer(path, version=8, storage_plugin=plugin) as writer:
        raw = writer.add_connection("/camera/image_raw", ImageMsg.__msgtype__, typestore=TYPES)
        packed = writer.add_connection("/camera/compressed", Compressed.__msgtype__, typestore=TYPES)
        for i in range(n):
            stamp = int(i * seconds_apart * 1e9)
            rgb = np.random.default_rng(i).integers(0, 255, (48, 64, 3), dtype=np.uint8)
            writer.write(raw, stamp, TYPES.serialize_cdr(raw_message(rgb, "bgr8", pad=4), ImageMsg.__msgtype__))
            buf = io.BytesIO()
            Image.fromarray(rgb).save(buf, format="JPEG")
            msg = Compressed(header=header(stamp), format="jpeg", data=np.frombuffer(buf.getvalue(), np.uint8))
            writer.write(packed, stamp, TYPES.serialize_cdr(msg, Compressed.__msgtype__))


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_frames_are_read_from_both_storages_at_the_asked_interval(tmp_path, storage):
    write_bag(tmp_path / "bag", storage)
    every = [t for t, _ in frames(tmp_path / "bag", "/camera/image_raw", every_s=1.0)]
    assert every == [0.0, 1.0, 2.0]
    (t0, first), *_ = frames(tmp_path / "bag", "/camera/compressed")
    assert np.asarray(load_image(first)).shape == (48, 64, 3)
    with pytest.raises(UsageError, match="its image topics: /camera/compressed, /camera/image_raw"):
        next(frames(tmp_path / "bag", "/lidar"))


def test_edgevlm_replay_answers_the_frames_of_a_recording(tmp_path, tiny_bundle):
    write_bag(tmp_path / "bag", "mcap")
    runs = {}
    for how in ("--in-turn", "--pipelined"):  # frames pipelined answer as frames in turn, in the same order
        proc = subprocess.run([sys.executable, "-m", "edgevlm", "replay", str(tmp_path / "bag"), "--topic",
                               "/camera/image_raw", "--question", "What is shown?", "--every", "1s", "--bundle",
                               str(tiny_bundle), "--max-new-tokens", "4", "--think-budget", "4", "--json", how],
                              capture_output=True, timeout=600)
        assert proc.returncode == 0, proc.stderr.decode()
        runs[how] = lines = [json.loads(line) for line in proc.stdout.decode().splitlines()]
        assert [line["time_s"] for line in lines] == [0.0, 1.0, 2.0]
        assert all("answer" in line["result"] and line["result"]["timings"]["total_ms"] > 0 for line in lines)
    text = ("answer", "instruction", "extraction", "reasoning", "response", "tokens")
    assert [[x["result"][k] for k in text] for x in runs["--in-turn"]] == [[x["result"][k] for k in text]
                                                                          for x in runs["--pipelined"]]
    missing = subprocess.run([sys.executable, "-m", "edgevlm", "replay", str(tmp_path / "nope"), "--topic", "/x",
                              "--question", "q", "--bundle", str(tiny_bundle)], capture_output=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.decode().count("\n") == 1


def test_a_damaged_recording_fails_in_one_line(tmp_path):
    write_bag(tmp_path / "bag", "sqlite3")
    (db,) = (tmp_path / "bag").glob("*.db3")
    db.write_bytes(db.read_bytes()[:4096])  # cut short
    with pytest.raises(EdgeVLMError) as e:
        list(frames(tmp_path / "bag", "/camera/image_raw"))
    assert "\n" not in str(e.value)
    (tmp_path / "junk").write_bytes(b"not a bag")
    with pytest.raises(EdgeVLMError, match="not a readable rosbag2 recording"):
        next(frames(tmp_path / "junk", "/camera/image_raw"))
