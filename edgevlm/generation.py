"""The generation loop shared by every backend: logits processors, sampling, stop rules. numpy only.

A backend supplies a `DecodeState`: the logits after the prompt, and a `step(token)` that feeds
one token and returns the next logits (the KV cache lives inside it).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Decoding:
    """How one stage samples. temperature 0 means greedy."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def with_max_new_tokens(self, n: int | None) -> Decoding:
        return self if n is None else replace(self, max_new_tokens=n)


class DecodeState(Protocol):
    logits: np.ndarray  # next-token logits after the prompt, shape [vocab]
    prompt_len: int

    def step(self, token_id: int) -> np.ndarray:
        """Append one token; return the next-token logits (which the state may overwrite at its next step:
        copy them to keep them)."""
        ...


@dataclass
class ThinkControl:
    """Qwen3 thinking-mode controls: the paper's thinking budget and its "NoWait" banned words.

    The budget reproduces the authors' logits processor: with n the 1-based index of the token being
    chosen, past 95% of the budget the "\\n" and `</think>` logits are set to `</think>`'s logit times
    (1 + n/budget); at n = budget-1 only "\\n" may be chosen, at n = budget only `</think>`. Unlike
    the original, both rules (and the ban) stop once `</think>` has been generated, so a model that
    ends its thinking early is never forced to emit a second `</think>` inside its answer.
    """

    think_end_id: int
    newline_id: int
    budget: int | None = None
    banned_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def apply(self, logits: np.ndarray, n: int) -> np.ndarray:
        if self.budget is not None:
            ratio = n / self.budget
            if ratio > 0.95:
                boosted = logits[self.think_end_id] * (1 + ratio)
                logits[self.newline_id] = boosted
                logits[self.think_end_id] = boosted
            if n >= self.budget - 1:
                forced = self.newline_id if n == self.budget - 1 else self.think_end_id
                logits[:] = -np.inf
                logits[forced] = 0.0
                return logits
        if self.banned_ids.size:
            logits[self.banned_ids] = -np.inf
        return logits


def warp(logits: np.ndarray, decoding: Decoding) -> np.ndarray:
    """Temperature, then top-k, then top-p (HF's order and tie rules); removed tokens become -inf."""
    x = logits.astype(np.float64) / decoding.temperature
    if 0 < decoding.top_k < x.size:
        kth = np.partition(x, -decoding.top_k)[-decoding.top_k]
        x[x < kth] = -np.inf
    if decoding.top_p < 1.0:
        order = np.argsort(x, kind="stable")
        probs = _softmax(x[order])
        remove = np.cumsum(probs) <= (1.0 - decoding.top_p)
        remove[-1] = False  # always keep the most likely token
        x[order[remove]] = -np.inf
    return x


def sample(logits: np.ndarray, decoding: Decoding, rng: np.random.Generator) -> int:
    """Greedy when temperature is 0; else draw from the warped distribution."""
    if decoding.temperature <= 0:
        return int(np.argmax(logits))
    cdf = np.cumsum(_softmax(warp(logits, decoding)))
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), logits.size - 1))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()


class AnswerConstraint(Protocol):
    """Chooses the tokens of the answer after the reasoning (edgevlm.constraints.AnswerMatcher)."""

    @property
    def active(self) -> bool: ...

    @property
    def satisfied(self) -> bool: ...

    def think_ended(self) -> None: ...

    def choose(self, logits: np.ndarray, decoding: Decoding, rng: np.random.Generator, remaining: int) -> int | None:
        """The next token, as `sample` would draw it from the logits restricted to what the answer allows (and
        taken by the constraint); None when the answer can go no further."""
        ...


@dataclass
class Generation:
    token_ids: list[int]
    # "eos", "length" (max_new_tokens), "context" (the model's context is full), "constraint" (the tokens
    # ran out, or the constraint could go no further, before the constrained answer was complete), or
    # "deadline" (the pipeline stopped it at the call's time limit)
    stop_reason: str


def generate(
    state: DecodeState,
    decoding: Decoding,
    *,
    eos_ids: set[int],
    max_context: int,
    rng: np.random.Generator,
    think: ThinkControl | None = None,
    answer: AnswerConstraint | None = None,
    until: Callable[[], bool] | None = None,
) -> Generator[int, None, Generation]:
    """Sample up to `decoding.max_new_tokens` tokens from `state`, yielding each as it is chosen. While
    thinking, `think` shapes the logits; after it, `answer` (if any) chooses each token under the answer's
    constraint.
    `until`: asked after each token that does not end the generation; True stops it there ("deadline").

    The generator's return value (`yield from`, or StopIteration.value) is the whole Generation.
    """
    ids: list[int] = []
    logits = state.logits
    thinking = think is not None
    room = min(decoding.max_new_tokens, max_context - state.prompt_len)
    stop = "length"
    for n in range(1, decoding.max_new_tokens + 1):
        if thinking:
            token = sample(think.apply(np.array(logits, dtype=np.float32, copy=True), n), decoding, rng)
        elif answer is not None:
            token = answer.choose(logits, decoding, rng, room - n + 1)
            if token is None:  # the constraint can go no further
                stop = "constraint"
                break
        else:
            token = sample(logits, decoding, rng)
        ids.append(token)
        yield token
        if thinking and token == think.think_end_id:
            thinking = False
            if answer is not None:
                answer.think_ended()
        if token in eos_ids:
            stop = "eos"
            break
        if n == decoding.max_new_tokens:
            break
        if state.prompt_len + len(ids) >= max_context:
            stop = "context"
            break
        if until is not None and until():
            stop = "deadline"
            break
        logits = state.step(token)
    if answer is not None and answer.active and stop in ("length", "context") and not answer.satisfied:
        stop = "constraint"
    return Generation(ids, stop)

