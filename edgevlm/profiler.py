"""Where the time goes: spans per stage (preprocess, vision, prefill, decode) and their summary.

The pipeline records a handful of spans per stage (not one per token), so profiling is always on.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

STEPS = ("preprocess", "vision", "prefill", "decode")


@dataclass
class Span:
    stage: str
    name: str
    start: float  # seconds, perf_counter clock
    end: float

    @property
    def ms(self) -> float:
        return (self.end - self.start) * 1e3


@dataclass
class StageTimings:
    """Milliseconds per step of one stage; rates in tokens per second."""

    preprocess_ms: float = 0.0
    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    ttft_ms: float = 0.0  # stage start to the first generated token
    total_ms: float = 0.0
    prefill_tok_s: float = 0.0
    decode_tok_s: float = 0.0

    def to_dict(self) -> dict:
        return {k: round(v, 3) for k, v in asdict(self).items()}


class Profiler:
    def __init__(self) -> None:
        self.spans: list[Span] = []

    @contextmanager
    def span(self, stage: str, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.spans.append(Span(stage, name, start, time.perf_counter()))

    def add(self, stage: str, name: str, start: float, end: float) -> None:
        self.spans.append(Span(stage, name, start, end))

    def stage(self, stage: str, *, prompt_tokens: int, new_tokens: int, first_token_at: float | None) -> StageTimings:
        spans = [s for s in self.spans if s.stage == stage]
        ms = {name: sum(s.ms for s in spans if s.name == name) for name in STEPS}
        start = min((s.start for s in spans), default=0.0)
        end = max((s.end for s in spans), default=0.0)
        t = StageTimings(
            preprocess_ms=ms["preprocess"], vision_ms=ms["vision"], prefill_ms=ms["prefill"], decode_ms=ms["decode"],
            ttft_ms=(first_token_at - start) * 1e3 if first_token_at else 0.0, total_ms=(end - start) * 1e3,
        )
        if t.prefill_ms > 0:
            t.prefill_tok_s = prompt_tokens / (t.prefill_ms / 1e3)
        # the first token comes from the prefill's logits; each later one costs a decode step
        if new_tokens > 1 and t.decode_ms > 0:
            t.decode_tok_s = (new_tokens - 1) / (t.decode_ms / 1e3)
        return t
