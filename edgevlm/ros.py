"""ROS without ROS: `sensor_msgs/Image` and `CompressedImage` as frames the pipeline reads, and the ROS 2 node's
logic (NodeConfig, NodeCore: the latest frame, questions about it, what the node publishes), which its rclpy
shell (edgevlm.ros_node) only wires to topics and a service.

Any object with the messages' fields works (rclpy's, rosbags' deserialized ones, a dataclass): an Image's
height, width, encoding, is_bigendian, step and data; a CompressedImage's format and data. Rows padded past
width * pixel size (`step`) are cut, 16-bit data is read in the message's byte order, and every size is checked
against the data before anything is copied: a malformed message is a one-line ImageError.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from edgevlm.errors import ImageError, UsageError, first_line
from edgevlm.images import MAX_PIXELS
from edgevlm.options import Options, check_text, finite_number

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


# ---------------------------------------------------------------------------------------------------- the node
# What the ROS 2 node (edgevlm.ros_node, rclpy) does, without rclpy: its parameters, the latest frame, questions
# asked through a Runner, and the records and diagnostics it publishes. The rclpy shell only moves messages.

PARAMETERS: dict[str, tuple[object, str]] = {  # name -> (default, what it is); the launch file's YAML sets them
    "bundle": ("", "an exported bundle directory"),
    "preset": ("", "a preset's models on the PyTorch backend, where no bundle is given (needs torch)"),
    "image_topic": ("/camera/image_raw", "the camera topic"),
    "compressed": (False, "the topic carries sensor_msgs/CompressedImage (JPEG, PNG) rather than Image"),
    "question": ("", "topic mode: ask this about the latest frame every period_s and publish the answer"),
    "period_s": (2.0, "topic mode's period in seconds"),
    "deadline_s": (0.0, "each answer's time limit in seconds, queue wait included (0: none)"),
    "max_frame_age_s": (0.0, "refuse to answer about a frame older than this many seconds (0: any age)"),
    "max_queue": (2, "questions that may wait for the models; more are refused"),
    "mode": ("extract-think", "extract-think, extract or direct"),
    "think_budget": (256, "the reasoner's thinking budget in tokens"),
    "max_new_tokens": (0, "most visible tokens per stage (0: the default)"),
    "memory_budget": ("", "plan the bundle's memory to fit this size, e.g. 6GB (empty: the bundle's target's)"),
    "device": ("cpu", "cpu or cuda"),
}


@dataclass(frozen=True)
class NodeConfig:
    """The node's parameters, checked: a wrong one is a one-line UsageError before any model loads."""

    values: dict

    @classmethod
    def of(cls, values: dict) -> NodeConfig:
        unknown = sorted(set(values) - set(PARAMETERS))
        if unknown:
            raise UsageError(f"unknown parameter {unknown[0]!r}; the parameters are: {', '.join(PARAMETERS)}")
        merged = {name: _checked(name, values.get(name, default)) for name, (default, _) in PARAMETERS.items()}
        if not merged["bundle"] and not merged["preset"]:
            raise UsageError("give the node a bundle (parameter bundle) or a preset (parameter preset)")
        if merged["question"]:
            check_text(merged["question"], "parameter question")
            if merged["period_s"] <= 0:
                raise UsageError("parameter period_s must be above 0 when a question is given")
        cfg = cls(merged)
        Options.of(cfg.options())
        return cfg

    def __getitem__(self, name: str):
        return self.values[name]

    def source(self):
        """Where the models come from (edgevlm.loading.Source, checked)."""
        from edgevlm.loading import Source

        return Source(bundle=self["bundle"] or None, preset=self["preset"] or None, device=self["device"],
                      memory_budget=self["memory_budget"] or None)

    def options(self) -> dict:
        """The pipeline's options for every question."""
        opts = {"mode": self["mode"], "think_budget": self["think_budget"]}
        if self["max_new_tokens"]:
            opts["max_new_tokens"] = self["max_new_tokens"]
        return opts


def _checked(name: str, value):
    """A parameter's value, of its default's type (a whole number where a float is wanted is taken)."""
    default = PARAMETERS[name][0]
    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, float):
        ok, want = finite_number(value, minimum=0), "a finite number, 0 or more"
    elif isinstance(default, int):
        ok, want = isinstance(value, int) and not isinstance(value, bool) and value >= 0, "a whole number, 0 or more"
    else:
        ok, want = isinstance(value, str), "a string"
    if not ok:
        raise UsageError(f"parameter {name}: expected {want}, got {value!r}")
    return float(value) if isinstance(default, float) else value


