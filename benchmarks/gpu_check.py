"""The GPU check's measurements (benchmarks/gpu_check.sh runs this once the bundles and engines exist), each
system against the fp32 bundle on ONNX Runtime CPU:

- `tensorrt`: the TensorRT-flavour bundle on its engines (the TensorRT backend);
- `onnxruntime-cuda`: the same bundle's graphs on ONNX Runtime's CUDA provider;
- `onnxruntime-cuda-fp32`: the fp32 ONNX Runtime bundle (contrib operators) on the CUDA provider.

What is measured:
- answers: the demo test items through the Extract->Think pipeline, greedy, compared with fp32 CPU's answers;
- top-1 agreement: teacher-forced on fp32's greedy tokens, each stage's model (extractor with its image,
  reasoner on text), the fraction of positions whose argmax matches fp32's;
- decode tok/s: the reasoner's decode steps (logits to the host and an argmax each), timed after a warm-up.

A system that fails to load or run is reported with its one-line error and fails the check; the others still
run. Exits 1 when any system errs or falls below the bars (fp16 engines against fp32: the README's ONNX Runtime
fp16 fidelity figures are the expectation), printing the table either way; --json writes it all.

    python benchmarks/gpu_check.py --fp32 B32 --trt BTRT [--systems a,b] [--items 24] [--steps 128] [--json out]
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
# name: (the bundle it loads: --trt or --fp32, Pipeline.from_bundle's options)
SYSTEMS = {"tensorrt": ("trt", dict(device="cuda")),
           "onnxruntime-cuda": ("trt", dict(device="cuda", backend="onnxruntime")),
           "onnxruntime-cuda-fp32": ("fp32", dict(device="cuda"))}


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


def measure(path: str, kw: dict, items: list[dict], want: list[str], probes: dict, ref_tokens: dict,
            steps: int) -> dict:
    """One system's row: answers against fp32 CPU's, each stage's teacher-forced top-1, decode tok/s, GPU MB."""
    pipe = Pipeline.from_bundle(path, **kw)
    got = answers(pipe, items)
    entry = {"backend": pipe.reasoner.backend,
             "answers_agree": sum(a == b for a, b in zip(got, want, strict=True)) / len(want)}
    models = {"extract": pipe.extractor, "think": pipe.reasoner}
    for stage, (_, prompt, img) in probes.items():
        fed, ref_top = ref_tokens[stage]
        _, top = forced(models[stage], prompt, img, fed, len(fed))
        entry[f"top1_{stage}"] = float(np.mean(np.array(top) == np.array(ref_top)))
    entry["decode_tok_s"] = decode_rate(pipe.reasoner, steps)
    gpu = pipe.gpu_bytes()
    entry["peak_gpu_mb"] = None if gpu is None else round(gpu / 1e6, 1)
    return entry


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fp32", required=True, help="the fp32 bundle (ONNX Runtime CPU: the reference)")
    ap.add_argument("--trt", required=True, help="the TensorRT-flavour bundle, engines built")
    ap.add_argument("--systems", default=",".join(SYSTEMS),
                    help=f"which systems to measure, comma-separated (default: all of {', '.join(SYSTEMS)})")
    ap.add_argument("--items", type=int, default=24)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    systems = [name.strip() for name in args.systems.split(",") if name.strip()]
    if not systems or set(systems) - set(SYSTEMS):
        ap.error(f"--systems takes some of {', '.join(SYSTEMS)}")
    from PIL import Image

    from edgevlm.errors import first_line

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
    for name in systems:
        print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
        which, kw = SYSTEMS[name]
        try:
            report[name] = measure(getattr(args, which), kw, items, want, probes, ref_tokens, args.steps)
        except Exception as e:  # noqa: BLE001 - one system's failure is a row of the report, not the end of it
            report[name] = {"backend": "-", "error": first_line(e)[:300]}
        e = report[name]
        ok &= "error" not in e and e["answers_agree"] >= MIN_ANSWERS and min(e["top1_extract"],
                                                                              e["top1_think"]) >= MIN_TOP1

    def percent(v):
        return None if v is None else 100.0 * v

    rows = [(name, e["backend"], percent(e.get("answers_agree")), percent(e.get("top1_extract")),
             percent(e.get("top1_think")), e.get("decode_tok_s"), e.get("peak_gpu_mb")) for name, e in report.items()]
    print("\n".join(format_table(("system", "backend", "answers = fp32 %", "top-1 extract %", "top-1 think %",
                                  "decode tok/s", "GPU MB"), rows)))
    for name, e in report.items():
        if "error" in e:
            print(f"{name}: {e['error']}")
    print(f"{len(items)} items; bars: answers >= {MIN_ANSWERS}, top-1 >= {MIN_TOP1}: {'PASS' if ok else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"items": len(items), "steps": args.steps, "pass": ok,
                                               "systems": report}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
