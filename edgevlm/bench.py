"""`edgevlm bench`: warmup, then N timed runs of the pipeline; per-stage percentiles, TTFT, decode rate,
memory and the decode roofline, as a table, as JSON (schema: edgevlm/bench.schema.json) and as a plot.

A run's stages are timed by the pipeline's profiler; this module loads each system in turn (edgevlm.loading),
repeats, aggregates and reports.
The roofline: each decoded token reads the decoder's weights and the KV cache once, so
bytes/token x tokens/s is the memory traffic decoding achieved, next to what the memory can give: a named
target's peak, or a read of as many bytes on this machine with the run's threads (edgevlm.targets.ceiling).
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from edgevlm import __version__, loading, memory, targets
from edgevlm.bundle import atomic_file
from edgevlm.calibration.data import read_items
from edgevlm.errors import UsageError
from edgevlm.images import load_image
from edgevlm.loading import Source
from edgevlm.manifest import ModelSpec
from edgevlm.options import Options
from edgevlm.profiler import format_table, measure_gemm, peak_rss_bytes

SCHEMA = "edgevlm.bench/1"
SCHEMA_FILE = Path(__file__).with_name("bench.schema.json")
STAGE_ORDER = ("plan", "extract", "think", "direct")
PHASES = ("preprocess", "vision", "embed", "prefill", "decode")


def load_items(images: list[str], questions: list[str], data: str | None) -> list[tuple]:
    """(PIL image, question, choices) to cycle through: every image with every question, or a JSONL file's
    lines ({"image": path relative to the file, "question": ..., "choices": [...] optional})."""
    items = []
    if data:
        path = Path(data)  # every line checked as eval's and tune's are, FILE:LINE, before any run
        for _, raw in read_items(path, answer=False):
            items.append((load_image(path.parent / raw["image"]), raw["question"], raw.get("choices") or None))
    else:
        if not images or not questions:
            raise UsageError("give --image and --question (each may repeat), or --data FILE.jsonl")
        pils = [load_image(i) for i in images]
        items = [(pil, q, None) for pil in pils for q in questions]
    if not items:
        raise UsageError(f"{data} holds no items")
    return items


def stats(values) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"p50": round(float(np.percentile(a, 50)), 3), "p90": round(float(np.percentile(a, 90)), 3),
            "max": round(float(a.max()), 3), "mean": round(float(a.mean()), 3)}


def run(sources: list[Source], items: list[tuple], *, options: dict | None = None, warmup: int = 1, runs: int = 5,
        target: str | None = None, progress: Callable[[str], None] = lambda m: None) -> dict:
    """Time each system in `sources` (loaded one at a time) on `items`, with the pipeline `options` (checked
    first), against `target`'s memory bandwidth (default: read tests here); the bench document."""
    if not sources:
        raise UsageError("nothing to time: give a bundle or an HF pair")
    options = options or {}
    opts = Options.of(options)
    bandwidth, ceiling = targets.bandwidth(target), targets.ceiling(target)

    def time_one(source: Source, pipe) -> dict:
        return bench(pipe, items, label=source.label(), source=_source(source, pipe), warmup=warmup, runs=runs,
                     options=options, ceiling=ceiling, progress=progress)

    results = loading.each(sources, time_one, load_reasoner=opts.mode != "direct", progress=progress)
    settings = {"warmup": warmup, "runs": runs, "fixed_tokens": opts.fixed_tokens, "mode": opts.mode,
                "think": opts.think, "think_budget": opts.think_budget, "items": len(items),
                "device": sources[0].device, "vision_cache": bool(sources[0].vision_cache_mb),
                "prefix_cache": bool(sources[0].prefix_cache_mb)}
    return document(results, settings=settings, bandwidth=bandwidth)


def _source(source: Source, pipe) -> dict:
    if source.bundle:
        return {"bundle": source.bundle}
    return {"extractor": pipe.extractor.name, "reasoner": pipe.reasoner.name if pipe.reasoner else None}


