"""What a constrained answer costs per token: the constraint's mask and advance (llguidance, numpy) against the
decode step it sits beside, on the reasoner of each bundle given, side by side in one run.

    python benchmarks/constrained_overhead.py --bundle DEMO_BUNDLE --bundle SMOLLM2_INT4_BUNDLE [--tokens 96]

Per bundle, constraint kind (a JSON schema for a robot action, with a free-text target so that the answer
runs for a while; a regex of words; three choices), temperature (greedy, 1.0) and path (`mask`: a mask every
step; `speculate`, the default: the unmasked pick offered to the grammar first, a mask only when refused):
the masks computed, the median decode step (ms), the median constraint cost per token (ms: choosing the
token less a plain sample of the same logits, plus following it), and their ratio. The decode steps are
those of the same constrained run, so both figures come from the same tokens.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from edgevlm.constraints import AnswerMatcher, Constraint
from edgevlm.generation import Decoding, generate, sample
from edgevlm.pipeline import Pipeline, render_prompt

# What a robot asks for: an action with a target and a count; a few words; one of three.
KINDS = {
    "json_schema": lambda: Constraint.json_schema({"type": "object", "properties": {
        "action": {"enum": ["pick", "place", "push", "wait"]}, "count": {"type": "integer", "minimum": 0,
                                                                        "maximum": 99},
        "target": {"type": "string", "maxLength": 80}}, "required": ["action", "count", "target"],
        "additionalProperties": False}),
    "regex": lambda: Constraint.regex(r"[a-z]+( [a-z]+)*"),
    "choice": lambda: Constraint.choice(["left", "right", "none"]),
}


class Timed:
    """Wraps a decode state and a matcher, recording the time of every decode step and of the constraint's share
    of choosing each token: `choose` less a plain `sample` of the same logits (what an unconstrained loop pays)."""

    def __init__(self, state, matcher):
        self.state, self.matcher = state, matcher
        self.logits, self.prompt_len = state.logits, state.prompt_len
        self.steps, self.constraint = [], []

    def step(self, token):
        t = time.perf_counter()
        out = self.state.step(token)
        self.steps.append(time.perf_counter() - t)
        return out

    # the AnswerConstraint protocol, timed
    active = property(lambda self: self.matcher.active)
    satisfied = property(lambda self: self.matcher.satisfied)

    def think_ended(self):
        self.matcher.think_ended()

    def choose(self, logits, decoding, rng, remaining):
        t = time.perf_counter()
        token = self.matcher.choose(logits, decoding, rng, remaining)
        t1 = time.perf_counter()
        sample(logits, decoding, np.random.default_rng(0))
        self.constraint.append(max(0.0, 2 * t1 - t - time.perf_counter()))
        return token

    def observe(self, token):
        t = time.perf_counter()
        self.matcher.observe(token)
        if self.constraint:
            self.constraint[-1] += time.perf_counter() - t


def measure(model, kind: str, tokens: int, temperature: float, speculate: bool) -> tuple[float, float, int, int]:
    """Median decode step (ms), median constraint cost (ms), tokens, masks computed."""
    prompt = render_prompt(model, "Describe a table with two red cups as JSON.", enable_thinking=False)
    state = model.prefill(model.prepare(prompt))
    matcher = AnswerMatcher(KINDS[kind](), model.tokenizer, model.eos_ids, start="now", prefix=False,
                            speculate=speculate)
    timed = Timed(state, matcher)
    for _ in generate(timed, Decoding(max_new_tokens=tokens, temperature=temperature), eos_ids=model.eos_ids,
                      max_context=model.max_context, rng=np.random.default_rng(0), answer=timed):
        pass
    return (statistics.median(timed.steps) * 1e3, statistics.median(timed.constraint) * 1e3, len(timed.constraint),
            matcher.masks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", action="append", required=True)
    ap.add_argument("--tokens", type=int, default=96)
    args = ap.parse_args()
    rows = []
    for path in args.bundle:
        pipe = Pipeline.from_bundle(path, verify=False)
        model = pipe.reasoner or pipe.extractor
        for kind in KINDS:
            print(f"{path}: {kind} ...", file=sys.stderr, flush=True)
            measure(model, kind, 8, 1.0, False)  # warm: the first mask of a vocabulary builds llguidance's tables
            for temperature in (0.0, 1.0):
                for speculate in (False, True):
                    step, cost, n, masks = measure(model, kind, args.tokens, temperature, speculate)
                    rows.append((path, model.name.rsplit("/", 1)[-1], model.tokenizer.vocab_size, kind, temperature,
                                 "speculate" if speculate else "mask", n, masks, step, cost))
    print(f"\n{'bundle':<24} {'reasoner':<30} {'vocab':>7} {'constraint':<12} {'temp':>4} {'path':<9} {'tokens':>6} "
          f"{'masks':>5} {'decode ms':>9} {'cost ms':>8} {'overhead':>8}")
    for path, name, vocab, kind, temp, how, n, masks, step, cost in rows:
        print(f"{path[-24:]:<24} {name[-30:]:<30} {vocab:>7} {kind:<12} {temp:>4.1f} {how:<9} {n:>6} {masks:>5} "
              f"{step:>9.3f} {cost:>8.3f} {cost / step:>8.1%}")


if __name__ == "__main__":
    main()
