"""What one call may ask of the pipeline, checked before any model runs: every wrong type, NaN or unknown
option is a UsageError naming it."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from edgevlm import prompts
from edgevlm.errors import UsageError

MODES = ("extract-think", "extract", "direct")
MAX_QUESTION_CHARS = 100_000


@dataclass(frozen=True)
class Options:
    """What one call may set: `Pipeline.__call__` and `Pipeline.stream` take these as keywords.

    choices: answer options (the question becomes multiple choice, answered by an option's letter).
    mode: extract-think (default), extract (stop after the description) or direct (the VLM answers).
    think: Qwen3 thinking mode for the reasoner, bounded by `think_budget` tokens (and by the room its
    context leaves: Result.notes says when that clamped it).
    max_new_tokens: cap on each stage's visible output (thinking excluded); default per stage.
    instruction: skip the planner and use this "contents to observe" instruction.
    temperature: override the reasoner's sampling temperature in the think stage (0 = greedy).
    seed: the sampling seed. bgr: a numpy image is in OpenCV's BGR order.
    fixed_tokens: every stage generates exactly this many tokens, end-of-sequence ignored (benchmarks).
    trace: also record each decode step and the sampling between steps (Result.profile; `--trace`).
    schema / regex / one_of: the answer after the reasoning must match this JSON schema (a dict or its JSON
    text; Result.answer_json holds the parsed value), this regular expression, or be one of these strings
    (the question stays open: unlike `choices`, no letters), decoded under that constraint
    (edgevlm.constraints). constrain: a multiple-choice answer is decoded constrained to the options'
    letters (default); False leaves it free, as in the paper.
    time_limit_s: the run stops at the next token once it has taken this long (the stage it cut is
    Result.cut; the stages before it are whole: a description without its answer is still useful).
    Every value is checked here: a wrong type, a NaN or an unknown option is a UsageError.
    """

    choices: list[str] | None = None
    mode: str = "extract-think"
    think: bool = True
    think_budget: int = prompts.THINK_BUDGET
    max_new_tokens: int | None = None
    instruction: str | None = None
    temperature: float | None = None
    seed: int = 0
    bgr: bool = False
    fixed_tokens: int | None = None
    trace: bool = False
    schema: dict | str | None = None
    regex: str | None = None
    one_of: list[str] | None = None
    constrain: bool = True
    time_limit_s: float | None = None

    @classmethod
    def of(cls, options: dict) -> Options:
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise UsageError(f"unknown option {unknown[0]!r}; the options are: {', '.join(names)}")
        return cls(**options)

    def __post_init__(self):
        if self.choices is not None:
            if isinstance(self.choices, str) or not isinstance(self.choices, (list, tuple)):
                raise UsageError(f"choices must be a list of strings, got {type(self.choices).__name__}")
            for choice in self.choices:
                check_text(choice, "a choice")
        if self.instruction is not None:
            check_text(self.instruction, "the instruction")
        if self.mode not in MODES:
            raise UsageError(f"unknown mode {self.mode!r}; choose one of: {', '.join(MODES)}")
        if sum(x is not None for x in (self.schema, self.regex, self.one_of)) > 1:
            raise UsageError("give one constraint for the answer: a JSON schema, a regular expression or one_of")
        if self.one_of is not None:
            if isinstance(self.one_of, str) or not isinstance(self.one_of, (list, tuple)) or not self.one_of:
                raise UsageError("one_of must be a non-empty list of strings")
            for option in self.one_of:
                check_text(option, "a one_of answer")
        self.answer_constraint(None)  # an invalid schema or regex fails here, before any model runs
        for name in ("think", "bgr", "trace", "constrain"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"{name} must be True or False, got {getattr(self, name)!r}")
        check_int(self.think_budget, "the thinking budget")
        check_int(self.seed, "the seed", minimum=0)
        for name in ("max_new_tokens", "fixed_tokens"):
            if getattr(self, name) is not None:
                check_int(getattr(self, name), name)
        if self.time_limit_s is not None and not finite_number(self.time_limit_s, minimum=0):
            raise UsageError(f"time_limit_s must be a finite number of seconds, 0 or more; got {self.time_limit_s!r}")
        if self.temperature is not None and not finite_number(self.temperature, minimum=0):
            raise UsageError(f"the temperature must be a finite number, 0 (greedy) or more; got {self.temperature!r}")


    def answer_constraint(self, letters: str | None):
        """What the answer must match (edgevlm.constraints.Constraint), or None: the schema or regex asked
        for, else a multiple-choice question's letters (`letters`) unless `constrain` is off."""
        if self.schema is None and self.regex is None and self.one_of is None \
                and not (letters and self.constrain is True):
            return None
        from edgevlm.constraints import Constraint

        if self.schema is not None:
            return Constraint.json_schema(self.schema)
        if self.regex is not None:
            return Constraint.regex(self.regex)
        return Constraint.choice(list(self.one_of if self.one_of is not None else letters))

def finite_number(value, minimum: float) -> bool:
    return (not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
            and math.isfinite(value) and value >= minimum)


def check_text(value, what: str) -> None:
    if not isinstance(value, str):
        raise UsageError(f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise UsageError(f"{what} is empty")
    if len(value) > MAX_QUESTION_CHARS:
        raise UsageError(f"{what} is {len(value)} characters; the limit is {MAX_QUESTION_CHARS}")


def check_int(value, what: str, minimum: int | None = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise UsageError(f"{what} must be a whole number, got {value!r}")
    if minimum is not None and value < minimum:
        raise UsageError(f"{what} must be at least {minimum}, got {value}")
