"""Questions about the frames of a rosbag2 recording (MCAP or sqlite3), offline: `edgevlm replay`.

    for seconds, image in frames("bag_dir", "/camera/image_raw", every_s=2.0):
        result = pipe(image, "Is the path clear?")

Reads with `rosbags` (pip install 'edgevlm[ros]'; pure Python, no ROS install), decodes sensor_msgs/Image and
CompressedImage with edgevlm.ros. A frame is answered every `every_s` seconds of recording time (the first one
at once), with its time from the recording's start.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from edgevlm import ros
from edgevlm.errors import EdgeVLMError, UsageError, first_line

IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")


def parse_every(text: str | float) -> float:
    """'2s', '500ms', '1.5' -> seconds (0: every frame)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s)?\s*", str(text))
    if match is None:
        raise UsageError(f"--every {text!r}: give a time such as 2s, 500ms or 0 (every frame)")
    value = float(match.group(1))
    return value / 1000 if match.group(2) == "ms" else value


def frames(bag: str | Path, topic: str, every_s: float = 0.0) -> Iterator[tuple[float, object]]:
    """(seconds since the recording's first message, frame) for the topic's images, at most one per
    `every_s` seconds."""
    try:
        from rosbags.highlevel import AnyReader
        from rosbags.typesys import Stores, get_typestore
    except ImportError as e:
        raise UsageError(f"edgevlm replay needs rosbags ({e}); pip install 'edgevlm[ros]'") from None
    path = Path(bag)
    if not path.exists():
        raise UsageError(f"{bag}: no such recording")
    try:
        reader = AnyReader([path], default_typestore=get_typestore(Stores.ROS2_HUMBLE))
        reader.open()
    except Exception as e:  # rosbags raises its own types for unreadable or foreign files
        raise EdgeVLMError(f"{bag} is not a readable rosbag2 recording: {first_line(e)[:200]}") from None
    try:
        yield from _topic_frames(reader, topic, every_s)
    finally:
        reader.close()


def _topic_frames(reader, topic: str, every_s: float) -> Iterator[tuple[float, object]]:
    connections = [c for c in reader.connections if c.topic == topic]
    if not connections:
        images = sorted({c.topic for c in reader.connections if c.msgtype in IMAGE_TYPES})
        raise UsageError(f"the recording has no topic {topic!r}; its image topics: {', '.join(images) or 'none'}")
    if connections[0].msgtype not in IMAGE_TYPES:
        raise UsageError(f"{topic} carries {connections[0].msgtype}, not an image ({' or '.join(IMAGE_TYPES)})")
    start, last = reader.start_time, None
    messages = reader.messages(connections=connections)
    while True:
        try:  # a damaged recording fails in one line, naming where
            connection, stamp, raw = next(messages)
            seconds = (stamp - start) / 1e9
            if last is not None and seconds - last < every_s:
                continue
            message = reader.deserialize(raw, connection.msgtype)
        except StopIteration:
            return
        except Exception as e:  # rosbags raises its own types for damaged storage and messages
            where = f" after {last:.3f} s" if last is not None else ""
            raise EdgeVLMError(f"{topic}{where}: the recording cannot be read: {first_line(e)[:200]}") from None
        last = seconds
        yield seconds, ros.frame(message)

