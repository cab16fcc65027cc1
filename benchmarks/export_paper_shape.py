"""Export a full-size random model of the paper's shape and run the bundle: export time, bundle size,
peak memory of each step, and per-stage latency, printed side by side.

    python benchmarks/export_paper_shape.py [--work DIR] [--reasoner qwen3-0.6b|qwen3-1.7b]
        [--quant fp32|fp16|int8|int4] [--int4-method awq|rtn|hqq] [--fidelity-samples N] [--image-size WxH]

The extractor is the paper's architecture (SigLIP so400m + projector + Qwen3-0.6B, AnyRes up to 6x6
crops of 384 px); weights are random, built from configs (no download). Export and run happen in
child processes, as a user runs them, so their peak RSS is measured apart from the model building.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def child(args: list[str]) -> tuple[float, float, str]:
    """Run `python -m edgevlm ARGS`; return wall seconds, the child's own peak RSS in MB, and its stdout.

    os.wait4 gives that child's rusage (RUSAGE_CHILDREN would be the maximum over every child so far)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "edgevlm", *args], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"edgevlm {' '.join(args[:2])} failed with exit code {proc.returncode}")
    return wall, usage.ru_maxrss / 1024, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="where models and the bundle go (default: a temp dir)")
    parser.add_argument("--reasoner", default="qwen3-0.6b", choices=["qwen3-0.6b", "qwen3-1.7b"])
    parser.add_argument("--quant", default="fp32", choices=["fp32", "fp16", "int8", "int4"])
    parser.add_argument("--int4-method", default="awq")
    parser.add_argument("--fidelity-samples", type=int, default=8, help="held-out prompts per stage (quantized)")
    parser.add_argument("--image-size", default="1024x768", help="WxH of the random test image")
    parser.add_argument("--reuse", action="store_true", help="reuse models and bundle already in --work")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="edgevlm-paper-"))
    from edgevlm.train.tiny import make_paper_shaped

    extractor, reasoner, bundle = work / "extractor", work / "reasoner", work / f"bundle-{args.quant}"
    build_s = export_s = export_rss = float("nan")
    if not (args.reuse and (reasoner / "config.json").exists()):
        print(f"building random models in {work} ...", flush=True)
        t = time.perf_counter()
        make_paper_shaped("extractor-0.6b", extractor)
        make_paper_shaped(args.reasoner, reasoner)
        build_s = time.perf_counter() - t
    if not (args.reuse and (bundle / "manifest.json").exists()):
        print("exporting (progress below) ...", flush=True)
        export_s, export_rss, _ = child(["export", "--out", str(bundle), "--extractor", str(extractor), "--reasoner",
                                         str(reasoner), "--quant", args.quant, "--int4-method", args.int4_method,
                                         "--fidelity-samples", str(args.fidelity_samples), "--overwrite"])
    size = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
    image = work / "photo.png"
    w, h = (int(x) for x in args.image_size.split("x"))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(image)
    run_s, run_rss, out = child(["run", str(image), "What is shown?", "--bundle", str(bundle), "--json",
                                 "--max-new-tokens", "16", "--think-budget", "16"])
    result = json.loads(out)
    print()
    print(f"{'step':<28}{'wall s':>10}{'peak RSS MB':>14}")
    print(f"{'build random models':<28}{build_s:>10.1f}{'':>14}")
    print(f"{'edgevlm export':<28}{export_s:>10.1f}{export_rss:>14.0f}")
    print(f"{'edgevlm run --bundle':<28}{run_s:>10.1f}{run_rss:>14.0f}")
    ex_size = sum(f.stat().st_size for f in (bundle / "extractor").rglob("*"))
    print(f"bundle: {bundle} {size / 1e9:.2f} GB ({args.quant}), extractor {ex_size / 1e9:.2f} GB")
    print(f"{'stage':<10}{'prompt':>8}{'new':>6}{'vision ms':>11}{'prefill ms':>12}{'TTFT ms':>10}{'decode tok/s':>14}")
    for stage, t in result["timings"].items():
        if isinstance(t, dict):
            tok = result["tokens"][stage]
            print(f"{stage:<10}{tok['prompt']:>8}{tok['generated']:>6}{t['vision_ms']:>11.0f}{t['prefill_ms']:>12.0f}"
                  f"{t['ttft_ms']:>10.0f}{t['decode_tok_s']:>14.1f}")


if __name__ == "__main__":
    main()
