"""The generation loop shared by every backend: logits processors, sampling, stop rules. numpy only.

A backend supplies a `DecodeState`: the logits after the prompt, and a `step(token)` that feeds
one token and returns the next logits (the KV cache lives inside it).
"""

from __future__ import annotations

import bisect
import itertools
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


def distribution(logits: np.ndarray, decoding: Decoding) -> tuple[np.ndarray | None, np.ndarray]:
    """What sampling draws from: temperature, then top-k, then top-p (HF's order and tie rules), as the kept
    tokens' ids (None: all of `logits`, in order) and their weights (unnormalized, float32 over a whole
    vocabulary, else float64; a removed token's weight is 0 or it is not listed). Needs temperature > 0.

    Sparse, so that a step costs the vocabulary once and not a sort of it (HF's way, 5-30 ms a token at 49-152k
    tokens here): top-k is a partition; top-p without top-k looks only at the tokens whose probability is at
    least (1 - top_p) / vocab, since all the others together weigh less than 1 - top_p and come first in HF's
    ascending order, so HF removes every one of them."""
    x = np.asarray(logits, np.float32)
    ids = None
    if 0 < decoding.top_k < x.size:  # ties with the k-th value stay, as in HF (x < kth is removed)
        kth = np.partition(x, x.size - decoding.top_k)[x.size - decoding.top_k]
        ids = np.flatnonzero(x >= kth)
        x = x[ids]
    best = x.max()
    if not np.isfinite(best):  # nothing finite: the first of the largest, as argmax would
        one = int(np.argmax(x))
        return np.array([one if ids is None else ids[one]]), np.ones(1)
    if x.size > 4096:  # the vocabulary: exp in float32 (a quarter of float64's cost here), sums in float64
        weights = np.exp((x - best) * np.float32(1.0 / decoding.temperature))
    else:
        weights = x.astype(np.float64)
        weights -= best
        if decoding.temperature != 1.0:
            weights /= decoding.temperature
        np.exp(weights, out=weights)
    if decoding.top_p < 1.0:
        total = weights.sum(dtype=np.float64)
        cut = (1.0 - decoding.top_p) * total
        below = 0.0
        if ids is None and x.size > 4096:
            ids = np.flatnonzero(weights >= cut / x.size)  # the rest: under `cut` together, all removed
            below = total - weights[ids].sum(dtype=np.float64)
            weights = weights[ids]
        order = np.argsort(weights, kind="stable")  # ascending, ties in id order, as HF sorts
        remove = below + np.cumsum(weights[order], dtype=np.float64) <= cut
        remove[-1] = False  # always keep the most likely token
        keep = np.sort(order[~remove])
        ids, weights = (keep if ids is None else ids[keep]), weights[keep]
    return ids, weights


def sample(logits: np.ndarray, decoding: Decoding, rng: np.random.Generator) -> int:
    """Greedy when temperature is 0; else a draw from `distribution`."""
    if decoding.temperature <= 0:
        return int(np.argmax(logits))
    return draw(*distribution(logits, decoding), rng)


def draw(ids: np.ndarray | None, weights: np.ndarray, rng: np.random.Generator) -> int:
    """A token drawn from `distribution`'s output."""
    pick = _draw(weights, rng.random())
    return pick if ids is None else int(ids[pick])


def _draw(weights: np.ndarray, u: float, block: int = 256) -> int:
    """The index i with cdf[i-1] <= u * total < cdf[i] (a token of weight 0 is never drawn). Over a long
    vocabulary, by blocks: a block's sum, then the cumulative sum of that block alone (a cumulative sum of
    the whole vocabulary is the slowest part of a draw: ~0.2 ms at 49k)."""
    if weights.size <= 32:  # a few tokens (top-k, a constrained answer's): numpy's per-call cost is the draw
        cdf = list(itertools.accumulate(weights.tolist()))
        i = bisect.bisect_right(cdf, u * cdf[-1])
        return i if i < len(cdf) and weights[i] > 0 else int(np.flatnonzero(weights)[-1])
    if weights.size <= 4 * block:
        return _search(weights, u)
    n = weights.size - weights.size % block
    sums = weights[:n].reshape(-1, block).sum(axis=1, dtype=np.float64)
    if n < weights.size:
        sums = np.append(sums, weights[n:].sum(dtype=np.float64))
    cdf = np.cumsum(sums)
    b = _search(sums, u, cdf)
    inside = (u * cdf[-1] - (cdf[b - 1] if b else 0.0)) / sums[b]  # where u falls inside block b, from 0 to 1
    return b * block + _search(weights[b * block:(b + 1) * block], min(max(inside, 0.0), 1.0))


def _search(weights: np.ndarray, u: float, cdf: np.ndarray | None = None) -> int:
    """The first index whose cumulative weight exceeds u * total, else (rounding) the last of positive weight."""
    if cdf is None:
        cdf = np.cumsum(weights, dtype=np.float64)
    i = int(cdf.searchsorted(u * cdf[-1], side="right"))
    return i if i < weights.size and weights[i] > 0 else int(np.flatnonzero(weights)[-1])


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

