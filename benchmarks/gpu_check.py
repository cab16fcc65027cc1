"""The GPU check's measurements (benchmarks/gpu_check.sh runs this once the bundles and engines exist): a
TensorRT-flavour bundle on its engines (TensorRT backend) and on ONNX Runtime's CUDA provider, each against the
fp32 bundle on ONNX Runtime CPU.

- answers: the demo test items through the Extract->Think pipeline, greedy, compared with fp32 CPU's answers;
- top-1 agreement: teacher-forced on fp32's greedy tokens, each stage's model (extractor with its image,
  reasoner on text), the fraction of positions whose argmax matches fp32's;
- decode tok/s: the reasoner's decode steps (logits to the host and an argmax each), timed after a warm-up.

Exits 1 when answers or top-1 agreement fall below the bars (fp16 engines against fp32: the README's ONNX
Runtime fp16 fidelity figures are the expectation), printing the table either way; --json writes it all.

    python benchmarks/gpu_check.py --fp32 B32 --trt BTRT [--items 24] [--steps 128] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from edgevlm.evaluation import load_items
from edgevlm.pipeline import Pipeline, render_prompt
from edgevlm.profiler import format_table

ITEMS = Path(__file__).resolve().parents[1] / "edgevlm" / "demo" / "test" / "items.jsonl"
MIN_ANSWERS, MIN_TOP1 = 0.9, 0.95
SYSTEMS = {"tensorrt": dict(device="cuda"), "onnxruntime-cuda": dict(device="cuda", backend="onnxruntime")}


def answers(pipe: Pipeline, items: list[dict]) -> list[str]:
    return [pipe(str(i["image"]), i["question"], choices=i.get("choices"), temperature=0.0, max_new_tokens=64).answer
            for i in items]


def forced(model, prompt: str, image, tokens: list[int] | None, steps: int) -> tuple[list[int], list[int]]:
    """(the tokens fed, each position's argmax): greedy on `model` where `tokens` is None, else fed `tokens`."""
    prepared = model.prepare(render_prompt(model, prompt, with_image=image is not None), image)
    model.encode(prepared)
    state = model.prefill(prepared)
    fed, top = [], [int(np.argmax(state.logits))]
    for n in range(steps):
        token = top[-1] if tokens is None else tokens[n]
        fed.append(token)
        top.append(int(np.argmax(state.step(token))))
    return fed, top


def decode_rate(model, steps: int) -> float:
    prepared = model.prepare(render_prompt(model, "Count slowly from one to two hundred."))
    state = model.prefill(prepared)
    token = int(np.argmax(state.logits))
    for _ in range(8):  # warm-up: the decode profile, the kernels' first runs
        token = int(np.argmax(state.step(token)))
    start = time.perf_counter()
    for _ in range(steps):
        token = int(np.argmax(state.step(token)))
    return steps / (time.perf_counter() - start)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fp32", required=True, help="the fp32 bundle (ONNX Runtime CPU: the reference)")
    ap.add_argument("--trt", required=True, help="the TensorRT-flavour bundle, engines built")
    ap.add_argument("--items", type=int, default=24)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from PIL import Image

    items = load_items(ITEMS)[:args.items]
    image = Image.open(items[0]["image"]).convert("RGB")
    ref = Pipeline.from_bundle(args.fp32, device="cpu")
    want = answers(ref, items)
    probes = {"extract": (ref.extractor, "Describe the image.", image), "think": (ref.reasoner, "Why is the sky "
                                                                                     "blue? Answer briefly.", None)}
    ref_tokens = {k: forced(m, p, i, None, args.steps // 4) for k, (m, p, i) in probes.items()}
    report = {"cpu-fp32": {"backend": "onnxruntime", "decode_tok_s": decode_rate(ref.reasoner, args.steps)}}
    del ref
    ok = True
    for name, kw in SYSTEMS.items():
        print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
        pipe = Pipeline.from_bundle(args.trt, **kw)
        got = answers(pipe, items)
        entry = {"backend": pipe.reasoner.backend, "answers_agree": sum(a == b for a, b in zip(got, want,
                                                                                             strict=True)) / len(want)}
        models = {"extract": pipe.extractor, "think": pipe.reasoner}
        for stage, (_, prompt, img) in probes.items():
            fed, ref_top = ref_tokens[stage]
            _, top = forced(models[stage], prompt, img, fed, len(fed))
            entry[f"top1_{stage}"] = float(np.mean(np.array(top) == np.array(ref_top)))
        entry["decode_tok_s"] = decode_rate(pipe.reasoner, args.steps)
        entry["peak_gpu_mb"] = None if pipe.gpu_bytes() is None else round(pipe.gpu_bytes() / 1e6, 1)
        ok &= entry["answers_agree"] >= MIN_ANSWERS and min(entry["top1_extract"], entry["top1_think"]) >= MIN_TOP1
        report[name] = entry
        del pipe
    def percent(v):
        return None if v is None else 100.0 * v

    rows = [(name, e["backend"], percent(e.get("answers_agree")), percent(e.get("top1_extract")),
             percent(e.get("top1_think")), float(e["decode_tok_s"]), e.get("peak_gpu_mb"))
            for name, e in report.items()]
    print("\n".join(format_table(("system", "backend", "answers = fp32 %", "top-1 extract %", "top-1 think %",
                                  "decode tok/s", "GPU MB"), rows)))
    print(f"{len(items)} items; bars: answers >= {MIN_ANSWERS}, top-1 >= {MIN_TOP1}: {'PASS' if ok else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"items": len(items), "steps": args.steps, "pass": ok,
                                               "systems": report}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
