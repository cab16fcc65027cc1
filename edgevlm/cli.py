"""The `edgevlm` command. Exit codes: 0 success, 2 usage error, 1 any other failure (one-line message)."""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import sys
import warnings

import click

from edgevlm import __version__, prompts
from edgevlm.errors import EdgeVLMError, UsageError


def _quiet_libraries() -> None:
    """Library warnings are noise on a robot's console (--debug shows them). Progress bars stay on terminals.

    Nothing is imported here: `edgevlm run --bundle` must never load torch or transformers.
    """
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if not sys.stderr.isatty():  # progress bars in a log file or a pipe are noise; on a terminal they stay
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("transformers", "torch", "torch.onnx", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)
    ours = logging.getLogger("edgevlm")  # edgevlm's own warnings stay (a bundle this CPU computes inexactly)
    if not any(isinstance(h, _Warnings) for h in ours.handlers):
        ours.addHandler(_Warnings(logging.WARNING))
        ours.propagate = False


class _Warnings(logging.Handler):
    """edgevlm's warnings on stderr, one line each."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"edgevlm: warning: {record.getMessage()}", err=True)


def _note(message: str) -> None:
    """Progress for long steps, on stderr and only for a person watching a terminal."""
    if sys.stderr.isatty():
        click.echo(f"edgevlm: {message}", err=True)


def _finite(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """click.FloatRange lets NaN through (every comparison with it is false), and infinity past a lower bound."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


