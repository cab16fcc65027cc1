"""What a constrained answer costs per token: the constraint's share of the time to choose a token (speculate,
then check; and the reference that masks every step) against the decode step it sits beside, on the
reasoner of each bundle given, side by side in one run.

    python benchmarks/constrained_overhead.py --bundle DEMO_BUNDLE --bundle SMOLLM2_INT4_BUNDLE [--tokens 96]

Two scenarios per bundle:

- answers: the pipeline as a user runs it (no-think, its own top-p/top-k decoding at temperature 0 and 1) on
  the demo's test questions, each answer constrained to its type's answer set (`one_of`), or a multiple-choice
  question's letters. The model's own answers: the token it picks is mostly allowed.
- forced: a prompt that asks for something else ("describe a table as JSON"), constrained from the first token
  at temperature 1 to a JSON schema (a robot action with a free-text target, so the answer runs for a while),
  a regex of six to sixteen words, or three choices: the model's pick is mostly refused, every step masks.

Each is run three ways after a warm-up on other inputs (other test questions, other seeds), which builds
llguidance's tables and leaves its states in the grammars' memory (what a robot asking with the same
constraint every frame has): cold (nothing remembered: `remember=False`, speculate then check), warm (the
default: remembered masks reused, speculate then check where none is), and the reference that masks every
step and remembers nothing. Per row: the constrained tokens, the median decode step (ms), and per way the
share of tokens for which llguidance computed a mask, the constraint's cost per token (us: the time `choose`
takes less that of a plain `sample` on the same logits; the medians of the speculated tokens, of the tokens
drawn from a remembered mask and of those that computed one, weighted by their shares, so that a step
preempted on a busy machine does not count; each median balanced between the two orders of choose and the
plain sample, see `Clock.cost`) and its ratio to the decode step. A negative cost: the masked
step samples among a few allowed tokens, cheaper than a plain top-k/top-p sample over the whole vocabulary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import edgevlm.pipeline as pipeline_module
from edgevlm import demo
from edgevlm.constraints import AnswerMatcher, Constraint
from edgevlm.evaluation import answer_sets
from edgevlm.generation import Decoding, generate, sample
from edgevlm.pipeline import Pipeline, render_prompt

# What a robot asks for: an action with a target and a count; a short sentence (6-16 words); one of three.
KINDS = {
    "json_schema": lambda: Constraint.json_schema({"type": "object", "properties": {
        "action": {"enum": ["pick", "place", "push", "wait"]}, "count": {"type": "integer", "minimum": 0,
                                                                        "maximum": 99},
        "target": {"type": "string", "maxLength": 80}}, "required": ["action", "count", "target"],
        "additionalProperties": False}),
    "regex": lambda: Constraint.regex(r"[a-z]+( [a-z]+){5,15}"),
    "choice": lambda: Constraint.choice(["left", "right", "none"]),
}


class Clock:
    """Times every decode step and every constrained `choose` (less a plain `sample` of the same logits)."""

    def __init__(self, speculate: bool = True, remember: bool = True):
        self.speculate, self.remember = speculate, remember
        self.steps: list[float] = []
        # choose's cost: a speculated token, one drawn from a remembered mask, one that computed the mask; each
        # as two lists, by which of choose and the plain sample ran first after the step (see `cost`)
        self.hit: tuple[list[float], list[float]] = ([], [])
        self.drawn: tuple[list[float], list[float]] = ([], [])
        self.miss: tuple[list[float], list[float]] = ([], [])
        self.shadow = np.random.default_rng(0)  # the plain samples' own stream: the run's is not touched

    def new_matcher(self, *args, **kwargs) -> AnswerMatcher:
        return self.matcher(AnswerMatcher(*args, **kwargs, speculate=self.speculate, remember=self.remember))

    def state(self, state):
        clock, step = self, state.step

        class Timed:
            logits, prompt_len = state.logits, state.prompt_len

            def step(self, token):
                t = time.perf_counter()
                out = step(token)
                clock.steps.append(time.perf_counter() - t)
                return out

        return Timed()

    def matcher(self, matcher: AnswerMatcher):
        clock, choose = self, matcher.choose

        def timed(logits, decoding, rng, remaining):
            if not matcher.active:
                return choose(logits, decoding, rng, remaining)
            masked, computed, shadow_first = matcher.masked, matcher.computed, self.tokens % 2
            if shadow_first:  # alternate which comes first after the step (ORT's threads may still be spinning)
                t = time.perf_counter()
                sample(logits, decoding, clock.shadow)
                plain = time.perf_counter() - t
            t = time.perf_counter()
            token = choose(logits, decoding, rng, remaining)
            spent = time.perf_counter() - t
            if not shadow_first:
                t = time.perf_counter()
                sample(logits, decoding, clock.shadow)
                plain = time.perf_counter() - t
            group = (clock.miss if matcher.computed > computed else clock.drawn if matcher.masked > masked
                     else clock.hit)
            group[shadow_first].append(spent - plain)
            return token

        matcher.choose = timed
        return matcher

    @staticmethod
    def count(group: tuple[list[float], list[float]]) -> int:
        return len(group[0]) + len(group[1])

    @property
    def tokens(self) -> int:
        return sum(map(self.count, (self.hit, self.drawn, self.miss)))

    def cost(self) -> float:
        """Seconds per constrained token: each kind of token's cost, weighted by their shares. A kind's cost is
        the mean of two medians, of its tokens timed choose first and of those timed the plain sample first:
        whichever runs first after the step pays the same extra (~15 us here, cause not pinned down), so
        a single median of both orders lands on one side of it or the other; the two medians' mean cancels
        it, as a mean would, and a step preempted on a busy machine moves it no more than a median."""
        total = 0.0
        for group in (self.hit, self.drawn, self.miss):
            medians = [statistics.median(xs) for xs in group if xs]
            total += sum(medians) / len(medians) * self.count(group) if medians else 0.0
        return total / max(self.tokens, 1)


def answers(clock: Clock, pipe: Pipeline, temperature: float, items: int, warmup: bool) -> None:
    """The demo's test questions through the pipeline, each answer constrained (no-think): the first `items`,
    or the next `items` as the warm-up."""
    rows = [json.loads(line) for line in (demo.TEST_SET / "items.jsonl").read_text().splitlines() if line.strip()]
    sets = answer_sets(rows)

    def timed_generate(state, decoding, *, answer=None, **kw):  # the constrained stage's steps, not the extractor's
        return generate(state if answer is None else clock.state(state), decoding, answer=answer, **kw)

    pipeline_module.generate, pipeline_module.AnswerMatcher = timed_generate, clock.new_matcher
    try:
        for item in rows[items:2 * items] if warmup else rows[:items]:
            options = {"choices": item["choices"]} if item.get("choices") else {"one_of": sets[item["type"]]}
            pipe(str(demo.TEST_SET / item["image"]), item["question"], think=False, temperature=temperature,
                 max_new_tokens=24, seed=0, **options)
    finally:
        pipeline_module.generate, pipeline_module.AnswerMatcher = generate, AnswerMatcher


def forced(clock: Clock, model, kind: str, tokens: int, repeats: int, warmup: bool) -> None:
    """A constraint the prompt does not ask for, from the first token, at temperature 1 (`repeats` seeds; the
    warm-up's are others)."""
    prompt = model.prepare(render_prompt(model, "Describe a table with two red cups as JSON.", enable_thinking=False))
    for seed in range(repeats):
        matcher = clock.new_matcher(KINDS[kind](), model.tokenizer, model.eos_ids, start="now", prefix=False)
        for _ in generate(clock.state(model.prefill(prompt)), Decoding(max_new_tokens=tokens, temperature=1.0),
                          eos_ids=model.eos_ids, max_context=model.max_context,
                          rng=np.random.default_rng(seed + (1000 if warmup else 0)), answer=matcher):
            pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", action="append", required=True)
    ap.add_argument("--tokens", type=int, default=96, help="forced: tokens per answer")
    ap.add_argument("--repeats", type=int, default=4, help="forced: answers (seeds) per constraint")
    ap.add_argument("--items", type=int, default=40, help="answers: test questions per run")
    args = ap.parse_args()
    rows = []
    for path in args.bundle:
        pipe = Pipeline.from_bundle(path, verify=False)
        model = pipe.reasoner or pipe.extractor
        runs = [(f"answers T={t:g}", answers, (pipe, t, args.items)) for t in (0.0, 1.0)]
        runs += [(f"forced {kind}", forced, (model, kind, args.tokens, args.repeats)) for kind in KINDS]
        for name, run, run_args in runs:
            print(f"{path}: {name} ...", file=sys.stderr, flush=True)
            run(Clock(), *run_args, warmup=True)
            clocks = [Clock(remember=False), Clock(), Clock(speculate=False, remember=False)]  # cold, warm, mask
            for clock in clocks:
                run(clock, *run_args, warmup=False)
            step = statistics.median([s for clock in clocks for s in clock.steps])
            rows.append((Path(path).name, model.name.rsplit("/", 1)[-1], model.tokenizer.vocab_size, name,
                         clocks[0].tokens, step, [(c.count(c.miss) / max(c.tokens, 1), c.cost()) for c in clocks]))
    ways = "".join(f" {'computed':>8} {way + ' us':>8} {way:>6}" for way in ("cold", "warm", "mask"))
    print(f"\n{'bundle':<16} {'reasoner':<24} {'vocab':>6} {'scenario':<19} {'tokens':>6} {'decode ms':>9}{ways}")
    for bundle, name, vocab, scenario, n, step, costs in rows:
        cells = "".join(f" {share:>8.0%} {cost * 1e6:>8.1f} {cost / step:>6.1%}" for share, cost in costs)
        print(f"{bundle[-16:]:<16} {name[-24:]:<24} {vocab:>6} {scenario:<19} {n:>6} {step * 1e3:>9.3f}{cells}")

if __name__ == "__main__":
    main()