def bench(pipe, items: list[tuple], *, label: str, source: dict, warmup: int = 1, runs: int = 5,
          options: dict | None = None, ceiling: Callable[[int], float] | None = None,
          progress: Callable[[str], None] = lambda m: None) -> dict:
    """Warm up, time `runs` runs cycling through `items`, and aggregate them into one result entry; `ceiling`
    gives the bandwidth (GB/s) a decode step reading that many bytes is compared with."""
    options = options or {}
    for i in range(warmup):
        image, question, choices = items[i % len(items)]
        pipe(image, question, choices=choices, **options)
        progress(f"{label}: warmup {i + 1}/{warmup}")
    results = []
    for i in range(runs):
        image, question, choices = items[i % len(items)]
        results.append(pipe(image, question, choices=choices, **options))
        progress(f"{label}: run {i + 1}/{runs}  {results[-1].total_ms:.0f} ms")
    names = [s for s in STAGE_ORDER if s in results[0].stages]
    reasoner = pipe.reasoner.spec if pipe.reasoner is not None else None
    specs = {"plan": reasoner, "think": reasoner, "extract": pipe.extractor.spec, "direct": pipe.extractor.spec}
    stages = {name: _stage([r.stages[name] for r in results if name in r.stages], ceiling, specs[name])
              for name in names}
    weights = {s.model: sum(s.memory.get("weights", {}).values()) for s in results[0].stages.values()}
    return {
        "label": label,
        "source": source,
        "backend": results[0].stages[names[0]].memory.get("backend", "unknown"),
        "runs": runs,
        "total_ms": stats([r.total_ms for r in results]),
        "stages": stages,
        "memory": {
            "weights_mb": round(sum(weights.values()) / 1e6, 3),
            "kv_allocated_mb": round(max(e["kv_allocated_mb"] for e in stages.values()), 3),
            "peak_rss_mb": round(peak_rss_bytes() / 1e6, 1),
            "peak_gpu_mb": _peak_gpu_mb(pipe),
        },
    }


def _stage(runs_of: list, ceiling: Callable[[int], float] | None, spec: ModelSpec | None) -> dict:
    """One stage's entry: its runs' percentiles, rates, token counts, KV sizes and roofline."""
    t = [s.timings for s in runs_of]
    decode_tok_s = [x.decode_tok_s for x in t if x.decode_tok_s > 0]
    entry = {
        "latency_ms": stats([x.total_ms for x in t]),
        "ttft_ms": stats([x.ttft_ms for x in t]),
        **{f"{p}_ms": stats([getattr(x, f"{p}_ms") for x in t]) for p in PHASES},
        "prefill_tok_s": round(float(np.median([x.prefill_tok_s for x in t])), 3),
        "decode_tok_s": round(float(np.median(decode_tok_s)), 3) if decode_tok_s else None,
        "prompt_tokens": round(float(np.mean([s.prompt_tokens for s in runs_of])), 1),
        "new_tokens": round(float(np.mean([s.new_tokens for s in runs_of])), 1),
        "kv_allocated_mb": round(max(s.memory.get("kv_allocated", 0) for s in runs_of) / 1e6, 3),
        "kv_used_mb": round(max(s.memory.get("kv_used", 0) for s in runs_of) / 1e6, 3),
    }
    entry["roofline"] = roofline(runs_of, entry["decode_tok_s"], ceiling)
    entry["compute"] = compute_roofline(runs_of, spec)
    return entry