def _needs_torch(command: str, module: str):
    """`module` of the export or training side, or a one-line error saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise EdgeVLMError(f"{command} needs torch and transformers ({e}); pip install 'edgevlm[export]'") from None


def _options(*options):
    """Several click options as one decorator, listed by --help in the order given."""
    def apply(f):
        for option in reversed(options):
            f = option(f)
        return f

    return apply


# Options that several commands share, each declared (and its help written) once.
_BUNDLES = click.option("--bundle", "bundles", multiple=True, metavar="DIR", help="An exported bundle (ONNX "
                        "Runtime); repeat to compare several. Without one: the HF pair, on the PyTorch backend.")
_PAIR = _options(
    click.option("--extractor", metavar="ID|DIR",
                 help="The VLM that extracts visual details: hub id or directory (default: the preset's)."),
    click.option("--reasoner", metavar="ID|DIR|FILE.gguf",
                 help="The LLM that plans and reasons: hub id, directory or .gguf (default: the preset's)."),
    click.option("--preset", metavar="NAME", help="A named model pair: paper-0.6b (default), paper-1.7b, demo."),
)
_GGUF = click.option("--gguf-file", metavar="NAME", help="With --reasoner DIR: the GGUF file in DIR.")
_THINK = click.option("--think/--no-think", default=True, show_default=True,
                      help="Qwen3 thinking mode for the reasoner.")
_MODE = _options(
    click.option("--mode", default="extract-think", show_default=True, metavar="MODE",
                 help="extract-think, extract (stop after the description) or direct (the VLM answers alone)."),
    _THINK,
    click.option("--think-budget", type=click.IntRange(min=1), default=prompts.THINK_BUDGET, show_default=True,
                 help="Most tokens the reasoner may think before it must answer."),
)
_TEMPERATURE = click.option("--temperature", type=click.FloatRange(min=0), default=None, callback=_finite,
                            help="Override the reasoner's sampling temperature (0 = greedy; default: the paper's "
                            "0.6 / 0.7).")
_SEED = click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
_PLACE = _options(
    click.option("--device", default="cpu", show_default=True, metavar="cpu|cuda", help="Where the models run."),
    click.option("--memory-budget", metavar="SIZE", help="Bundles: plan the KV cache to fit SIZE (e.g. 6GB), or "
                 "fail saying what would fit (default: the bundle's target's budget, else the memory available)."),
    click.option("--max-image-tokens", type=click.IntRange(min=1), default=None, metavar="N",
                 help="Bundles: cut each image (a smaller AnyRes grid, a shorter resized edge) to at most N prompt "
                 "positions [default: the bundle's own budget, if any]."),
    click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default=None,
                 help="Bundles: what runs the graphs [default: a TensorRT bundle on --device cuda runs its engines, "
                 "anything else ONNX Runtime]; onnxruntime runs a TensorRT bundle on ONNX Runtime's CUDA provider, "
                 "where TensorRT is not installed."),
)
_PIPELINED = click.option("--pipelined/--in-turn", default=None, help="Bundles: two frames in flight, one's extract "
                          "beside the other's think [default: where there are 4 or more cores or a GPU and the "
                          "memory plan fits both].")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgevlm")
@click.option("--debug", is_flag=True, help="Show tracebacks and library warnings.")
def cli(debug: bool) -> None:
    """Small vision-language systems on edge devices: Extract->Think answers about images."""
    if not debug:
        _quiet_libraries()


@cli.command()
@click.argument("image")
@click.argument("question")
@click.option("--bundle", "bundle_dir", metavar="DIR", help="An exported bundle (ONNX Runtime; no torch needed).")
@_PAIR
@_GGUF
@click.option("--quant", metavar="int8|nf4", help="PyTorch backend only: load weights through bitsandbytes.")
@_MODE
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
              help="Most visible tokens per stage (default: 1024; thinking not counted).")
@click.option("--choice", "choices", multiple=True, metavar="TEXT",
              help="An answer option (repeat for each); makes the question multiple choice (A, B, ...).")
@click.option("--instruction", metavar="TEXT", help="Skip the planner: what the extractor should pay attention to.")
@click.option("--schema", "schema_file", metavar="FILE.json", type=click.Path(dir_okay=False),
              help="The answer must be JSON matching this JSON schema (decoded under it; --json: answer_json).")
@click.option("--regex", metavar="RE", help="The answer must match this regular expression (decoded under it).")
@click.option("--one-of", "one_of", multiple=True, metavar="TEXT",
              help="The answer must be one of these (repeat for each; the question stays open, unlike --choice).")
@click.option("--constrain/--no-constrain", default=True, show_default=True,
              help="Decode a multiple-choice answer constrained to the options' letters.")
@_TEMPERATURE
@_SEED
@_PLACE
@click.option("--stream", is_flag=True, help="Print tokens as they are generated.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with everything.")
@click.option("--profile", is_flag=True, help="Print a per-stage timing table (to stderr).")
@click.option("--trace", "trace_file", metavar="FILE", type=click.Path(dir_okay=False),
              help="Write a Chrome/Perfetto trace (JSON; every decode step) to FILE: open it in ui.perfetto.dev.")
def run(image, question, bundle_dir, extractor, reasoner, preset, gguf_file, quant, mode, think, think_budget,
        max_new_tokens, choices, instruction, schema_file, regex, one_of, constrain, temperature, seed, device,
        memory_budget, max_image_tokens, backend, stream, as_json, profile, trace_file):
    """Answer QUESTION about IMAGE (a path, or - to read image bytes from stdin)."""
    from edgevlm.bundle import check_output_file
    from edgevlm.loading import Source
    from edgevlm.options import Options, check_text
    from edgevlm.profiler import profile_table, write_trace

    options = {"choices": list(choices) or None, "mode": mode, "think": think, "think_budget": think_budget,
               "max_new_tokens": max_new_tokens, "instruction": instruction, "temperature": temperature,
               "seed": seed, "trace": bool(trace_file), "schema": _read_schema(schema_file), "regex": regex,
               "one_of": list(one_of) or None, "constrain": constrain}
    Options.of(options)  # the pipeline's own checks of the call (it repeats them), made before a model loads
    check_text(question, "the question")
    source = Source(bundle=bundle_dir, extractor=extractor, reasoner=reasoner, preset=preset, quant=quant,
                    gguf_file=gguf_file, device=device, memory_budget=memory_budget, max_image_tokens=max_image_tokens,
                    backend=backend)
    check_output_file(trace_file, "--trace")
    pil = _read_image(image)
    _note("loading models")
    pipe = source.load(load_reasoner=mode != "direct")
    result = _follow(pipe.stream(pil, question, **options), stream, sys.stderr if as_json else sys.stdout)
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
        write_trace(trace_file, result.profile, {"question": question, "models": result.models, "mode": mode})
        _note(f"trace written to {trace_file} (open it in ui.perfetto.dev)")


MAX_SCHEMA_CHARS = 1_000_000


def _read_schema(path: str | None) -> str | None:
    """The text of a --schema file (Options checks that it is a JSON schema)."""
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_SCHEMA_CHARS + 1)
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--schema {path}: {getattr(e, 'strerror', None) or e}") from None
    if len(text) > MAX_SCHEMA_CHARS:
        raise UsageError(f"--schema {path} is over {MAX_SCHEMA_CHARS} characters")
    return text


def _read_image(image: str):
    """IMAGE, read before any model loads: a bad path fails in milliseconds, not after a load."""
    from edgevlm.images import load_image, read_stream

    if image != "-":
        return load_image(image)
    if sys.stdin is None or sys.stdin.isatty():  # a terminal would wait for bytes forever
        raise UsageError("IMAGE is - but standard input is not a pipe; pipe the image in: edgevlm run - QUESTION < IMG")
    return load_image(read_stream(sys.stdin.buffer, "standard input"))


def _follow(events, stream: bool, out):
    """The run's Result; with `stream`, its tokens printed to `out` as they come, a line per stage."""
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
    return result


