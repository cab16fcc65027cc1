"""What a pipeline call returns: per-stage results, the whole answer and its `--json` view, stream events."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgevlm.profiler import Profiler, StageTimings


@dataclass
class StageResult:
    """One model call: what went in, what came out, and how long each part took."""

    name: str  # plan, extract, think or direct
    model: str
    prompt: str
    text: str  # the generated text, special tokens removed
    token_ids: list[int]
    prompt_tokens: int
    new_tokens: int
    stop_reason: str  # eos, length or context
    timings: StageTimings
    # backend, weights (bytes per graph/part of the model), step_weights (those a decode step reads),
    # kv_allocated and kv_used (bytes, at the stage's end), prefix_tokens (prompt positions whose KV came
    # from the prefix cache), vision_cache ("hit" or "miss", for stages with an image while the cache is on)
    memory: dict = field(default_factory=dict)

    def memory_dict(self) -> dict:
        """The `--json` view: KV megabytes, prefix-cache positions reused, the vision cache's outcome if any."""
        out = {"kv_allocated_mb": round(self.memory.get("kv_allocated", 0) / 1e6, 3),
               "kv_used_mb": round(self.memory.get("kv_used", 0) / 1e6, 3),
               "prefix_tokens": self.memory.get("prefix_tokens", 0)}
        if "vision_cache" in self.memory:
            out["vision_cache"] = self.memory["vision_cache"]
        return out


@dataclass
class Result:
    """The outcome of one question. `answer` is the letter for multiple choice, else the free text (under a
    constraint: the constrained answer's text, and `answer_json` its value for a JSON schema)."""

    answer: str
    mode: str
    question: str
    multiple_choice: bool
    instruction: str | None = None
    extraction: str | None = None
    reasoning: str | None = None
    response: str = ""  # the last stage's visible output (after any thinking)
    answer_json: Any = None  # the answer parsed, when a JSON schema constrained it
    stages: dict[str, StageResult] = field(default_factory=dict)
    models: dict[str, str] = field(default_factory=dict)
    image_ms: float = 0.0  # reading and normalising the image, before any stage
    queue_ms: float = 0.0  # waiting for the models (edgevlm.runner), before the run
    cut: str | None = None  # the stage the time limit stopped (it and the ones after it are missing or partial)
    total_ms: float = 0.0
    peak_rss_bytes: int = 0  # of the process, so far
    peak_gpu_bytes: int | None = None  # what the models hold on a GPU at most (TensorRT backend); None: no GPU
    # what the caller should know about how the answer came about: a clamped thinking budget, an answer that
    # is not one of the options, thinking that never ended
    notes: list[str] = field(default_factory=list)
    profile: Profiler | None = field(default=None, repr=False)  # the spans (write_trace turns them into a trace)

    def to_dict(self) -> dict:
        """The `edgevlm run --json` object."""
        return {
            "answer": self.answer,
            "answer_json": self.answer_json,
            "mode": self.mode,
            "question": self.question,
            "multiple_choice": self.multiple_choice,
            "instruction": self.instruction,
            "extraction": self.extraction,
            "reasoning": self.reasoning,
            "response": self.response,
            "cut": self.cut,
            "timings": {"total_ms": round(self.total_ms, 3), "queue_ms": round(self.queue_ms, 3),
                        "image_ms": round(self.image_ms, 3),
                        **{name: s.timings.to_dict() for name, s in self.stages.items()}},
            "tokens": {name: {"prompt": s.prompt_tokens, "generated": s.new_tokens, "stop_reason": s.stop_reason}
                       for name, s in self.stages.items()},
            "memory": {"peak_rss_mb": round(self.peak_rss_bytes / 1e6, 1),
                       **({} if self.peak_gpu_bytes is None else {"peak_gpu_mb": round(self.peak_gpu_bytes / 1e6, 1)}),
                       **{name: s.memory_dict() for name, s in self.stages.items()}},
            "models": self.models,
            "notes": self.notes,
        }


@dataclass
class Event:
    """What `Pipeline.stream` yields: stage_start, token (a text delta), stage_end, then done."""

    kind: str
    stage: str | None = None
    text: str = ""
    result: Result | None = None