def roofline(stage_runs, decode_tok_s: float | None, ceiling: Callable[[int], float] | None) -> dict:
    """Bytes each decoded token reads (decoder weights, less the token-embedding rows it does not read, + the
    KV cache at the mean decode length) and the traffic that amounts to at the measured rate, against the
    bandwidth `ceiling` gives for a read of that many bytes. Where the decode read faster than that (a read test
    is a lower bound of what the memory delivers, and moves a few percent between runs), the decode's own rate
    is the ceiling: 100%, `ceiling_is_decode` true, never a figure above it."""
    s = stage_runs[0]
    weights = s.memory.get("step_weights", s.memory.get("weights", {}).get("decoder", 0))
    total = s.prompt_tokens + s.new_tokens
    kv_per_position = s.memory.get("kv_used", 0) / total if total else 0.0
    kv_read = kv_per_position * (s.prompt_tokens + s.new_tokens / 2)
    per_token = weights + kv_read
    achieved = per_token * decode_tok_s / 1e9 if decode_tok_s else None
    bandwidth_gb_s = ceiling(int(per_token)) if ceiling is not None and per_token else None
    measured_below = bool(achieved and bandwidth_gb_s and achieved > bandwidth_gb_s)
    if measured_below:  # the decode itself read faster than the read test: the test under-stated the memory
        bandwidth_gb_s = achieved
    return {
        "bytes_per_token": int(per_token),
        "achieved_gb_s": round(achieved, 3) if achieved is not None else None,
        "bandwidth_gb_s": round(bandwidth_gb_s, 3) if bandwidth_gb_s else None,
        "fraction": round(achieved / bandwidth_gb_s, 4) if achieved and bandwidth_gb_s else None,
        "ceiling_is_decode": measured_below,
    }


def compute_roofline(stage_runs, spec: ModelSpec | None) -> dict:
    """Prefill and the vision tower, the stages' compute-bound parts, against the GEMM rate ONNX Runtime reaches
    here at their precision with the run's threads: FLOPs (edgevlm.memory's floor count from the manifest's
    sizes) over time, medians over the runs. Nones where a figure cannot be had (no bundle, no vision run). A
    part that computed faster than the probe did is at 100%, `{part}_ceiling_is_stage` true: the probe is one
    shape, and others run faster (SigLIP's layers up to ~15% here)."""
    out = {"prefill_gflop_s": None, "prefill_fraction": None, "vision_gflop_s": None, "vision_fraction": None}
    if spec is None:
        return out
    prefill, vision = [], []
    for s in stage_runs:
        reused = s.memory.get("prefix_tokens", 0)
        flops = memory.prefill_flops(spec, s.prompt_tokens - reused, reused)
        if flops and s.timings.prefill_ms > 0:
            prefill.append(flops / s.timings.prefill_ms / 1e6)
        crops, tower_ms = s.memory.get("vision_crops", 0), s.memory.get("vision_overlapped_ms", s.timings.vision_ms)
        flops = memory.vision_flops(spec, crops)
        if flops and tower_ms > 0:
            vision.append(flops / tower_ms / 1e6)
    for part, rates, graph in (("prefill", prefill, "decoder"), ("vision", vision, "vision")):
        if rates and graph in spec.graphs:
            rate = float(np.median(rates))
            peak = measure_gemm(memory.compute_precision(spec.graphs[graph].quant))
            # a stage faster than the probe (other shapes run faster than its one) is at the ceiling, its own rate
            out[f"{part}_gflop_s"], out[f"{part}_fraction"] = round(rate, 3), round(min(rate / peak, 1.0), 4)
            if rate > peak:
                out[f"{part}_ceiling_is_stage"] = True
    return out


def _peak_gpu_mb(pipe) -> float | None:
    """The GPU memory the run used at most: what the TensorRT backend's models hold, else torch's allocator's
    peak (a torch run); None without a GPU. (ONNX Runtime's CUDA provider's arena is not counted.)"""
    held = pipe.gpu_bytes() if hasattr(pipe, "gpu_bytes") else None
    if held is not None:
        return round(held / 1e6, 1)
    torch = sys.modules.get("torch")  # only a torch run can have used the GPU through torch
    if torch is None or not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 1e6, 1)


def document(results: list[dict], *, settings: dict, bandwidth: dict) -> dict:
    return {
        "schema": SCHEMA,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "edgevlm": __version__,
        "machine": {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
                    **bandwidth},
        "settings": settings,
        "results": results,
    }


def validate(doc: dict) -> None:
    """Check `doc` against the JSON schema (needs the jsonschema package; the dev extra has it)."""
    import jsonschema

    jsonschema.validate(doc, json.loads(SCHEMA_FILE.read_text()))