@cli.command()
@_BUNDLES
@_PAIR
@click.option("--image", "images", multiple=True, metavar="IMG", help="An image (repeat for several).")
@click.option("--question", "questions", multiple=True, metavar="TEXT", help="A question (repeat for several).")
@click.option("--data", metavar="FILE.jsonl", help='Items to cycle through: {"image", "question", "choices"?}.')
@_MODE
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="Untimed runs first.")
@click.option("--runs", type=click.IntRange(min=1), default=5, show_default=True, help="Timed runs.")
@click.option("--fixed-tokens", type=click.IntRange(min=1), default=None, metavar="N",
              help="Every stage generates exactly N tokens (EOS ignored), so runs and bundles compare.")
@_PLACE
@click.option("--vision-cache", is_flag=True, help="Keep the vision-feature cache on (repeated images then skip "
              "the vision tower; off by default so every run pays for its image).")
@click.option("--prefix-cache", is_flag=True, help="Keep the prompt-prefix KV cache on (bundles: prompts that start "
              "like an earlier one prefill only the rest; off by default so every run prefills its whole prompt).")
@click.option("--target", metavar="NAME", help="Roofline against this target's bandwidth (e.g. jetson-orin-nano) "
              "instead of read tests on this machine.")
@click.option("--json", "json_file", metavar="FILE", type=click.Path(dir_okay=False),
              help="Write the results as JSON (schema: edgevlm/bench.schema.json).")
@click.option("--plot", "plot_file", metavar="FILE.png", type=click.Path(dir_okay=False),
              help="Write stacked per-stage latency bars (one per bundle) as PNG.")
@click.option("--compare", nargs=2, metavar="A.json B.json", help="Print B's ratios to A from two saved runs.")
def bench(bundles, extractor, reasoner, preset, images, questions, data, mode, think, think_budget, warmup, runs,
          fixed_tokens, device, memory_budget, max_image_tokens, backend, vision_cache, prefix_cache, target, json_file,
          plot_file, compare):
    """Time the pipeline: warmup, N runs, p50/p90/max per stage, TTFT, decode tokens/s, memory, roofline."""
    from edgevlm import bench as benchmod
    from edgevlm.bundle import check_output_file
    from edgevlm.loading import sources
    from edgevlm.pipeline import PREFIX_CACHE_MB, VISION_CACHE_MB

    if compare:
        a, b = (benchmod.read(f) for f in compare)
        click.echo(benchmod.compare_lines(a["results"][0], b["results"]))
        return
    systems = sources(bundles, extractor=extractor, reasoner=reasoner, preset=preset, device=device,
                      memory_budget=memory_budget, max_image_tokens=max_image_tokens, backend=backend,
                      vision_cache_mb=VISION_CACHE_MB if vision_cache else 0,
                      prefix_cache_mb=PREFIX_CACHE_MB if prefix_cache else 0)
    check_output_file(json_file, "--json")
    check_output_file(plot_file, "--plot")
    items = benchmod.load_items(list(images), list(questions), data)
    options = {"mode": mode, "think": think, "think_budget": think_budget, "fixed_tokens": fixed_tokens}
    doc = benchmod.run(systems, items, options=options, warmup=warmup, runs=runs, target=target,
                       progress=lambda m: click.echo(f"edgevlm: {m}", err=True))
    click.echo(benchmod.report(doc))
    if json_file:
        benchmod.write(doc, json_file)
    if plot_file:
        benchmod.plot(doc, plot_file)


