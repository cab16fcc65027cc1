"""The memory plan against what a run really holds: planned peak vs measured peak RSS, side by side.

For each budget this loads the bundle in a fresh process with `--memory-budget`, answers one question
about a large image (the most AnyRes crops the extractor takes, so the extract prompt is as long as it
gets) with the planned contexts, and prints the plan's estimate beside the process's peak RSS and the KV
the stages allocated. A plan is honest when the measured peak stays under the budget.

    python benchmarks/memory_plan.py --bundle BUNDLE [--budget 12GB --budget 16GB] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from edgevlm.profiler import format_table

CHILD = """
import json, sys
from edgevlm.pipeline import Pipeline
bundle, budget, image, new = sys.argv[1:5]
pipe = Pipeline.from_bundle(bundle, memory_budget=budget, verify=False)
result = pipe(image, "Describe everything you see in this picture.", max_new_tokens=int(new), think_budget=int(new))
print(json.dumps({"plan": pipe.memory_plan.to_dict(), "peak_rss_mb": result.peak_rss_bytes / 1e6,
                  "kv_mb": {n: s.memory["kv_allocated"] / 1e6 for n, s in result.stages.items()},
                  "prompt_tokens": {n: s.prompt_tokens for n, s in result.stages.items()}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--budget", action="append", help="A memory budget to plan for (repeat); default: 12GB.")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--size", default="2304x2304", help="The test image's WxH (default: the largest AnyRes grid).")
    args = parser.parse_args()
    w, h = map(int, args.size.split("x"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "large.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(image)
        for budget in args.budget or ["12GB"]:
            print(f"memory_plan: {budget} ...", file=sys.stderr, flush=True)
            proc = subprocess.run([sys.executable, "-c", CHILD, args.bundle, budget, str(image),
                                   str(args.max_new_tokens)], capture_output=True, text=True)
            if proc.returncode:
                rows.append([budget, "-", "-", "-", "-", proc.stderr.strip().splitlines()[-1][:100]])
                continue
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            plan = out["plan"]
            rows.append([budget, plan["estimate_mb"], round(out["peak_rss_mb"], 1),
                         f"{out['peak_rss_mb'] / plan['estimate_mb']:.2f}",
                         " ".join(f"{k}={v}" for k, v in plan["max_context"].items()),
                         " ".join(f"{k}={v:.0f}MB/{out['prompt_tokens'][k]}tok" for k, v in out["kv_mb"].items())])
    print("\n".join(format_table(("budget", "plan MB", "peak RSS MB", "RSS/plan", "planned context",
                                   "KV allocated / prompt"), rows)))


if __name__ == "__main__":
    main()