class NodeCore:
    """The latest frame of the camera topic and the questions about it, served by `runner` (edgevlm.runner).

    `on_image` keeps the newest message (decoded only when a question needs it); `ask` submits a question about
    it; `tick` (topic mode) submits the configured question when a frame came since the last tick, replacing a
    tick still waiting; `answer` asks and waits, returning a record rather than raising (a service's reply)."""

    def __init__(self, runner, config: NodeConfig, clock=time.monotonic):
        self.runner, self.config, self.clock = runner, config, clock
        self._lock = threading.Lock()
        self._latest = None  # (message, received at, sequence number)
        self._received = 0
        self._ticked = 0

    def on_image(self, msg) -> None:
        with self._lock:
            self._received += 1
            self._latest = (msg, self.clock(), self._received)

    def frame(self):
        """The latest frame's pixels (or encoded bytes), or a one-line error saying why there is none."""
        with self._lock:
            latest = self._latest
        if latest is None:
            raise UsageError(f"no image has come on {self.config['image_topic']} yet")
        msg, received, _ = latest
        age, limit = self.clock() - received, self.config["max_frame_age_s"]
        if limit and age > limit:
            raise UsageError(f"the latest image on {self.config['image_topic']} is {age:.1f} s old "
                             f"(max_frame_age_s {limit:g}); is the camera running?")
        return frame(msg)

    def ask(self, question: str, choices: list[str] | None = None, **options):
        """Submit `question` about the latest frame; the runner's Request."""
        deadline = self.config["deadline_s"] or None
        return self.runner.submit(self.frame(), question, choices=choices or None, deadline_s=deadline,
                                  **{**self.config.options(), **options})

    def tick(self):
        """Topic mode: a Request for the configured question about a frame not asked about yet, else None."""
        with self._lock:
            if not self.config["question"] or self._received == self._ticked:
                return None
            self._ticked = self._received
        return self.ask(self.config["question"], latest="periodic")

    def answer(self, question: str, choices: list[str] | None = None) -> tuple[dict, object]:
        """Ask and wait: (the record, the Result or None). Every failure is the record's one-line error."""
        try:
            result = self.ask(question, choices).result()
        except Exception as e:  # noqa: BLE001 - a service replies with the error rather than failing
            return record(question, error=e), None
        return record(question, result), result


def record(question: str, result=None, error: BaseException | None = None) -> dict:
    """What the node publishes (and the service returns as JSON) for one question: the answer and the whole
    Extract->Think record (`edgevlm run --json`'s object), or a one-line error."""
    if error is not None:
        text = first_line(error) or type(error).__name__  # a cancelled request has no message
        return {"ok": False, "question": question, "answer": "", "answer_json": None, "error": text, "result": None}
    return {"ok": True, "question": question, "answer": result.answer, "answer_json": result.answer_json,
            "error": "", "result": result.to_dict()}


def diagnostics(result) -> list[dict]:
    """Per-stage timings as diagnostic_msgs/DiagnosticStatus fields: name, level ("OK", or "WARN" for a stage
    the time limit cut), message and string key-values."""
    out = [{"name": "edgevlm: answer", "level": "WARN" if result.cut else "OK",
            "message": f"cut in {result.cut}" if result.cut else "answered",
            "values": {"total_ms": f"{result.total_ms:.1f}", "queue_ms": f"{result.queue_ms:.1f}",
                       "image_ms": f"{result.image_ms:.1f}", "peak_rss_mb": f"{result.peak_rss_bytes / 1e6:.1f}"}}]
    for name, stage in result.stages.items():
        t = stage.timings
        out.append({"name": f"edgevlm: {name}", "level": "WARN" if result.cut == name else "OK",
                    "message": stage.stop_reason,
                    "values": {"total_ms": f"{t.total_ms:.1f}", "ttft_ms": f"{t.ttft_ms:.1f}",
                               "prefill_ms": f"{t.prefill_ms:.1f}", "decode_ms": f"{t.decode_ms:.1f}",
                               "decode_tok_s": f"{t.decode_tok_s:.1f}", "prompt_tokens": str(stage.prompt_tokens),
                               "new_tokens": str(stage.new_tokens)}})
    return out
