"""The `edgevlm` command. Exit codes: 0 success, 2 usage error, 1 any other failure (one-line message)."""

from __future__ import annotations

import json
import os
import sys

import click

from edgevlm import __version__, prompts
from edgevlm.errors import EdgeVLMError, UsageError


def _quiet_libraries() -> None:
    """Library warnings are noise on a robot's console (--debug shows them). Progress bars stay on terminals.

    Nothing is imported here: `edgevlm run --bundle` must never load torch or transformers.
    """
    import logging
    import os
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if not sys.stderr.isatty():  # progress bars in a log file or a pipe are noise; on a terminal they stay
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("transformers", "torch", "torch.onnx", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _note(message: str) -> None:
    """Progress for long steps, on stderr and only for a person watching a terminal."""
    if sys.stderr.isatty():
        click.echo(f"edgevlm: {message}", err=True)


def _finite(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """click.FloatRange lets NaN through (every comparison with it is false), and infinity past a lower bound."""
    import math

    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


def _check_output(path: str | None, option: str) -> None:
    """An output file's folder must exist and be writable before the work starts, not after minutes of it."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{option} {path} is a directory; give a file name")
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"{option} {path} cannot be written (permission denied)")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgevlm")
@click.option("--debug", is_flag=True, help="Show tracebacks and library warnings.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Small vision-language systems on edge devices: Extract->Think answers about images."""
    ctx.obj = {"debug": debug}
    if not debug:
        _quiet_libraries()


@cli.command()
@click.argument("image")
@click.argument("question")
@click.option("--bundle", "bundle_dir", metavar="DIR", help="An exported bundle (ONNX Runtime; no torch needed).")
@click.option("--extractor", metavar="ID|DIR", help="The VLM that extracts visual details (hub id or directory).")
@click.option("--reasoner", metavar="ID|DIR", help="The LLM that plans and reasons (hub id, directory or .gguf).")
@click.option("--gguf-file", metavar="NAME", help="With --reasoner DIR: the GGUF file in DIR to use.")
@click.option("--quant", metavar="int8|nf4", help="PyTorch backend only: load weights through bitsandbytes.")
@click.option("--preset", metavar="NAME", help="A named model pair: paper-0.6b (default), paper-1.7b, demo.")
@click.option("--mode", default="extract-think", show_default=True, metavar="MODE",
              help="extract-think, extract (stop after the description) or direct (the VLM answers alone).")
@click.option("--think/--no-think", default=True, show_default=True, help="Qwen3 thinking mode for the reasoner.")
@click.option("--think-budget", type=click.IntRange(min=1), default=prompts.THINK_BUDGET, show_default=True,
              help="Most tokens the reasoner may think before it must answer.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
              help="Most visible tokens per stage (default: 1024; thinking not counted).")
@click.option("--choice", "choices", multiple=True, metavar="TEXT",
              help="An answer option (repeat for each); makes the question multiple choice (A, B, ...).")
@click.option("--instruction", metavar="TEXT", help="Skip the planner: what the extractor should pay attention to.")
@click.option("--temperature", type=click.FloatRange(min=0), default=None, callback=_finite,
              help="Override the reasoner's sampling temperature (0 = greedy; default: the paper's 0.6 / 0.7).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option("--device", default="cpu", show_default=True, metavar="cpu|cuda", help="Where the models run.")
@click.option("--memory-budget", metavar="SIZE", help="Bundles: plan the KV cache to fit SIZE (e.g. 6GB), or fail "
              "saying what would fit (default: the bundle's target's budget, else the memory available).")
@click.option("--stream", is_flag=True, help="Print tokens as they are generated.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with everything.")
@click.option("--profile", is_flag=True, help="Print a per-stage timing table (to stderr).")
@click.option("--trace", "trace_file", metavar="FILE", type=click.Path(dir_okay=False),
              help="Write a Chrome/Perfetto trace (JSON; every decode step) to FILE: open it in ui.perfetto.dev.")
def run(image, question, bundle_dir, extractor, reasoner, gguf_file, quant, preset, mode, think, think_budget,
        max_new_tokens, choices, instruction, temperature, seed, device, memory_budget, stream, as_json, profile,
        trace_file):
    """Answer QUESTION about IMAGE (a path, or - to read image bytes from stdin)."""
    from edgevlm.images import load_image, read_stream
    from edgevlm.pipeline import MODES, Pipeline
    from edgevlm.presets import get_preset

    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    if not question.strip():
        raise UsageError("the question is empty")
    if bundle_dir and (extractor or reasoner or preset or quant or gguf_file):
        raise UsageError("--bundle already fixes the models and their precision; drop --extractor/--reasoner/"
                         "--preset/--quant/--gguf-file")
    if quant and quant not in ("int8", "nf4"):
        raise UsageError(f"unknown --quant {quant!r}; choose int8 or nf4 (bundles carry their own precision)")
    _check_budget(memory_budget, bundle_dir)
    _check_output(trace_file, "--trace")
    if preset:
        get_preset(preset)  # an unknown name is a usage error before anything loads
    # Read the image before loading any model: a bad path should fail in milliseconds, not after a load.
    if image == "-" and (sys.stdin is None or sys.stdin.isatty()):  # a terminal would wait for bytes forever
        raise UsageError("IMAGE is - but standard input is not a pipe; pipe the image in: edgevlm run - QUESTION < IMG")
    pil = load_image(read_stream(sys.stdin.buffer, "standard input") if image == "-" else image)
    _note("loading models")
    if bundle_dir:
        pipe = Pipeline.from_bundle(bundle_dir, device=device, memory_budget=memory_budget)
    else:
        pipe = Pipeline.from_pretrained(extractor, reasoner, preset=preset, device=device,
                                        load_reasoner=mode != "direct", quant=quant, gguf_file=gguf_file)
    events = pipe.stream(pil, question, choices=list(choices) or None, mode=mode, think=think,
                         think_budget=think_budget, max_new_tokens=max_new_tokens, instruction=instruction,
                         temperature=temperature, seed=seed, trace=bool(trace_file))
    out = sys.stderr if as_json else sys.stdout
    result = None
    for event in events:
        if event.kind == "done":
            result = event.result
        elif stream and event.kind == "stage_start":
            click.echo(f"[{event.stage}] ", file=out, nl=False)
        elif stream and event.kind == "token":
            click.echo(event.text, file=out, nl=False)
        elif stream and event.kind == "stage_end":
            click.echo("", file=out)
    if as_json:
        click.echo(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        click.echo(f"Answer: {result.answer}" if stream else result.answer)
        if not result.answer:  # say why there is none; other notes (a clamped budget) are in --json
            for note in result.notes:
                click.echo(f"edgevlm: {note}", err=True)
    if profile:
        click.echo(profile_table(result), err=True)
    if trace_file:
        from edgevlm.profiler import write_trace

        write_trace(trace_file, result.profile, {"question": question, "models": result.models, "mode": mode})
        _note(f"trace written to {trace_file} (open it in ui.perfetto.dev)")


def profile_table(result) -> str:
    """A compact per-stage table: where the milliseconds went and how fast tokens came."""
    head = ("stage", "prompt", "new", "preproc ms", "vision ms", "embed ms", "prefill ms", "decode ms", "TTFT ms",
            "total ms", "prefill tok/s", "decode tok/s", "KV MB")
    rows = []
    for name, s in result.stages.items():
        t = s.timings
        vision = f"{t.vision_ms:.1f} (cached)" if s.memory.get("vision_cache") == "hit" else t.vision_ms
        reused = s.memory.get("prefix_tokens", 0)
        prompt = f"{s.prompt_tokens} ({reused} cached)" if reused else s.prompt_tokens
        rows.append((name, prompt, s.new_tokens, t.preprocess_ms, vision, t.embed_ms, t.prefill_ms,
                     t.decode_ms, t.ttft_ms, t.total_ms, t.prefill_tok_s, t.decode_tok_s,
                     s.memory.get("kv_used", 0) / 1e6))
    from edgevlm.profiler import format_table

    lines = format_table(head, rows)
    lines.append(f"total {result.total_ms:.1f} ms (image decode {result.image_ms:.1f} ms), "
                 f"peak RSS {result.peak_rss_bytes / 1e6:.0f} MB")
    return "\n".join(lines)


@cli.command()
@click.option("--bundle", "bundles", multiple=True, metavar="DIR", help="A bundle to time (repeat to compare).")
@click.option("--extractor", metavar="ID|DIR", help="Time an HF pair on the PyTorch backend instead.")
@click.option("--reasoner", metavar="ID|DIR")
@click.option("--preset", metavar="NAME", help="A named HF model pair (PyTorch backend).")
@click.option("--image", "images", multiple=True, metavar="IMG", help="An image (repeat for several).")
@click.option("--question", "questions", multiple=True, metavar="TEXT", help="A question (repeat for several).")
@click.option("--data", metavar="FILE.jsonl", help='Items to cycle through: {"image", "question", "choices"?}.')
@click.option("--mode", default="extract-think", show_default=True, metavar="MODE")
@click.option("--think/--no-think", default=True, show_default=True)
@click.option("--think-budget", type=click.IntRange(min=1), default=prompts.THINK_BUDGET, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="Untimed runs first.")
@click.option("--runs", type=click.IntRange(min=1), default=5, show_default=True, help="Timed runs.")
@click.option("--fixed-tokens", type=click.IntRange(min=1), default=None, metavar="N",
              help="Every stage generates exactly N tokens (EOS ignored), so runs and bundles compare.")
@click.option("--device", default="cpu", show_default=True, metavar="cpu|cuda")
@click.option("--memory-budget", metavar="SIZE", help="Bundles: plan the KV cache to fit SIZE (e.g. 6GB), or fail "
              "saying what would fit (default: the bundle's target's budget, else the memory available).")
@click.option("--vision-cache", is_flag=True, help="Keep the vision-feature cache on (repeated images then skip "
              "the vision tower; off by default so every run pays for its image).")
@click.option("--prefix-cache", is_flag=True, help="Keep the prompt-prefix KV cache on (bundles: prompts that start "
              "like an earlier one prefill only the rest; off by default so every run prefills its whole prompt).")
@click.option("--target", metavar="NAME", help="Roofline against this target's bandwidth (e.g. jetson-orin-nano) "
              "instead of a copy test on this machine.")
@click.option("--json", "json_file", metavar="FILE", type=click.Path(dir_okay=False),
              help="Write the results as JSON (schema: edgevlm/bench.schema.json).")
@click.option("--plot", "plot_file", metavar="FILE.png", type=click.Path(dir_okay=False),
              help="Write stacked per-stage latency bars (one per bundle) as PNG.")
@click.option("--compare", nargs=2, metavar="A.json B.json", help="Print B's ratios to A from two saved runs.")
def bench(bundles, extractor, reasoner, preset, images, questions, data, mode, think, think_budget, warmup, runs,
          fixed_tokens, device, memory_budget, vision_cache, prefix_cache, target, json_file, plot_file, compare):
    """Time the pipeline: warmup, N runs, p50/p90/max per stage, TTFT, decode tokens/s, memory, roofline."""
    from edgevlm import bench as benchmod
    from edgevlm.pipeline import MODES, PREFIX_CACHE_MB, VISION_CACHE_MB

    if compare:
        a, b = (benchmod.read(f) for f in compare)
        click.echo(benchmod.compare_lines(a["results"][0], b["results"]))
        return
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    if bundles and (extractor or reasoner or preset):
        raise UsageError("time either bundles (--bundle) or an HF pair (--extractor/--reasoner/--preset)")
    _check_budget(memory_budget, bundles)
    _check_output(json_file, "--json")
    _check_output(plot_file, "--plot")
    items = benchmod.load_items(list(images), list(questions), data)
    bandwidth = _bandwidth(target)
    options = {"mode": mode, "think": think, "think_budget": think_budget, "fixed_tokens": fixed_tokens}
    results = []
    cache_mb = VISION_CACHE_MB if vision_cache else 0
    targets = [("bundle", b) for b in bundles] or [("hf", None)]
    for kind, path in targets:
        from edgevlm.pipeline import Pipeline
        from edgevlm.profiler import reset_peak_rss

        click.echo(f"edgevlm: loading {path or preset or 'the HF pair'}", err=True)
        reset_peak_rss()  # each bundle's peak RSS its own (where the OS allows), its loading included
        if kind == "bundle":
            pipe = Pipeline.from_bundle(path, device=device, vision_cache_mb=cache_mb,
                                        prefix_cache_mb=PREFIX_CACHE_MB if prefix_cache else 0,
                                        memory_budget=memory_budget)
            label, source = _bundle_label(path), {"bundle": path}
        else:
            pipe = Pipeline.from_pretrained(extractor, reasoner, preset=preset, device=device,
                                            load_reasoner=mode != "direct", vision_cache_mb=cache_mb)
            label = "torch " + (preset or os.path.basename(str(extractor).rstrip("/")))
            source = {"extractor": pipe.extractor.name, "reasoner": pipe.reasoner.name if pipe.reasoner else None}
        results.append(benchmod.bench(pipe, items, label=label, source=source, warmup=warmup, runs=runs,
                                      options=options, bandwidth_gb_s=bandwidth["bandwidth_gb_s"],
                                      progress=lambda m: click.echo(f"edgevlm: {m}", err=True)))
        del pipe
    settings = {"warmup": warmup, "runs": runs, "fixed_tokens": fixed_tokens, "mode": mode, "think": think,
                "think_budget": think_budget, "items": len(items), "device": device, "vision_cache": vision_cache,
                "prefix_cache": prefix_cache}
    doc = benchmod.document(results, settings=settings, bandwidth=bandwidth)
    click.echo(benchmod.report(doc))
    if json_file:
        from edgevlm.bundle import atomic_file

        with atomic_file(json_file) as tmp:
            tmp.write_text(json.dumps(doc, indent=2))
    if plot_file:
        benchmod.plot(doc, plot_file)


def _bandwidth(target: str | None) -> dict:
    from edgevlm.targets import get_target

    t = get_target(target) if target else None
    if t is not None and t.bandwidth_gb_s:
        return {"bandwidth_gb_s": t.bandwidth_gb_s, "bandwidth_source": t.name}
    from edgevlm.profiler import measure_bandwidth

    return {"bandwidth_gb_s": round(measure_bandwidth(), 3), "bandwidth_source": "copy test"}


def _bundle_label(path: str) -> str:
    """A bundle's name for tables and plots: its folder and the precision of its decoders."""
    name = os.path.basename(os.path.abspath(path))
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            quant = json.load(f).get("quantization", {})
    except (OSError, ValueError):
        return name
    precisions = sorted({quant.get(k) for k in ("extractor", "reasoner") if quant.get(k)})
    return f"{name} ({'/'.join(precisions)})" if precisions and "/".join(precisions) not in name else name


@cli.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The bundle directory to write.")
@click.option("--extractor", metavar="ID|DIR", help="The VLM to export (default: the preset's).")
@click.option("--reasoner", metavar="ID|DIR|FILE.gguf", help="The reasoning LLM to export (default: the preset's).")
@click.option("--gguf-file", metavar="NAME", help="With --reasoner DIR: the GGUF file in DIR to import.")
@click.option("--no-reasoner", is_flag=True, help="Export the extractor alone (a bundle for --mode direct).")
@click.option("--preset", metavar="NAME", help="A named model pair: paper-0.6b (default), paper-1.7b, demo.")
@click.option("--format", "fmt", default="onnx", show_default=True, metavar="onnx",
              help="Graph format (TensorRT engines come later).")
@click.option("--quant", default="fp32", show_default=True, metavar="fp32|fp16|int8|int4",
              help="Weight precision of both models.")
@click.option("--extractor-quant", metavar="Q", help="Precision of the extractor (default: --quant).")
@click.option("--reasoner-quant", metavar="Q", help="Precision of the reasoner (default: --quant).")
@click.option("--vision-quant", metavar="Q", help="Precision of the vision tower (default: the extractor's; "
              "int8 when that is int4).")
@click.option("--embed-quant", default="fp32", show_default=True, metavar="fp32|fp16|int4",
              help="Precision of the token embedding when the model is int8/int4.")
@click.option("--int4-method", default="awq", show_default=True, metavar="awq|rtn|hqq|gptq",
              help="int4 weights: activation-aware scaling + clipping on calibration prompts (awq), round-to-"
                   "nearest (rtn), HQQ (best fidelity, slow CPU kernel), or GPTQ (slow to compute).")
@click.option("--int4-keep-int8", default="head,down", show_default=True, metavar="LIST",
              help="Decoder layers an int4 model keeps in int8: head, down (MLP down projections), or none.")
@click.option("--block-size", type=int, default=32, show_default=True, help="int4 quantization block size.")
@click.option("--calibration", default="scenes", show_default=True, metavar="NAME|DIR",
              help="Calibration set: a shipped one, or a folder with items.jsonl and images.")
@click.option("--fidelity-samples", type=click.IntRange(min=0), default=8, show_default=True,
              help="Held-out prompts per stage for the fidelity report (0: skip).")
@click.option("--fidelity-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="Tokens per prompt for the fidelity report.")
@click.option("--min-agreement", type=click.FloatRange(0, 1), callback=_finite,
              help="Fail unless every stage's top-1 agreement with fp32 reaches this.")
@click.option("--max-kl", type=click.FloatRange(min=0), callback=_finite,
              help="Fail if any stage's mean KL from fp32 exceeds this.")
@click.option("--target", default="cpu", show_default=True, metavar="NAME", help="Where the bundle will run.")
@click.option("--overwrite", is_flag=True, help="Replace --out if edgevlm wrote it (a bundle); nothing else.")
def export(out, extractor, reasoner, gguf_file, no_reasoner, preset, fmt, quant, extractor_quant, reasoner_quant,
           vision_quant, embed_quant, int4_method, int4_keep_int8, block_size, calibration, fidelity_samples,
           fidelity_tokens, min_agreement, max_kl, target, overwrite):
    """Export an extractor and a reasoner (HF checkpoints or GGUF) to a bundle of ONNX graphs.

    Quantized bundles carry a fidelity report: each stage compared with fp32 on held-out prompts.
    """
    try:
        from edgevlm.export.exporter import QuantPlan, export_bundle
    except ImportError as e:
        raise EdgeVLMError(f"export needs torch and transformers ({e}); pip install 'edgevlm[export]'") from None
    if preset:
        from edgevlm.presets import get_preset

        get_preset(preset)
    if no_reasoner and (reasoner or reasoner_quant):
        raise UsageError("--no-reasoner contradicts --reasoner/--reasoner-quant")
    keep = tuple(x.strip() for x in int4_keep_int8.split(",") if x.strip() and x.strip() != "none")
    plan = QuantPlan(extractor=extractor_quant or quant, reasoner=reasoner_quant or quant, vision=vision_quant,
                     embed=embed_quant, int4_method=int4_method, block_size=block_size, keep_int8=keep)
    export_bundle(out, extractor=extractor, reasoner=reasoner, preset=preset, with_reasoner=not no_reasoner,
                  gguf_file=gguf_file, fmt=fmt, quant=plan, target=target, calibration=calibration,
                  fidelity_samples=fidelity_samples, fidelity_tokens=fidelity_tokens, min_agreement=min_agreement,
                  max_kl=max_kl, overwrite=overwrite)


@cli.command()
@click.argument("bundle_dir", metavar="BUNDLE")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of every file (sizes are still checked).")
@click.option("--memory-budget", metavar="SIZE", help="Show the memory plan for SIZE (default: what `run` would use).")
def info(bundle_dir, as_json, no_verify, memory_budget):
    """What is inside BUNDLE: models, graphs, sizes, quantization, fidelity, and its memory plan."""
    from edgevlm import bundle, memory
    from edgevlm.pipeline import PREFIX_CACHE_MB, VISION_CACHE_MB

    b = bundle.load(bundle_dir, verify=not no_verify)
    if as_json:
        click.echo(json.dumps(b.manifest.to_dict(), indent=2))
        return
    click.echo(describe_bundle(b))
    budget, source = memory.budget_for(memory_budget, b.manifest.target)
    click.echo(memory.plan(b, budget, source=source, vision_cache_mb=VISION_CACHE_MB,
                           prefix_cache_mb=PREFIX_CACHE_MB).describe())


def _check_budget(memory_budget, bundles) -> None:
    if memory_budget is None:
        return
    from edgevlm.memory import parse_size

    parse_size(memory_budget)  # a malformed size fails before anything loads
    if not bundles:
        raise UsageError("--memory-budget plans an exported bundle's memory (--bundle); the PyTorch backend "
                         "loads checkpoints as they are")


def describe_bundle(b) -> str:
    from edgevlm.manifest import FORMAT_VERSION

    m = b.manifest
    sizes = {rel: meta["bytes"] for rel, meta in m.files.items()}
    total = sum(sizes.values())
    lines = [f"bundle {b.path}  (format {FORMAT_VERSION}, {total / 1e6:.1f} MB, target {m.target}, "
             f"created {m.created})"]
    versions = (m.provenance or {}).get("versions", {})
    if versions:
        lines.append("made with " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    lines.append("stages: " + ", ".join(f"{stage} -> {role}" for stage, role in m.stages.items()))
    for role, spec in m.models.items():
        source = spec.source or {}
        rev = f"@{source['revision'][:12]}" if source.get("revision") else ""
        kv = spec.kv
        lines.append(f"{role}: {source.get('model', '?')}{rev}  family {spec.family}, context "
                     f"{spec.max_context}, KV {kv.layers} layers x {kv.kv_heads} heads x {kv.head_dim}")
        for name, g in spec.graphs.items():
            size = sum(v for rel, v in sizes.items() if rel == g.file or rel == g.file + ".data")
            lines.append(f"  {name:<8} {g.file:<28} {size / 1e6:>9.1f} MB  {g.quant}")
    from edgevlm.calibration.metrics import report_table

    lines.append(report_table(m.fidelity))
    return "\n".join(lines)


@cli.command("eval")
@click.option("--data", metavar="FILE.jsonl", type=click.Path(dir_okay=False),
              help="Items (image, question, choices, answer, type); default with --preset demo: its test split.")
@click.option("--bundle", "bundles", multiple=True, metavar="DIR", help="A bundle to score (repeat to compare).")
@click.option("--preset", metavar="NAME", help="A named model pair (PyTorch backend), e.g. demo.")
@click.option("--extractor", metavar="ID|DIR", help="The VLM (PyTorch backend).")
@click.option("--reasoner", metavar="ID|DIR", help="The reasoning LLM (PyTorch backend).")
@click.option("--modes", default="extract-think", show_default=True, metavar="M1,M2",
              help="Comma-separated modes to score: extract-think, direct.")
@click.option("--think/--no-think", default=True, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=None, callback=_finite,
              help="The reasoner's (0 = greedy).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Score only the first N items.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, metavar="cpu|cuda")
@click.option("--memory-budget", metavar="SIZE", help="Bundles: plan the KV cache to fit SIZE (e.g. 6GB), or fail "
              "saying what would fit (default: the bundle's target's budget, else the memory available).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON (per system and mode).")
def eval_(data, bundles, preset, extractor, reasoner, modes, think, temperature, limit, seed, device, memory_budget,
          as_json):
    """Accuracy on a question set, per mode and question type, for one or more systems side by side."""
    from edgevlm import evaluation
    from edgevlm.pipeline import Pipeline
    from edgevlm.presets import get_preset

    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    bad = [m for m in mode_list if m not in ("extract-think", "direct")]
    if bad or not mode_list:
        raise UsageError(f"unknown mode {bad[0] if bad else modes!r}; choose from: extract-think, direct")
    if bundles and (extractor or reasoner or preset):
        raise UsageError("score either bundles (--bundle) or an HF pair (--extractor/--reasoner/--preset)")
    _check_budget(memory_budget, bundles)
    if preset:
        get_preset(preset)
    if data is None:
        if preset != "demo":
            raise UsageError("give the items to score with --data FILE.jsonl (only --preset demo has a default)")
        from edgevlm import demo

        data = demo.TEST_SET / "items.jsonl"
    items = evaluation.load_items(data)[:limit]
    options = {"think": think, "temperature": temperature, "seed": seed}
    results = {}
    systems = [("bundle", b) for b in bundles] or [("hf", None)]
    for kind, path in systems:
        if kind == "bundle":
            pipe, label = Pipeline.from_bundle(path, device=device, memory_budget=memory_budget), _bundle_label(path)
        else:
            pipe = Pipeline.from_pretrained(extractor, reasoner, preset=preset, device=device,
                                            load_reasoner="extract-think" in mode_list)
            label = "torch " + (preset or os.path.basename(str(extractor).rstrip("/")))
        results[label] = {m: evaluation.evaluate(pipe, items, mode=m, label=label, **options) for m in mode_list}
        del pipe
    if as_json:
        click.echo(json.dumps({"data": str(data), "results": results}, indent=2))
    else:
        click.echo(evaluation.report(results))


@cli.command()
@click.option("--model", required=True, metavar="ID|DIR|FILE.gguf",
              help="The model to tune: a VLM (extractor) or a text LM.")
@click.option("--data", required=True, metavar="FILE.jsonl", type=click.Path(dir_okay=False),
              help="Items: image, question, choices, answer, instruction, description (the extraction target), "
              "reasoning (optional).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Where to save the tuned model (replaces only a directory edgevlm wrote).")
@click.option("--val-data", metavar="FILE.jsonl", type=click.Path(dir_okay=False),
              help="Validation items (default: 5% of --data held out).")
@click.option("--teacher", metavar="ID|DIR", help="An extractor that writes the descriptions items lack.")
@click.option("--steps", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True, callback=_finite)
@click.option("--lora", type=click.IntRange(min=0), default=0, show_default=True,
              help="LoRA rank (peft), merged into the weights when saved; 0 = full fine-tuning.")
@click.option("--adapter-only", is_flag=True,
              help="With --lora: save the adapter alone (a few MB), merged into its base on first use.")
@click.option("--freeze-vision", is_flag=True,
              help="An extractor's vision tower and projector stay as they are; only its language model learns.")
@click.option("--eval-every", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in OUT.partial/.")
@click.option("--seed", type=int, default=0, show_default=True)
def tune(model, data, out, val_data, teacher, steps, batch_size, lr, lora, adapter_only, freeze_vision, eval_every,
         resume, seed):
    """Visual extraction tuning (a VLM: image + instruction -> description) or reasoner tuning (a text LM)."""
    try:
        from edgevlm.train import tune as tunemod
    except ImportError as e:
        raise EdgeVLMError(f"tune needs torch and transformers ({e}); pip install 'edgevlm[export]'") from None
    from edgevlm.evaluation import load_items

    val = load_items(val_data, image=False) if val_data else None  # items without an image only tune a reasoner
    scores = tunemod.tune(model, data, out, steps=steps, batch_size=batch_size, lr=lr, lora=lora, val_items=val,
                          teacher=teacher, eval_every=eval_every, save_every=eval_every, resume=resume, seed=seed,
                          adapter_only=adapter_only, freeze_vision=freeze_vision, log=lambda m: click.echo(m, err=True))
    click.echo(json.dumps({"out": out, **scores}))


@cli.command("make-tiny")
@click.argument("family")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--seed", type=int, default=0, show_default=True, help="Weight initialisation seed.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if edgevlm wrote it; nothing else.")
def make_tiny(family, out_dir, seed, overwrite):
    """Build a tiny random model of FAMILY (qwen3, llava_onevision, idefics3) in OUT_DIR, offline.

    Use it to test an integration without downloads; its answers are random text.
    """
    try:
        from edgevlm.train import tiny
    except ImportError as e:
        raise EdgeVLMError(f"make-tiny needs torch and transformers ({e}); pip install 'edgevlm[export]'") from None
    path = tiny.make_tiny(family, out_dir, seed=seed, overwrite=overwrite)
    click.echo(str(path))


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())


def main(argv: list[str] | None = None) -> None:
    """Console entry point: every failure becomes one line on stderr and an exit code."""
    from edgevlm.signals import sigterm_as_interrupt

    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    with sigterm_as_interrupt() as terminated:
        try:
            code = cli.main(args=args, prog_name="edgevlm", standalone_mode=False)
        except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort, outside it stays as is
            click.echo(f"edgevlm: {'terminated' if terminated else 'interrupted'}", err=True)
            code = 128 + terminated[0] if terminated else 130
        except click.UsageError as e:
            click.echo(f"edgevlm: error: {_one_line(e.format_message())} (see --help)", err=True)
            code = 2
        except click.ClickException as e:
            click.echo(f"edgevlm: error: {_one_line(e.format_message())}", err=True)
            code = e.exit_code
        except EdgeVLMError as e:
            if debug:
                raise
            click.echo(f"edgevlm: error: {_one_line(e)}", err=True)
            code = e.exit_code
        except Exception as e:  # a bug, not bad input: still one line unless --debug
            if debug:
                raise
            click.echo(f"edgevlm: internal error: {type(e).__name__}: {_one_line(e)[:300]} "
                       "(rerun with --debug for the traceback)", err=True)
            code = 1
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
