"""The `edgevlm` command. Exit codes: 0 success, 2 usage error, 1 any other failure (one-line message)."""

from __future__ import annotations

import json
import sys

import click

from edgevlm import __version__, prompts
from edgevlm.errors import EdgeVLMError, UsageError


def _quiet_libraries() -> None:
    """Library warnings and progress bars are noise on a robot's console; --debug shows them."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _note(message: str) -> None:
    """Progress for long steps, on stderr and only for a person watching a terminal."""
    if sys.stderr.isatty():
        click.echo(f"edgevlm: {message}", err=True)


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
@click.option("--extractor", metavar="ID|DIR", help="The VLM that extracts visual details (hub id or directory).")
@click.option("--reasoner", metavar="ID|DIR", help="The LLM that plans and reasons (hub id or directory).")
@click.option("--preset", metavar="NAME", help="A named model pair: paper-0.6b (default), paper-1.7b.")
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
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option("--device", default="cpu", show_default=True, metavar="cpu|cuda", help="Where the models run.")
@click.option("--stream", is_flag=True, help="Print tokens as they are generated.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with everything.")
@click.option("--profile", is_flag=True, help="Print a per-stage timing table (to stderr).")
def run(image, question, extractor, reasoner, preset, mode, think, think_budget, max_new_tokens, choices,
        instruction, seed, device, stream, as_json, profile):
    """Answer QUESTION about IMAGE (a path, or - to read image bytes from stdin)."""
    from edgevlm.images import load_image
    from edgevlm.pipeline import MODES, Pipeline
    from edgevlm.presets import get_preset

    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    if not question.strip():
        raise UsageError("the question is empty")
    if preset:
        get_preset(preset)  # an unknown name is a usage error before anything loads
    # Read the image before loading any model: a bad path should fail in milliseconds, not after a load.
    pil = load_image(sys.stdin.buffer.read() if image == "-" else image)
    _note("loading models")
    pipe = Pipeline.from_pretrained(extractor, reasoner, preset=preset, device=device,
                                    load_reasoner=mode != "direct")
    events = pipe.stream(pil, question, choices=list(choices) or None, mode=mode, think=think,
                         think_budget=think_budget, max_new_tokens=max_new_tokens, instruction=instruction,
                         seed=seed)
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
    if profile:
        click.echo(profile_table(result), err=True)


def profile_table(result) -> str:
    """A compact per-stage table: where the milliseconds went and how fast tokens came."""
    head = ("stage", "prompt", "new", "preproc ms", "vision ms", "prefill ms", "decode ms", "TTFT ms", "total ms",
            "prefill tok/s", "decode tok/s")
    rows = []
    for name, s in result.stages.items():
        t = s.timings
        rows.append((name, s.prompt_tokens, s.new_tokens, t.preprocess_ms, t.vision_ms, t.prefill_ms, t.decode_ms,
                     t.ttft_ms, t.total_ms, t.prefill_tok_s, t.decode_tok_s))
    cells = [[c if isinstance(c, str) else f"{c:.1f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*head)] + [fmt.format(*r) for r in cells]
    lines.append(f"total {result.total_ms:.1f} ms (image decode {result.image_ms:.1f} ms)")
    return "\n".join(lines)


@cli.command("make-tiny")
@click.argument("family")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--seed", type=int, default=0, show_default=True, help="Weight initialisation seed.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
def make_tiny(family, out_dir, seed, overwrite):
    """Build a tiny random model of FAMILY (qwen3, llava_onevision, idefics3) in OUT_DIR, offline.

    Use it to test an integration without downloads; its answers are random text.
    """
    try:
        from edgevlm import testing
    except ImportError as e:
        raise EdgeVLMError(f"make-tiny needs torch and transformers ({e}); pip install 'edgevlm[export]'") from None
    path = testing.make_tiny(family, out_dir, seed=seed, overwrite=overwrite)
    click.echo(str(path))


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())


def main(argv: list[str] | None = None) -> None:
    """Console entry point: every failure becomes one line on stderr and an exit code."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        code = cli.main(args=args, prog_name="edgevlm", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("edgevlm: interrupted", err=True)
        code = 130
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
    except KeyboardInterrupt:
        click.echo("edgevlm: interrupted", err=True)
        code = 130
    except Exception as e:  # a bug, not bad input: still one line unless --debug
        if debug:
            raise
        click.echo(f"edgevlm: internal error: {type(e).__name__}: {_one_line(e)[:300]} "
                   "(rerun with --debug for the traceback)", err=True)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
