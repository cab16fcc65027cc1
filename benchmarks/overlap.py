"""Extract->Think latency with the vision tower run beside the planner, and in turn, side by side.

The planner needs no image, so `Pipeline(overlap=True)` encodes the image on a second thread while the
planner decodes. This times whole calls (a fresh image each time, vision and prefix caches off, fixed
token counts so both settings generate the same) with overlap off and on, in alternation, and prints the
median latency, the plan stage's latency, the vision tower's own time and the time the extract stage
waited for it, with the ratio. Where the two sessions share too few cores the overlap can lose: that is
what Pipeline's default (on with 4 or more cores or a GPU) follows.

    python benchmarks/overlap.py --bundle BUNDLE [--repeats 5] [--tokens 16] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics

import numpy as np
from PIL import Image

from edgevlm.pipeline import Pipeline
from edgevlm.profiler import format_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--repeats", type=int, default=5, help="Timed calls per setting (median).")
    parser.add_argument("--tokens", type=int, default=16, help="Tokens every stage generates.")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads per session.")
    parser.add_argument("--size", default="640x480", help="Image size, WxH (random pixels).")
    args = parser.parse_args()
    width, height = map(int, args.size.lower().split("x"))
    pipes = {ov: Pipeline.from_bundle(args.bundle, threads=args.threads, verify=False, vision_cache_mb=0,
                                      prefix_cache_mb=0, overlap=ov) for ov in (False, True)}
    if not pipes[True].overlap:
        raise SystemExit("the memory plan does not fit the planner and the vision tower at once on this machine")
    rng = np.random.default_rng(0)
    runs: dict[bool, list] = {False: [], True: []}
    for n in range(args.repeats + 1):  # the first round warms both up
        for ov, pipe in pipes.items():
            image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
            r = pipe(image, "How many shapes are there?", fixed_tokens=args.tokens, think_budget=args.tokens)
            extract = r.stages["extract"]
            if n:
                runs[ov].append((r.total_ms, r.stages["plan"].timings.total_ms, extract.timings.vision_ms,
                                 extract.memory.get("vision_overlapped_ms", extract.timings.vision_ms)))
        print(f"round {n}/{args.repeats}", flush=True)
    rows = []
    for ov in (False, True):
        total, plan, wait, tower = (statistics.median(x[i] for x in runs[ov]) for i in range(4))
        rows.append(("beside the planner" if ov else "in turn", total, plan, tower, wait))
    print(f"\n{args.bundle}: {args.size} image, {args.tokens} tokens a stage, {os.cpu_count()} cores, "
          f"median of {args.repeats}")
    print("\n".join(format_table(("vision tower", "total ms", "plan ms", "tower ms", "extract waits ms"), rows)))
    print(f"latency in turn / beside: {rows[0][1] / rows[1][1]:.2f}x")


if __name__ == "__main__":
    main()