def write(doc: dict, path: str | Path) -> None:
    """Save a bench document as JSON, in one rename (a reader never sees half of it)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=2))


def read(path: str) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: not a bench JSON file ({e})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise UsageError(f"{path}: not an edgevlm bench file (expected schema {SCHEMA!r})")
    return doc


# ---------------------------------------------------------------------------------------------- reports
def report(doc: dict) -> str:
    """Per result: a per-stage table (p50/p90/max latency, TTFT, rates, roofline) and the memory line."""
    s = doc["settings"]
    lines = [f"{s['runs']} timed runs after {s['warmup']} warmup; "
             f"{'fixed ' + str(s['fixed_tokens']) + ' tokens per stage' if s.get('fixed_tokens') else 'EOS ends'};"
             f" bandwidth {doc['machine']['bandwidth_gb_s']:.1f} GB/s ({doc['machine']['bandwidth_source']})"]
    head = ("stage", "p50 ms", "p90 ms", "max ms", "TTFT ms", "vision ms", "prefill tok/s", "decode tok/s",
            "new tok", "decode GB/s", "% bw", "prefill GFLOP/s", "% gemm", "vision GFLOP/s", "% gemm")
    for r in doc["results"]:
        lines += ["", f"{r['label']}  ({r['backend']})"]
        rows = []
        for name, st in r["stages"].items():
            roof, compute = st["roofline"], st.get("compute", {})
            rows.append((name, st["latency_ms"]["p50"], st["latency_ms"]["p90"], st["latency_ms"]["max"],
                         st["ttft_ms"]["p50"], st["vision_ms"]["p50"], st["prefill_tok_s"], st["decode_tok_s"],
                         st["new_tokens"], roof["achieved_gb_s"], _percent(roof["fraction"]),
                         compute.get("prefill_gflop_s"), _percent(compute.get("prefill_fraction")),
                         compute.get("vision_gflop_s"), _percent(compute.get("vision_fraction"))))
        t = r["total_ms"]
        rows.append(("total", t["p50"], t["p90"], t["max"], *[None] * (len(head) - 4)))
        lines += format_table(head, rows)
        faster = [name for name, st in r["stages"].items() if st["roofline"].get("ceiling_is_decode")]
        if faster:
            lines.append(f"% bw: {', '.join(faster)} decoded faster than the read test read; its own rate is "
                         "the ceiling (100%)")
        faster = [f"{name} {part}" for name, st in r["stages"].items() for part in ("prefill", "vision")
                  if st.get("compute", {}).get(f"{part}_ceiling_is_stage")]
        if faster:
            lines.append(f"% gemm: {', '.join(faster)} computed faster than the GEMM probe; its own rate is the "
                         "ceiling (100%)")
        m = r["memory"]
        gpu = f", peak GPU {m['peak_gpu_mb']:.0f} MB" if m.get("peak_gpu_mb") else ""
        lines.append(f"memory: weights {m['weights_mb']:.1f} MB, KV allocated {m['kv_allocated_mb']:.1f} MB, "
                     f"peak RSS {m['peak_rss_mb']:.0f} MB{gpu}")
    if len(doc["results"]) > 1:
        lines += ["", compare_lines(doc["results"][0], doc["results"][1:])]
    return "\n".join(lines)


def _percent(fraction: float | None) -> float | None:
    return None if fraction is None else 100 * fraction


def compare_lines(base: dict, others: list[dict]) -> str:
    """Ratios of each result to `base`: latency (lower is better) and decode rate (higher is better)."""
    head = ("vs " + base["label"], "stage", "p50 ms", "x latency", "decode tok/s", "x decode")
    rows = []
    for other in others:
        for name in [*other["stages"], "total"]:
            if name == "total":
                a, b = base["total_ms"]["p50"], other["total_ms"]["p50"]
                rows.append((other["label"], name, b, _ratio(b, a), None, None))
            elif name in base["stages"]:
                sa, sb = base["stages"][name], other["stages"][name]
                a, b = sa["latency_ms"]["p50"], sb["latency_ms"]["p50"]
                rows.append((other["label"], name, b, _ratio(b, a), sb["decode_tok_s"],
                             _ratio(sb["decode_tok_s"], sa["decode_tok_s"])))
    return "\n".join(format_table(head, [tuple(f"{c:.2f}x" if i in (3, 5) and c is not None else c
                                         for i, c in enumerate(r)) for r in rows]))


def _ratio(a, b):
    return a / b if a and b else None


# ---------------------------------------------------------------------------------------------- plot
COLORS = {"plan": (76, 114, 176), "extract": (221, 132, 82), "think": (85, 168, 104), "direct": (196, 78, 82)}
SHADES = {"encode": 0.55, "prefill": 0.8, "decode": 1.0}  # lighter = earlier phase


def plot(doc: dict, path: str | Path) -> None:
    """Stacked per-stage latency bars (p50), one bar per result, side by side; written as PNG (Pillow)."""
    from PIL import Image, ImageDraw, ImageFont

    results = doc["results"]
    font = ImageFont.load_default()
    bar_w, gap, left, top, bottom, height = 90, 50, 80, 50, 70, 360
    width = left + len(results) * (bar_w + gap) + 220
    img = Image.new("RGB", (width, top + height + bottom), "white")
    d = ImageDraw.Draw(img)
    segments = []  # per result: [(stage, phase, ms)]
    for r in results:
        segs = []
        for name, st in r["stages"].items():
            encode = st["preprocess_ms"]["p50"] + st["vision_ms"]["p50"] + st["embed_ms"]["p50"]
            prefill, decode = st["prefill_ms"]["p50"], st["decode_ms"]["p50"]
            other = max(0.0, st["latency_ms"]["p50"] - encode - prefill - decode)
            segs += [(name, "encode", encode), (name, "prefill", prefill), (name, "decode", decode + other)]
        segments.append(segs)
    peak = max((sum(ms for *_, ms in segs) for segs in segments), default=1.0) or 1.0
    scale = height / (peak * 1.1)
    d.line([(left, top), (left, top + height)], fill="black")
    for k in range(6):  # y axis ticks
        ms = peak * 1.1 * k / 5
        y = top + height - ms * scale
        d.line([(left - 4, y), (left, y)], fill="black")
        d.text((left - 8, y), f"{ms / 1e3:.2f} s" if peak > 2000 else f"{ms:.0f} ms", fill="black", font=font,
               anchor="rm")
    for i, (r, segs) in enumerate(zip(results, segments, strict=True)):
        x0 = left + gap // 2 + i * (bar_w + gap)
        y = top + height
        for name, phase, ms in segs:
            h = ms * scale
            color = tuple(int(255 - (255 - c) * SHADES[phase]) for c in COLORS.get(name, (128, 128, 128)))
            if h > 0:
                d.rectangle([x0, y - h, x0 + bar_w, y], fill=color, outline="white")
            y -= h
        d.text((x0 + bar_w / 2, y - 6), f"{r['total_ms']['p50'] / 1e3:.2f} s", fill="black", font=font,
               anchor="md")
        d.text((x0 + bar_w / 2, top + height + 8), r["label"][:18], fill="black", font=font, anchor="ma")
    lx = left + len(results) * (bar_w + gap) + 10
    ly = top
    for name in [n for n in STAGE_ORDER if any(n in r["stages"] for r in results)]:
        for phase in SHADES:
            color = tuple(int(255 - (255 - c) * SHADES[phase]) for c in COLORS[name])
            d.rectangle([lx, ly, lx + 14, ly + 10], fill=color)
            d.text((lx + 20, ly), f"{name} {phase}", fill="black", font=font)
            ly += 16
    d.text((left, 15), f"edgevlm bench: p50 latency per stage over {doc['settings']['runs']} runs", fill="black",
           font=font)
    with atomic_file(path) as tmp:
        img.save(tmp, format="PNG")