@cli.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The bundle directory to write.")
@_PAIR
@_GGUF
@click.option("--no-reasoner", is_flag=True, help="Export the extractor alone (a bundle for --mode direct).")
@click.option("--format", "fmt", default="onnx", show_default=True, metavar="onnx|tensorrt",
              help="Graphs for ONNX Runtime (its fused CPU operators), or for TensorRT's ONNX parser (standard "
                   "operators only, checked against TensorRT's table; they also run under ONNX Runtime).")
@click.option("--quant", metavar="fp32|fp16|int8|int4",
              help="Weight precision of both models [default: fp32; fp16 with --format tensorrt].")
@click.option("--extractor-quant", metavar="Q", help="Precision of the extractor (default: --quant).")
@click.option("--reasoner-quant", metavar="Q", help="Precision of the reasoner (default: --quant).")
@click.option("--vision-quant", metavar="Q", help="Precision of the vision tower (default: the extractor's; "
              "int8 when that is int4).")
@click.option("--embed-quant", default=None, metavar="fp32|fp16|int8|int4",
              help="Precision of the token embedding when the model is int8/int4 [default: int8; fp32 for "
                   "--format tensorrt].")
@click.option("--int4-method", default=None, metavar="gptq|awq|rtn|hqq",
              help="int4 weights: GPTQ on calibration prompts (gptq), activation-aware scaling + clipping (awq), "
                   "round-to-nearest (rtn), or HQQ (float zero points: slow CPU kernel) [default: gptq; awq for "
                   "--format tensorrt, whose dequantize layer takes no zero points].")
@click.option("--int4-keep-int8", default="head,down", show_default=True, metavar="LIST",
              help="Decoder layers an int4 model keeps in int8: head, down (MLP down projections), or none.")
@click.option("--int4-offsets", type=click.Choice(["auto", "off"]), default="auto", show_default=True,
              help="int4 (gptq): MatMuls whose weights sit on a 4-bit grid with a float minimum per block (a GGUF "
                   "Q4_1 import) keep it exactly, through float zero points carried as extra blocks over the "
                   "input's block sums (two small nodes per input); off: re-rounded to uint4 zero points.")
@click.option("--block-size", type=int, default=32, show_default=True, help="int4 quantization block size.")
@click.option("--int8-mode", type=click.Choice(["compute", "weights"]), default="compute", show_default=True,
              help="int8 decoders and vision towers: int8 activations too (prefill and vision on the CPU's int8 "
                   "dot products; each graph checked on calibration inputs, weight-only where it misses), or "
                   "weight-only int8.")
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
@click.option("--fidelity-target", type=click.FloatRange(0, 1, min_open=True), callback=_finite,
              help="int4 (gptq): keep in 8 bits the fewest decoder MatMuls (those int4 costs most) that bring every "
                   "stage's top-1 agreement on calibration prompts to this; fail if even all 8-bit misses it.")
@click.option("--fidelity-kl", type=click.FloatRange(min=0), callback=_finite,
              help="int4 (gptq): the same, for every stage's mean KL from fp32 at most this (0: no KL target) "
                   "[default: 0.01 when neither is given; missing that default warns, never fails].")
