"""Answers per minute on a stream of camera frames, with frame pipelining and without, side by side.

A robot asks one question about every frame of a stream. In turn, each frame's plan, extract and think run
before the next frame's start; pipelined (`Pipeline(pipelined=True)`), two frames are in flight and each stage
takes its model when it is free, so the extractor describes frame t+1 while the reasoner thinks about frame t.
This sends the same frames (the demo's test images, each question about its own frame, greedy) through an
edgevlm.runner.Runner in each setting, in alternating rounds, and prints answers per minute, the median
latency of an answer and the ratio to in-turn, with the default threads (every core a session in turn; half the
cores a session pipelined, so the two do not contend) and with one thread a session. The answers must be the
same in every setting.

    python benchmarks/frame_pipelining.py --bundle BUNDLE [--frames 12] [--rounds 3] [--tokens N]

`--tokens N` makes every stage generate exactly N tokens (for models not trained on the demo's questions, which
would think at length).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from edgevlm.pipeline import Pipeline
from edgevlm.profiler import format_table
from edgevlm.runner import Runner

DEMO = Path(__file__).resolve().parents[1] / "edgevlm" / "demo" / "test"


def stream(n: int) -> list[tuple[str, str, list | None]]:
    """n (frame, question, choices), one question per demo test image."""
    items, seen = [], set()
    for line in (DEMO / "items.jsonl").read_text().splitlines():
        item = json.loads(line)
        if item["image"] not in seen:
            seen.add(item["image"])
            items.append((str(DEMO / item["image"]), item["question"], item["choices"]))
    return items[:n]


def run(pipe: Pipeline, frames: list, tokens: int | None) -> tuple[float, list[float], list[str]]:
    """(seconds for the whole stream, each answer's latency in seconds, the answers)."""
    start = time.perf_counter()
    with Runner(pipe, max_queue=len(frames)) as runner:
        requests = [runner.submit(f, q, choices=c, temperature=0, fixed_tokens=tokens) for f, q, c in frames]
        results = [r.result() for r in requests]
    seconds = time.perf_counter() - start
    # latency of an answer: from its request's start on the models to its end (queue wait excluded)
    return seconds, [r.total_ms / 1e3 for r in results], [r.answer for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--frames", type=int, default=12, help="Frames in the stream.")
    parser.add_argument("--rounds", type=int, default=3, help="Timed rounds per setting (median).")
    parser.add_argument("--tokens", type=int, default=None, help="Tokens every stage generates (default: EOS).")
    args = parser.parse_args()
    frames = stream(args.frames)
    settings = {}
    for threads in (None, 1):
        for pipelined in (False, True):
            pipe = Pipeline.from_bundle(args.bundle, threads=threads, verify=False, pipelined=pipelined)
            if pipelined and not pipe.pipelined:
                raise SystemExit("the memory plan does not fit both models' stages at once on this machine")
            settings[(threads, pipelined)] = pipe
    times: dict = {k: [] for k in settings}
    latencies: dict = {k: [] for k in settings}
    answers = {}
    for n in range(args.rounds + 1):  # the first round warms every setting up
        for key, pipe in settings.items():
            seconds, each, said = run(pipe, frames, args.tokens)
            answers[key] = said
            if n:
                times[key].append(seconds)
                latencies[key].extend(each)
        print(f"round {n}/{args.rounds}", flush=True)
    same = len({tuple(a) for a in answers.values()}) == 1
    rows = []
    for (threads, pipelined), t in times.items():
        per_min = len(frames) * 60 / statistics.median(t)
        base = len(frames) * 60 / statistics.median(times[(threads, False)])
        default = "half the cores" if pipelined else "every core"
        rows.append(("pipelined" if pipelined else "in turn", threads or default,
                     f"{per_min:.1f}", f"{statistics.median(latencies[(threads, pipelined)]) * 1e3:.0f}",
                     f"{per_min / base:.2f}x"))
    print(f"\n{args.bundle}: {len(frames)} frames a round, one question each, greedy; {os.cpu_count()} cores; "
          f"median of {args.rounds} rounds")
    print("\n".join(format_table(("frames", "threads/session", "answers/min", "answer p50 ms", "vs in turn"),
                                 rows)))
    default = Pipeline.from_bundle(args.bundle, verify=False)
    print(f"answers identical in every setting: {same}; Pipeline's default here: "
          f"{'pipelined' if default.pipelined else 'in turn'}")
    if not same:
        raise SystemExit("the settings answered differently")


if __name__ == "__main__":
    main()
