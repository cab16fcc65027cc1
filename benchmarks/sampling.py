"""What choosing a token costs, side by side in one run: edgevlm's sampler against the way it sampled before
2026-12-03 (HF's warpers in numpy: a stable sort of the whole vocabulary for top-p, a cumulative sum of it for
the draw) and against transformers' own warpers and torch.multinomial (what `generate` does), per vocabulary
size and decoding. A decode step of a small model takes 0.3 ms (the demo) to tens of ms; the old sampler cost
5 ms a token at the paper's thinking decoding over a 49k vocabulary and 12 ms over Qwen3's 152k.

    python benchmarks/sampling.py [--vocab 996,49152,151936] [--tokens 200] [--rounds 3]

Logits: a next-token distribution the shape of a language model's (a handful of likely tokens 14-18 above a
normal(0, 2.5) rest, which carry most of the probability), fresh each token from a fixed seed. Per row:
microseconds a token, the median of ROUNDS runs of TOKENS tokens, and edgevlm's speedup over each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from edgevlm.generation import Decoding, sample
from edgevlm.prompts import NO_THINK, THINK

DECODINGS = {
    "think (paper)": THINK,  # temperature 0.6, top-p 0.95, top-k 20
    "no-think": NO_THINK,  # 0.7, 0.8, 20
    "temperature 1": Decoding(1, temperature=1.0),
    "top-p 0.9": Decoding(1, temperature=0.7, top_p=0.9),
}


def sorted_sample(logits: np.ndarray, decoding: Decoding, rng: np.random.Generator) -> int:
    """edgevlm's sampler until 2026-12-03 (its warp, softmax and draw): HF's order (temperature, top-k, top-p)
    over the whole vocabulary."""
    x = logits.astype(np.float64) / decoding.temperature
    if 0 < decoding.top_k < x.size:
        kth = np.partition(x, -decoding.top_k)[-decoding.top_k]
        x[x < kth] = -np.inf
    if decoding.top_p < 1.0:
        order = np.argsort(x, kind="stable")
        remove = np.cumsum(_softmax(x[order])) <= (1.0 - decoding.top_p)
        remove[-1] = False
        x[order[remove]] = -np.inf
    cdf = np.cumsum(_softmax(x))
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), logits.size - 1))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()


def transformers_sampler():
    """transformers' warpers and torch.multinomial, or None where they are not installed."""
    try:
        import torch
        from transformers.generation.logits_process import (
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )
    except ImportError:
        return None
    torch.set_num_threads(1)

    def run(logits: np.ndarray, decoding: Decoding, rng) -> int:
        scores = TemperatureLogitsWarper(decoding.temperature)(None, torch.from_numpy(logits)[None])
        if decoding.top_k:
            scores = TopKLogitsWarper(decoding.top_k)(None, scores)
        if decoding.top_p < 1.0:
            scores = TopPLogitsWarper(decoding.top_p)(None, scores)
        return int(torch.multinomial(torch.softmax(scores, -1), 1))

    return run


def logits_like_a_model(rng: np.random.Generator, vocab: int) -> np.ndarray:
    x = rng.normal(0.0, 2.5, vocab).astype(np.float32)
    x[rng.choice(vocab, 5, replace=False)] += rng.uniform(14, 18, 5).astype(np.float32)
    return x


def per_token_us(fn, vocab: int, decoding: Decoding, tokens: int) -> float:
    rng = np.random.default_rng(0)
    inputs = [logits_like_a_model(rng, vocab) for _ in range(tokens)]
    draw = np.random.default_rng(1)
    fn(inputs[0], decoding, draw)  # warm
    start = time.perf_counter()
    for logits in inputs:
        fn(logits, decoding, draw)
    return (time.perf_counter() - start) / tokens * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", default="996,49152,151936")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    samplers = {"edgevlm": sample, "sort (before)": sorted_sample}
    if (hf := transformers_sampler()) is not None:
        samplers["transformers"] = hf
    else:
        print("transformers/torch not installed: that column is skipped", file=sys.stderr)
    rows = []
    for vocab in (int(v) for v in args.vocab.split(",")):
        for name, decoding in DECODINGS.items():
            print(f"vocab {vocab}: {name} ...", file=sys.stderr, flush=True)
            times = {s: [] for s in samplers}
            for _ in range(args.rounds):  # in turns: this machine's speed drifts over minutes
                for s, fn in samplers.items():
                    times[s].append(per_token_us(fn, vocab, decoding, args.tokens))
            rows.append((vocab, name, {s: statistics.median(t) for s, t in times.items()}))
    others = [s for s in samplers if s != "edgevlm"]
    print(f"\n{'vocab':>7} {'decoding':<14} " + " ".join(f"{s + ' us':>17}" for s in samplers)
          + " " + " ".join(f"{'x ' + s:>17}" for s in others))
    for vocab, name, us in rows:
        print(f"{vocab:>7} {name:<14} " + " ".join(f"{us[s]:>17.1f}" for s in samplers) + " "
              + " ".join(f"{us[s] / us['edgevlm']:>16.1f}x" for s in others))


if __name__ == "__main__":
    main()