@click.option("--target", metavar="NAME", help="Where the bundle will run: cpu, cuda, jetson-orin-nano, "
              "jetson-orin-nx, jetson-orin-agx [default: cpu; cuda with --format tensorrt].")
@click.option("--overwrite", is_flag=True, help="Replace --out if edgevlm wrote it (a bundle); nothing else.")
@click.option("--max-image-tokens", type=click.IntRange(min=1), default=None, metavar="N",
              help="A visual-token budget kept in the bundle: each image cut (a smaller AnyRes grid, a shorter resized "
              "edge) to at most N prompt positions.")
def export(out, extractor, reasoner, preset, gguf_file, no_reasoner, fmt, quant, extractor_quant, reasoner_quant,
           vision_quant, embed_quant, int4_method, int4_keep_int8, int4_offsets, block_size, int8_mode, calibration,
           fidelity_samples, fidelity_tokens, min_agreement, max_kl, fidelity_target, fidelity_kl, target, overwrite,
           max_image_tokens):
    """Export an extractor and a reasoner (HF checkpoints or GGUF) to a bundle of ONNX graphs.

    Quantized bundles carry a fidelity report: each stage compared with fp32 on held-out prompts.
    """
    exporter = _needs_torch("export", "edgevlm.export.exporter")
    if no_reasoner and (reasoner or reasoner_quant):
        raise UsageError("--no-reasoner contradicts --reasoner/--reasoner-quant")
    keep = tuple(x.strip() for x in int4_keep_int8.split(",") if x.strip() and x.strip() != "none")
    quant = quant or ("fp16" if fmt == "tensorrt" else "fp32")
    target = target or ("cuda" if fmt == "tensorrt" else "cpu")
    plan = exporter.QuantPlan(extractor=extractor_quant or quant, reasoner=reasoner_quant or quant,
                              vision=vision_quant, embed=embed_quant, int4_method=int4_method,
                              block_size=block_size, keep_int8=keep, fidelity_target=fidelity_target,
                              fidelity_kl=fidelity_kl, int4_offsets=int4_offsets == "auto",
                              int8_compute=int8_mode == "compute")
    exporter.export_bundle(out, extractor=extractor, reasoner=reasoner, preset=preset,
                           with_reasoner=not no_reasoner, gguf_file=gguf_file, fmt=fmt, quant=plan, target=target,
                           calibration=calibration, fidelity_samples=fidelity_samples,
                           fidelity_tokens=fidelity_tokens, min_agreement=min_agreement, max_kl=max_kl,
                           overwrite=overwrite, max_image_tokens=max_image_tokens)


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
    click.echo(b.describe())
    budget, source = memory.budget_for(memory_budget, b.target)
    click.echo(memory.plan(b, budget, source=source, vision_cache_mb=VISION_CACHE_MB,
                           prefix_cache_mb=PREFIX_CACHE_MB).describe())


@cli.command()
@click.argument("bundle_dir", metavar="BUNDLE")
@click.option("--memory-budget", metavar="SIZE", help="Plan the engines' shapes and builder memory for SIZE "
              "(default: the bundle's target's budget, else the memory available).")
@click.option("--timing-cache", type=click.Path(dir_okay=False), help="TensorRT timing cache file (default: one "
              "per TensorRT version and GPU under ~/.cache/edgevlm/tensorrt).")
@click.option("--plan", "show_plan", is_flag=True, help="Print the trtexec commands of the plan and stop "
              "(no TensorRT needed).")
def build(bundle_dir, memory_budget, timing_cache, show_plan):
    """Build TensorRT engines for a bundle exported with --format tensorrt, on the device that will run them."""
    from edgevlm import bundle, engines, memory

    if show_plan:
        b = bundle.load(bundle_dir)
        budget, source = memory.budget_for(memory_budget, b.target)
        click.echo(engines.trtexec_script(engines.plan(b, budget, source=source), b.target), nl=False)
        return
    from edgevlm import engine_build

    engine_build.build(bundle_dir, memory_budget=memory_budget, timing_cache=timing_cache)


