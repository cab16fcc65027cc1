"""Planner time to first token with and without the prompt-prefix KV cache, side by side.

Every planner prompt starts with the same few-shot block; with the cache on, a question after the first
prefills only its own tokens. For each question this times the plan stage's prefill (its first token
comes from the prefill's logits) cold (cache off) and warm (cache on, after one other question), on the
bundle's planner model, and prints both with their ratio.

    python benchmarks/prefix_cache.py --bundle BUNDLE [--questions 6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

from edgevlm import bundle, prompts
from edgevlm.backends.onnx import OrtModel
from edgevlm.cache import PrefixCache
from edgevlm.pipeline import PREFIX_CACHE_MB, render_prompt
from edgevlm.profiler import format_table

QUESTIONS = [
    "How many cups are on the table?", "What is written on the sign above the door?",
    "Is the red car to the left of the truck?", "What color is the umbrella the woman holds?",
    "Which shelf holds the most books?", "Are there more apples than oranges in the bowl?",
    "What time does the clock show?", "Where is the cat sitting?",
]


def ttft_ms(model: OrtModel, prompt: str) -> tuple[float, int, int]:
    prepared = model.prepare(prompt)
    start = time.perf_counter()
    state = model.prefill(prepared)
    state.logits.argmax()  # the first token
    return (time.perf_counter() - start) * 1e3, len(prepared.input_ids), state.reused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--questions", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3, help="Timed repeats per question and setting (median).")
    args = parser.parse_args()
    b = bundle.load(args.bundle, verify=False)
    model = OrtModel(b, b.stages["plan"])
    prompts_ = [render_prompt(model, prompts.planner_prompt(q), enable_thinking=False)
                for q in QUESTIONS[:args.questions]]
    ttft_ms(model, prompts_[0])  # warm the session up
    rows, ratios = [], []
    for n, prompt in enumerate(prompts_, 1):
        model.prefix_cache = PrefixCache(0)
        cold = [ttft_ms(model, prompt) for _ in range(args.repeats)]
        warm = []
        for _ in range(args.repeats):  # each warm run starts from a cache holding only another question's prompt
            model.prefix_cache = PrefixCache(int(PREFIX_CACHE_MB * 1e6))
            ttft_ms(model, prompts_[n % len(prompts_)])
            warm.append(ttft_ms(model, prompt))
        cold_ms, warm_ms = statistics.median(c[0] for c in cold), statistics.median(w[0] for w in warm)
        ratios.append(cold_ms / warm_ms)
        rows.append((n, cold[0][1], warm[0][2], cold_ms, warm_ms, cold_ms / warm_ms))
        print(f"question {n}/{len(prompts_)} timed", flush=True)
    print(f"\nplanner TTFT on {args.bundle} ({model.name}), median of {args.repeats}")
    print("\n".join(format_table(("question", "prompt tokens", "reused", "cold ms", "warm ms", "cold/warm"), rows)))
    print(f"median speed-up of planner TTFT: {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
