"""Time to answer on a CPU: the paper-shaped pair on the transformers reference and as fp32 / int8 / int4 bundles,
one run, per stage and total, with ratios to the reference and each stage's roofline (bandwidth share of decode,
GEMM share of prefill and the vision tower).

    python benchmarks/time_to_answer.py [--work DIR] [--reasoner qwen3-1.7b] [--quants fp32,int8,int4]
        [--image-size 512x384] [--tokens 16] [--runs 2] [--max-image-tokens N] [--tiny]

The models are random with the paper's shapes (SigLIP so400m + Qwen3-0.6B extractor, Qwen3-1.7B reasoner; no
download), built once in --work and reused, as are the bundles (int4 with --int4-method rtn: the weights are
random, so calibration buys nothing and costs minutes). Every stage generates exactly --tokens tokens, so the
systems do equal work. `--tiny` runs the same on the tiny test models (a smoke test of the script, seconds).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from edgevlm import bench
from edgevlm.loading import Source


def models(work: Path, reasoner: str, tiny: bool) -> tuple[Path, Path]:
    """The extractor and reasoner directories, built on first use."""
    from edgevlm.train.tiny import make_paper_shaped, make_tiny

    ex, rs = work / "extractor", work / ("reasoner-tiny" if tiny else f"reasoner-{reasoner}")
    if not (ex / "config.json").exists():
        print(f"building the extractor in {ex} ...", flush=True)
        make_tiny("llava_onevision", ex) if tiny else make_paper_shaped("extractor-0.6b", ex)
    if not (rs / "config.json").exists():
        print(f"building the reasoner in {rs} ...", flush=True)
        make_tiny("qwen3", rs) if tiny else make_paper_shaped(reasoner, rs)
    return ex, rs


def bundles(work: Path, ex: Path, rs: Path, quants: list[str], max_image_tokens: int | None) -> list[Path]:
    """One bundle per precision, exported on first use."""
    from edgevlm.export.exporter import QuantPlan, export_bundle

    out = []
    for quant in quants:
        path = work / (f"bundle-{rs.name}-{quant}" + ("" if max_image_tokens is None else f"-{max_image_tokens}"))
        if not (path / "manifest.json").exists():
            print(f"exporting {path.name} ...", flush=True)
            start = time.perf_counter()
            plan = QuantPlan(extractor=quant, reasoner=quant, int4_method="rtn")
            export_bundle(path, extractor=str(ex), reasoner=str(rs), quant=plan, fidelity_samples=0,
                          max_image_tokens=max_image_tokens, overwrite=True,
                          log=lambda m: print(f"  {m}", flush=True))
            print(f"  {time.perf_counter() - start:.0f} s", flush=True)
        out.append(path)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="where models and bundles are kept (default: a temp dir)")
    parser.add_argument("--reasoner", default="qwen3-1.7b", choices=["qwen3-0.6b", "qwen3-1.7b"])
    parser.add_argument("--quants", default="fp32,int8,int4")
    parser.add_argument("--image-size", default="512x384", help="WxH of the random test image")
    parser.add_argument("--tokens", type=int, default=16, help="tokens every stage generates")
    parser.add_argument("--runs", type=int, default=2, help="timed runs per system, after one warmup")
    parser.add_argument("--max-image-tokens", type=int, default=None, help="the bundles' visual-token budget")
    parser.add_argument("--no-reference", action="store_true", help="time the bundles only")
    parser.add_argument("--tiny", action="store_true", help="the tiny test models instead (a smoke test)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="edgevlm-tta-"))
    work.mkdir(parents=True, exist_ok=True)
    ex, rs = models(work, args.reasoner, args.tiny)
    paths = bundles(work, ex, rs, [q.strip() for q in args.quants.split(",") if q.strip()], args.max_image_tokens)
    width, height = map(int, args.image_size.lower().split("x"))
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    items = [(image, "How many objects are on the table?", None)]
    bare = {"vision_cache_mb": 0, "prefix_cache_mb": 0}  # every run pays for its image and its whole prompt
    sources = [] if args.no_reference else [Source(extractor=str(ex), reasoner=str(rs), **bare)]
    sources += [Source(bundle=str(p), **bare) for p in paths]
    doc = bench.run(sources, items, options={"fixed_tokens": args.tokens}, warmup=1, runs=args.runs,
                    progress=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"\n{'tiny models' if args.tiny else 'paper-shaped, reasoner ' + args.reasoner}: {args.image_size} image, "
          f"{args.tokens} tokens a stage, median of {args.runs} runs")
    print(bench.report(doc))


if __name__ == "__main__":
    main()