@cli.command("eval")
@click.option("--data", metavar="FILE.jsonl", type=click.Path(dir_okay=False),
              help="Items (image, question, choices, answer, type); default with --preset demo: its test split.")
@_BUNDLES
@_PAIR
@click.option("--modes", default="extract-think", show_default=True, metavar="M1,M2",
              help="Comma-separated modes to score: extract-think, direct.")
@_THINK
@_TEMPERATURE
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Score only the first N items.")
@click.option("--constrained", is_flag=True, help="Score each mode twice, side by side: free-text answers, and "
              "answers constrained to their question type's answer set (multiple choice: the letters).")
@_SEED
@_PLACE
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON (per system and mode).")
def eval_(data, bundles, extractor, reasoner, preset, modes, think, temperature, limit, constrained, seed, device,
          memory_budget, max_image_tokens, backend, as_json):
    """Accuracy on a question set, per mode and question type, for one or more systems side by side."""
    from edgevlm import evaluation
    from edgevlm.loading import sources

    systems = sources(bundles, extractor=extractor, reasoner=reasoner, preset=preset, device=device,
                      memory_budget=memory_budget, max_image_tokens=max_image_tokens, backend=backend)
    if data is None:
        if preset != "demo":
            raise UsageError("give the items to score with --data FILE.jsonl (only --preset demo has a default)")
        from edgevlm import demo

        data = demo.TEST_SET / "items.jsonl"
    items = evaluation.load_items(data)[:limit]
    results = evaluation.compare(systems, items, modes=[m.strip() for m in modes.split(",") if m.strip()],
                                 think=think, temperature=temperature, seed=seed, constrained=constrained)
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
    tunemod = _needs_torch("tune", "edgevlm.train.tune")
    from edgevlm.evaluation import load_items

    val = load_items(val_data, image=False) if val_data else None  # items without an image only tune a reasoner
    scores = tunemod.tune(model, data, out, steps=steps, batch_size=batch_size, lr=lr, lora=lora, val_items=val,
                          teacher=teacher, eval_every=eval_every, save_every=eval_every, resume=resume, seed=seed,
                          adapter_only=adapter_only, freeze_vision=freeze_vision, log=lambda m: click.echo(m, err=True))
    click.echo(json.dumps({"out": out, **scores}))


@cli.command()
@click.option("--bundle", "bundle_dir", metavar="DIR", help="An exported bundle (ONNX Runtime; no torch needed).")
@_PAIR
@_PLACE
@_PIPELINED
@click.option("--host", default="127.0.0.1", show_default=True, help="The address to listen on (0.0.0.0: every "
              "interface; then give an --api-key).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", envvar="EDGEVLM_API_KEY", help="Clients must send it (Authorization: Bearer KEY); "
              "also from $EDGEVLM_API_KEY.")
@click.option("--allow-dir", type=click.Path(file_okay=False, exists=True),
              help="image_url may name files under this folder (else data URLs only).")
@click.option("--max-queue", type=click.IntRange(min=1), default=4, show_default=True,
              help="Requests that may wait for the models; more are refused with 503.")
@click.option("--max-body-mb", type=click.FloatRange(min=0.001), default=20, show_default=True, callback=_finite,
              help="The largest request body.")
def serve(bundle_dir, extractor, reasoner, preset, device, memory_budget, max_image_tokens, backend, pipelined, host,
          port, api_key, allow_dir, max_queue, max_body_mb):
    """An OpenAI-compatible HTTP server (POST /v1/chat/completions; /v1/models, /health, /metrics)."""
    from pathlib import Path

    from edgevlm.loading import Source
    from edgevlm.runner import Runner

    try:
        import uvicorn

        from edgevlm.server import Limits, create_app
    except ImportError as e:
        raise UsageError(f"edgevlm serve needs its extra ({e}); pip install 'edgevlm[serve]'") from None
    source = Source(bundle=bundle_dir, extractor=extractor, reasoner=reasoner, preset=preset, device=device,
                    memory_budget=memory_budget, max_image_tokens=max_image_tokens, pipelined=pipelined,
                    backend=backend)
    _note("loading models")
    pipe = source.load()
    limits = Limits(max_body_bytes=int(max_body_mb * 1e6), allow_dir=Path(allow_dir) if allow_dir else None)
    with Runner(pipe, max_queue=max_queue) as runner:
        app = create_app(runner, model=source.label(), api_key=api_key, limits=limits)
        uvicorn.run(app, host=host, port=port, log_level="warning")


@cli.command()
@click.argument("bag")
@click.option("--topic", required=True, help="The image topic (sensor_msgs/Image or CompressedImage).")
@click.option("--question", required=True, help="What to ask about each frame.")
@click.option("--every", default="0", show_default=True, metavar="TIME",
              help="Answer at most one frame per TIME of recording (2s, 500ms; 0: every frame).")
@click.option("--bundle", "bundle_dir", metavar="DIR", help="An exported bundle (ONNX Runtime; no torch needed).")
@_PAIR
@_GGUF
@_MODE
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
              help="Most visible tokens per stage (default: 1024; thinking not counted).")
@_TEMPERATURE
@_SEED
@_PLACE
@_PIPELINED
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Answer only the first N picked frames.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object a frame: time_s and the `run --json` result.")
def replay(bag, topic, question, every, bundle_dir, extractor, reasoner, preset, gguf_file, mode, think, think_budget,
           max_new_tokens, temperature, seed, device, memory_budget, max_image_tokens, backend, pipelined, limit,
           as_json):
    """Answer QUESTION about the frames of a rosbag2 recording BAG (MCAP or sqlite3), offline."""
    import collections
    import itertools

    from edgevlm.loading import Source
    from edgevlm.options import Options, check_text
    from edgevlm.replay import frames, parse_every
    from edgevlm.runner import Runner

    options = {"mode": mode, "think": think, "think_budget": think_budget, "max_new_tokens": max_new_tokens,
               "temperature": temperature, "seed": seed}
    Options.of(options)
    check_text(question, "the question")
    picked = frames(bag, topic, parse_every(every))
    first = next(picked, None)  # the recording and its topic are checked before any model loads
    if first is None:
        raise UsageError(f"{topic} has no messages in {bag}")
    source = Source(bundle=bundle_dir, extractor=extractor, reasoner=reasoner, preset=preset, gguf_file=gguf_file,
                    device=device, memory_budget=memory_budget, max_image_tokens=max_image_tokens, pipelined=pipelined,
                    backend=backend)
    _note("loading models")
    pipe = source.load(load_reasoner=mode != "direct")

    def show(seconds: float, request) -> None:
        result = request.result()
        if as_json:
            click.echo(json.dumps({"time_s": round(seconds, 3), "result": result.to_dict()}, ensure_ascii=False))
        else:
            click.echo(f"{seconds:9.2f} s  {result.answer}  ({result.total_ms:.0f} ms)")

    # Frames go through a Runner, one submitted ahead: read from the recording meanwhile, or (pipelined) the
    # next frame's extract beside this one's think. Answers print in the recording's order.
    ahead: collections.deque = collections.deque()
    with Runner(pipe, max_queue=2) as runner:
        try:
            for seconds, image in itertools.islice(itertools.chain([first], picked), limit):
                ahead.append((seconds, runner.submit(image, question, **options)))
                if len(ahead) > 1:
                    show(*ahead.popleft())
            while ahead:
                show(*ahead.popleft())
        finally:  # a failure or Ctrl-C: the frame still in flight stops at its next token
            for _, request in ahead:
                request.cancel()


@cli.command("make-tiny")
@click.argument("family")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--seed", type=int, default=0, show_default=True, help="Weight initialisation seed.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if edgevlm wrote it; nothing else.")
def make_tiny(family, out_dir, seed, overwrite):
    """Build a tiny random model of FAMILY (qwen3, llava_onevision, idefics3) in OUT_DIR, offline.

    Use it to test an integration without downloads; its answers are random text.
    """
    path = _needs_torch("make-tiny", "edgevlm.train.tiny").make_tiny(family, out_dir, seed=seed, overwrite=overwrite)
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
