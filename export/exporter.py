"""`edgevlm export`: HF checkpoints -> a bundle (ONNX graphs + manifest), written atomically.

Every model is first exported in fp32 (the reference); each graph is then converted to its precision
(fp16, int8 or int4), and the quantized models are compared with the fp32 ones stage by stage on
held-out calibration prompts. The fidelity report goes into the manifest; `min_agreement` / `max_kl`
turn it into a gate: a bundle that misses them is not written.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from edgevlm import bundle
from edgevlm.calibration.metrics import report_table
from edgevlm.errors import EdgeVLMError, ModelError, UsageError
from edgevlm.export.gptq import offset_matmuls
from edgevlm.export.quantize import INT4_METHODS, KEEP_INT8_BLOCK, QUANTS, SENSITIVE, remove_graph
from edgevlm.manifest import ATTENTION_MASK, PAST, PIXEL_VALUES, POSITION_IDS, Manifest, ModelSpec
from edgevlm.memory import check_image_budget, with_image_budget

# GPTQ's asymmetric uint4 zero points run at MatMulNBits' full speed; TensorRT's dequantize layer rejects zero
# points, so its bundles take symmetric AWQ.
DEFAULT_INT4_METHOD = {"onnxruntime": "gptq", "tensorrt": "awq"}
# ONNX Runtime's 8-bit GatherBlockQuantized: SmolLM2-135M's 113 MB table in 30 MB, at no measured fidelity cost
# (benchmarks/quant_fidelity.py emb8); TensorRT's parser has no quantized Gather
DEFAULT_EMBED = {"onnxruntime": "int8", "tensorrt": "fp32"}
# What a GPTQ int4 decoder keeps by default on calibration prompts, moving its costliest MatMuls to 8 bits until it
# does: half the 0.02 mean KL from fp32 the project's int4 promises (issue 26), a margin for prompts it has not
# seen. Off any grid (the demo reasoner: 0.003) GPTQ meets it as is, as does SmolLM2 keeping its GGUF's Q4_1 grid
# through offsets (0.004); re-rounded to uint4 zero points (--int4-offsets off) SmolLM2 does not (0.032). (Top-1
# agreement is no default criterion: a random tiny model's flat distributions never reach 0.95.)
DEFAULT_FIDELITY_KL = 0.01
FORMATS = ("onnx", "tensorrt")  # graphs for ONNX Runtime, or for TensorRT's ONNX parser (edgevlm.export.tensorrt)
REFERENCE = ".reference"  # fp32 graphs, inside the temporary bundle until the report is done


@dataclass
class QuantPlan:
    """Precision per component. `vision` defaults to int8 when the rest is int4 (never int4 unless asked)."""

    extractor: str = "fp32"
    reasoner: str = "fp32"
    vision: str | None = None
    embed: str | None = None  # token embedding of int8/int4 models; None: the flavour's default (DEFAULT_EMBED)
    int4_method: str | None = None  # None: the flavour's default (DEFAULT_INT4_METHOD)
    block_size: int = 32
    keep_int8: tuple[str, ...] = SENSITIVE  # decoder layers an int4 model keeps in int8
    fidelity_target: float | None = None  # top-1 agreement on calibration prompts an int4 decoder must reach
    fidelity_kl: float | None = None  # mean KL it must stay under (0: none); None: DEFAULT_FIDELITY_KL for GPTQ int4
    targets_given: bool = True  # False where resolved() set the default: missing it then warns, never fails
    int8_compute: bool = True  # int8 decoders and vision towers on int8 activations where the check passes
    int4_offsets: bool = True  # gptq: float zero points for MatMuls on a float-minimum grid (gptq.on_float_grid)

    def for_graph(self, role: str, graph: str) -> str:
        base = self.extractor if role == "extractor" else self.reasoner
        if graph == "vision":
            return self.vision or ("int8" if base == "int4" else base)
        if graph == "embed":
            return self.embed if base in ("int8", "int4") else base
        return base

    def describe(self) -> dict:
        return {"extractor": self.extractor, "reasoner": self.reasoner, "vision": self.for_graph("extractor", "vision"),
                "embed": self.embed, "int4_method": self.int4_method, "block_size": self.block_size,
                "keep_int8": list(self.keep_int8), "keep_int8_block_size": KEEP_INT8_BLOCK,
                "fidelity_target": self.fidelity_target, "fidelity_kl": self.fidelity_kl,
                "int8_compute": self.int8_compute, "int4_offsets": self.int4_offsets}

    def resolved(self, flavour: str = "onnxruntime") -> QuantPlan:
        """This plan with its int4 method chosen: the flavour's default where none was given."""
        method = self.int4_method or DEFAULT_INT4_METHOD[flavour]
        plan = replace(self, int4_method=method, embed=self.embed or DEFAULT_EMBED[flavour])
        if (self.fidelity_target is None and self.fidelity_kl is None and method == "gptq"
                and "int4" in (self.extractor, self.reasoner)):
            plan = replace(plan, fidelity_kl=DEFAULT_FIDELITY_KL, targets_given=False)
        return plan

    def validate(self, flavour: str = "onnxruntime") -> None:
        if flavour == "tensorrt":
            from edgevlm.export import tensorrt

            tensorrt.check_plan(self)
        for q in (self.extractor, self.reasoner, self.vision or "fp32", self.embed):
            if q not in QUANTS:
                raise UsageError(f"unknown precision {q!r}; choose one of: {', '.join(QUANTS)}")
        if set(self.keep_int8) - set(SENSITIVE):
            raise UsageError(f"--int4-keep-int8 takes a comma list of: {', '.join(SENSITIVE)} (or none)")
        if self.int4_method not in INT4_METHODS:
            raise UsageError(f"unknown int4 method {self.int4_method!r}; choose one of: {', '.join(INT4_METHODS)}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise UsageError("--block-size must be a power of two, at least 16")
        target = self.fidelity_target
        if target is not None and not (isinstance(target, (int, float)) and 0 < target <= 1):
            raise UsageError(f"--fidelity-target is a top-1 agreement, above 0 and at most 1; got {target!r}")
        kl = self.fidelity_kl
        if kl is not None and not (isinstance(kl, (int, float)) and 0 <= kl < float("inf")):
            raise UsageError(f"--fidelity-kl is a mean KL divergence, at least 0; got {kl!r}")
        if (target or kl) and ("int4" not in (self.extractor, self.reasoner) or self.int4_method != "gptq"):
            raise UsageError("--fidelity-target and --fidelity-kl rank GPTQ's int4 layers to keep in 8 bits: they "
                             "need --quant int4 with --int4-method gptq")

    @property
    def is_reference(self) -> bool:
        return {self.extractor, self.reasoner, self.vision or "fp32"} == {"fp32"}  # the embedding follows them


def _source(name: str, path: Path) -> dict:
    # a hub snapshot lives in .../snapshots/<commit>: that commit is the revision
    revision = path.name if path.parent.name == "snapshots" else None
    return {"model": name, "revision": revision}


def _versions() -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers

    from edgevlm import __version__

    return {"edgevlm": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def _ort_model(root: Path, spec: ModelSpec, flavour: str = "onnxruntime"):
    """An OrtModel on one model of the bundle being written."""
    from edgevlm.backends.onnx import OrtModel

    return OrtModel(bundle.Bundle.in_progress(root, {"model": spec}, flavour=flavour), "model")


def decoder_feeds(model, inputs: list, max_tokens: int = 512) -> list[dict[str, np.ndarray]]:
    """Decoder inputs (fresh cache) for rendered prompts: what GPTQ calibrates on."""
    feeds = []
    kv = model.entry.kv
    names = [i.name for i in model.decoder.get_inputs()]
    for rendered, image in inputs:
        prepared = model.prepare(rendered, image)
        model.encode(prepared)
        x = model.decoder_input(prepared)[:, :max_tokens]
        n = x.shape[1]
        feed = {names[0]: x, POSITION_IDS: np.arange(n, dtype=np.int64)[None]}
        if ATTENTION_MASK in names:  # traced graphs; fused ones take the lengths from the positions
            feed[ATTENTION_MASK] = np.ones((1, n), np.int64)
        empty = np.zeros((1, kv.kv_heads, 0, kv.head_dim), np.float32)
        feed.update({name: empty for name in names if name.startswith(PAST)})
        feeds.append(feed)
    return feeds


MAX_VISION_FEEDS = 64  # crops a data-driven int4 method (awq, gptq) sees when asked to quantize a vision tower


def _vision_feeds(model, images) -> list[dict[str, np.ndarray]]:
    """One crop per feed, at most MAX_VISION_FEEDS of them."""
    feeds = []
    for image in images:
        _, inputs = model.module.prepare_inputs(model.family.render(model.tokenizer, "x", with_image=True), image,
                                                model.entry.preprocess, model.tokenizer)
        pixels = inputs[PIXEL_VALUES]
        feeds += [{PIXEL_VALUES: pixels[i:i + 1]} for i in range(len(pixels))]
    return feeds[:MAX_VISION_FEEDS]


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _convert_graph(src: Path, dst: Path, quant: str, kind: str, plan: QuantPlan, reader_for: Callable,
                   flavour: str = "onnxruntime", extra_int8: tuple[str, ...] = (), cache: dict | None = None,
                   log=None, record: dict | None = None) -> dict[str, float]:
    """Writes `src` at precision `quant` to `dst` for `flavour`; for a GPTQ'd int4 decoder returns the relative
    output error of each MatMul left in int4 (what `extra_int8`, MatMuls kept in 8 bits beyond plan.keep_int8,
    choose from). An int8 graph's int8-compute check goes into `record[kind]`."""
    record, errors = ({} if record is None else record), {}
    from edgevlm.export import graphs, quantize, tensorrt

    if flavour == "tensorrt" and quant in ("int8", "int4"):
        if quant == "int8":
            tensorrt.int8_weight_only(src, dst)
        else:
            reader = reader_for(kind) if plan.int4_method in ("awq", "gptq") else None
            keep = quantize.sensitive_matmuls(src, plan.keep_int8) if kind == "decoder" else []
            tensorrt.int4_weight_only(src, dst, method=plan.int4_method, block_size=plan.block_size, reader=reader,
                                      keep_int8=keep)
        return {}
    if quant in ("fp32", "fp16"):
        for suffix in ("", ".data"):
            if Path(str(src) + suffix).exists():
                (_link_or_copy if quant == "fp32" else shutil.copy2)(Path(str(src) + suffix), Path(str(dst) + suffix))
        if quant == "fp16":
            graphs.to_fp16(dst)
    elif kind == "embed":
        quantize.quantize_embeddings(src, dst, bits=int(quant[3:]))
    elif quant == "int8" and plan.int8_compute and kind in INT8_COMPUTE_CHECKS:
        record[kind] = _int8_compute(src, dst, kind, reader_for(kind), log or (lambda m: None))
    elif quant == "int8":
        quantize.int8_weight_only(src, dst)
    else:  # int4
        reader = reader_for(kind) if plan.int4_method in ("awq", "gptq") else None
        keep = quantize.sensitive_matmuls(src, plan.keep_int8) if kind == "decoder" else []
        kept = [*keep, *extra_int8]  # their inputs smoothed against their int8 activation blocks
        errors = quantize.int4(src, dst, method=plan.int4_method, block_size=plan.block_size, reader=reader,
                               keep_int8=kept, cache=cache, smooth_int8=kept if reader is not None else (),
                               offsets="auto" if plan.int4_offsets else False, progress=log)
    if kind == "decoder" and quant in ("int8", "int4") and plan.embed in ("int8", "int4"):
        quantize.quantize_embeddings(dst, dst, bits=int(plan.embed[3:]))  # a token table inside the decoder
    return errors


# What int8 compute must keep on the calibration inputs, else the graph is tried with fewer layers on it, then
# weight-only: a decoder's next-token distribution after each prompt (mean KL from fp32; SmolLM2-135M's smoothed
# int8 compute measures 0.003-0.007 on held-out generations), a vision tower's features (cosine).
INT8_COMPUTE_CHECKS = {"decoder": ("mean_kl", 0.01), "vision": ("cosine", 0.995)}


def _int8_compute(src: Path, dst: Path, kind: str, reader, log) -> dict:
    """An int8 graph on int8 compute (edgevlm.export.int8_compute), checked against `src` on the calibration
    feeds, the fastest form that passes first: every constant MatMul but a decoder's LM head on 7-bit weights
    (the uint8 x int8 kernel, VNNI where the CPU has it), then on 8-bit uint8 weights (twice the weights'
    precision; the widening uint8 x uint8 kernel: as fast without VNNI, slower with it), then also keeping the
    MLP down projections in weight-only int8 (their inputs carry the largest outliers), then weight-only
    throughout. Returns what was kept and measured."""
    from edgevlm.export import int8_compute, quantize

    metric, bound = INT8_COMPUTE_CHECKS[kind]
    head = quantize.sensitive_matmuls(src, ["head"]) if kind == "decoder" else []
    if head:  # (weight format, what stays weight-only: named, the MatMuls)
        ladder = [("int7", "head", head), ("uint8", "head", head),
                  ("uint8", "head, down", [*head, *quantize.sensitive_matmuls(src, ["down"])])]
    else:
        ladder = [("int7", "none", []), ("uint8", "none", [])]
    reference = int8_compute.outputs(src, reader.feeds)  # once, for every step of the ladder
    for weights, kept, keep in ladder:
        remove_graph(dst)
        # No smoothing for a vision tower: scales fitted on the calibration images (scenes without text) made the
        # demo tower's features on images of text 7% off (up to 35% on one crop; 0.8% unsmoothed), and the demo
        # eval's text questions fell from 100% to 59%, while the calibration check saw nothing amiss
        count = int8_compute.quantize(src, dst, reader, keep=keep, smooth=kind != "vision", weights=weights,
                                      progress=log)
        score = int8_compute.compare(reference, int8_compute.outputs(dst, reader.feeds))
        ok = score[metric] <= bound if metric == "mean_kl" else score[metric] >= bound
        log(f"int8 compute on {count} MatMuls ({weights} weights; weight-only: {kept}): {metric} "
            f"{score[metric]:.4f} on calibration inputs ({'ok' if ok else 'misses'} {bound})")
        if ok:
            return {"compute": True, "weights": weights, "weight_only": kept, "matmuls": count,
                    **{k: round(v, 5) for k, v in score.items()}}
    remove_graph(dst)
    log("int8 compute misses the check: weight-only int8")
    quantize.int8_weight_only(src, dst)
    return {"compute": False, **{k: round(v, 5) for k, v in score.items()}}


def export_bundle(out: str | Path, *, extractor: str | None = None, reasoner: str | None = None,
                  preset: str | None = None, with_reasoner: bool = True, gguf_file: str | None = None,
                  fmt: str = "onnx", quant: QuantPlan | str | None = None, target: str | None = None,
                  calibration: str | Path = "scenes", fidelity_samples: int = 8, fidelity_tokens: int = 32,
                  min_agreement: float | None = None, max_kl: float | None = None, overwrite: bool = False,
                  max_image_tokens: int | None = None,
                  log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> Path:
    """Export an extractor and a reasoner (hub ids, directories, or a GGUF reasoner; else the preset's)
    into bundle `out`. `with_reasoner=False` exports the extractor alone (a bundle for `--mode direct`).
    `quant` defaults to fp32 (fp16 for fmt "tensorrt"), `target` to cpu (cuda for fmt "tensorrt").
    `max_image_tokens`: a visual-token budget recorded in the extractor's preprocessing (edgevlm.memory.
    with_image_budget), so every run and memory plan of the bundle keeps its images within it."""
    from edgevlm.calibration import data
    from edgevlm.export.checkpoints import resolve, resolve_extractor
    from edgevlm.families import export_module, extractor_family, family_module, reasoner_family
    from edgevlm.presets import DEFAULT_PRESET, get_preset
    from edgevlm.targets import get_target

    quant = quant or ("fp16" if fmt == "tensorrt" else "fp32")
    target = target or ("cuda" if fmt == "tensorrt" else "cpu")
    plan = QuantPlan(extractor=quant, reasoner=quant) if isinstance(quant, str) else quant
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}; this edgevlm exports: {', '.join(FORMATS)}")
    flavour = "tensorrt" if fmt == "tensorrt" else "onnxruntime"
    plan = plan.resolved(flavour)
    plan.validate(flavour)
    get_target(target)
    if flavour == "tensorrt":
        from edgevlm.export import tensorrt

        tensorrt.check_target(target)
    for name, value in (("min_agreement", min_agreement), ("max_kl", max_kl)):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise UsageError(f"{name} must be a finite number, 0 or more; got {value!r}")  # NaN passes every gate
    gated = min_agreement is not None or max_kl is not None
    if gated and (plan.is_reference or fidelity_samples < 1):
        raise UsageError("--min-agreement/--max-kl need a quantized export with --fidelity-samples >= 1")
    check_image_budget(max_image_tokens)  # before any work: the budget itself is applied once the graphs exist
    items = data.load(calibration)
    calib_items, eval_items = data.split(items)
    eval_items = eval_items[:fidelity_samples]
    p = get_preset(preset or DEFAULT_PRESET)
    extractor, reasoner = extractor or p.extractor, reasoner or p.reasoner
    ex_dir = resolve_extractor(extractor)
    roles = [("extractor", extractor, ex_dir, extractor_family(ex_dir))]
    stages = {"extract": "extractor", "direct": "extractor"}
    if with_reasoner:
        re_dir = resolve(reasoner, gguf_file=gguf_file)
        roles.append(("reasoner", reasoner, re_dir, reasoner_family(re_dir)))
        stages.update(plan="reasoner", think="reasoner")
    total = sum(len(family_module(f.name).GRAPHS) for *_, f in roles)
    done = [0]
    started = time.perf_counter()

    with bundle.atomic_directory(Path(out), overwrite=overwrite) as tmp:
        models, references, kept_int8, offsets, int8_checks, parity = {}, {}, {}, {}, {}, {}
        for role, name, model_dir, family in roles:
            @contextmanager
            def step(what: str, role=role):
                done[0] += 1
                log(f"[{done[0]}/{total}] {role}: exporting {what} ...")
                t = time.perf_counter()
                yield
                log(f"[{done[0]}/{total}] {role}: {what} done in {time.perf_counter() - t:.1f} s")

            reference = export_module(family.name).export_model(model_dir, tmp / REFERENCE / role, tmp, step=step,
                                                                fused=flavour == "onnxruntime")
            parity[role] = _check_parity(tmp, role, reference, model_dir, family, items[0], flavour, log)
            if role == "extractor":  # the quantized model and the fidelity check see the same images
                reference = with_image_budget(reference, max_image_tokens)
            references[role] = reference
            models[role], kept = _finish_model(tmp, role, reference, plan, calib_items, log, flavour,
                                               int8_checks.setdefault(role, {}))
            models[role] = replace(models[role], source=_source(name, model_dir))
            if kept:
                kept_int8[role] = list(kept)
            decoder = models[role].graphs["decoder"]
            if decoder.quant == "int4" and flavour == "onnxruntime" and (
                    names := offset_matmuls(tmp / decoder.file)):
                offsets[role] = names
        fidelity = None
        if not plan.is_reference and fidelity_samples > 0:
            fidelity = _fidelity(tmp, models, references, eval_items, fidelity_tokens, log, flavour)
            log(report_table(fidelity))
            _gate(fidelity, min_agreement, max_kl)
        shutil.rmtree(tmp / REFERENCE)
        manifest = Manifest(
            stages=stages, models=models, created=datetime.now(UTC).isoformat(timespec="seconds"), target=target,
            flavour=flavour,
            quantization={**plan.describe(), "calibration": str(calibration), "kept_int8": kept_int8,
                          "offsets": offsets,
                          "int8_compute_checks": {r: c for r, c in int8_checks.items() if c}},
            provenance={"versions": _versions(), "export_seconds": round(time.perf_counter() - started, 1),
                        "parity": parity},
            fidelity=fidelity)
        if flavour == "tensorrt":
            _write_trtexec_script(tmp, manifest, target)
        bundle.write_manifest(tmp, manifest, progress=lambda m: log(f"{m} ..."))
    log(f"wrote {out} in {time.perf_counter() - started:.1f} s")
    return Path(out)


# The exported fp32 graphs against transformers' model: fp32 against fp32 differs by float rounding alone (mean
# KL ~1e-9 on the tiny models, 1e-6 and under on real ones); a graph that computes something else is far off.
PARITY_TOKENS = 4
PARITY_KL = 1e-3
PARITY_COSINE = 0.999


def _check_parity(root: Path, role: str, reference: ModelSpec, model_dir: Path, family, item, flavour: str,
                  log: Callable[[str], None]) -> dict:
    """Refuse (one line) fp32 graphs that do not compute what transformers' own model does (edgevlm's PyTorch
    reference backend) on one calibration prompt (the extract stage's, with its image, for the extractor; the
    plan stage's for the reasoner), PARITY_TOKENS tokens teacher-forced, as optimum validates its exports: a
    transformers or torch other than the pinned ones can trace or read a model otherwise (a GPU host's torch
    2.11 / transformers 5.17 did), and every bundle quantized from the graphs would inherit it. Its figures."""
    from edgevlm.backends.torch_ref import TorchModel
    from edgevlm.calibration.fidelity import measure, reference_run, stage_inputs
    from edgevlm.export.graphs import PINNED, under_versions

    log(f"{role}: checking the graphs against transformers ...")
    source = TorchModel(model_dir, family)
    inputs = stage_inputs("extract" if role == "extractor" else "plan", source, [item])
    recorded = [reference_run(source, rendered, image, PARITY_TOKENS) for rendered, image in inputs]
    del source  # one model in memory at a time: transformers', then the graphs'
    gc.collect()
    result = measure(None, _ort_model(root, reference, flavour), inputs, PARITY_TOKENS, recorded=recorded)
    figures = {"mean_kl": float(f"{result.mean_kl:.3g}"), "positions": result.positions}
    said = f"mean KL {result.mean_kl:.1e} over {result.positions} positions"
    if result.feature_cosine is not None:
        figures["feature_cosine"] = round(result.feature_cosine, 6)
        said += f", image features cosine {result.feature_cosine:.6f}"
    if result.mean_kl > PARITY_KL or figures.get("feature_cosine", 1.0) < PARITY_COSINE:
        raise ModelError(f"the exported {role} does not compute what transformers' model does ({said}; at most KL "
                         f"{PARITY_KL:g}, cosine at least {PARITY_COSINE}) {under_versions()}: {PINNED}")
    log(f"{role}: the graphs match transformers ({said})")
    return figures


TRTEXEC_SCRIPT = "trtexec.sh"


def _write_trtexec_script(root: Path, manifest: Manifest, target: str) -> None:
    """The trtexec lines that build this bundle's engines by hand (as `edgevlm build` would), planned for the
    target's memory budget (a Jetson's; a desktop GPU's is unknown here, so each model's whole context)."""
    from edgevlm import engines
    from edgevlm.targets import get_target

    t = get_target(target)
    budget = int(t.budget_gb * 1e9) if t.budget_gb else None
    plans = engines.plan(bundle.Bundle(root, manifest), budget, source=target, default_budget=False)
    path = root / TRTEXEC_SCRIPT
    path.write_text(engines.trtexec_script(plans, target))
    path.chmod(0o755 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _finish_model(root: Path, role: str, reference: ModelSpec, plan: QuantPlan, calib_items: list,
                  log, flavour: str = "onnxruntime", int8_checks: dict | None = None
                  ) -> tuple[ModelSpec, tuple[str, ...]]:
    """Move the non-graph files next to the final graphs and convert each graph to its precision; returns the
    model and the decoder MatMuls --fidelity-target kept in 8 bits."""
    ref_dir = root / reference.tokenizer
    out = root / role
    out.mkdir(parents=True, exist_ok=True)
    graph_files = {Path(g.file).name for g in reference.graphs.values()}
    for f in ref_dir.iterdir():
        if f.name not in graph_files and f.name.removesuffix(".data") not in graph_files:
            _link_or_copy(f, out / f.name)
    readers = {}

    def reader_for(kind: str):
        from edgevlm.calibration.fidelity import stage_inputs
        from edgevlm.export.quantize import FeedReader
        from edgevlm.images import load_image

        if kind not in readers:
            # the fp32 model only while its feeds are made: a 1.7B decoder session is 7 GB, and the quantizer's
            # calibration pass and check load it again
            model = _ort_model(root, reference, flavour)
            if kind == "vision":
                images = [load_image(p) for p in dict.fromkeys(i.image for i in calib_items)][:16]
                readers[kind] = FeedReader(_vision_feeds(model, images))
            else:
                stage_names = ("extract",) if role == "extractor" else ("plan", "think")
                inputs = [x for s in stage_names for x in stage_inputs(s, model, calib_items[:16])]
                readers[kind] = FeedReader(decoder_feeds(model, inputs))
            del model
        readers[kind].rewind()
        return readers[kind]

    from edgevlm.export import fused, graphs, tensorrt

    converted, errors, caches = {}, {}, {}  # per graph: quantize.int4's results, kept across the target's steps
    for name, g in reference.graphs.items():
        q = plan.for_graph(role, name)
        src, dst = root / g.file, out / Path(g.file).name
        if q != "fp32":
            log(f"{role}: {name} -> {q}{f' ({plan.int4_method}, block {plan.block_size})' if q == 'int4' else ''}")
        errors[name] = _convert_graph(src, dst, q, name, plan, reader_for, flavour, cache=caches.setdefault(name, {}),
                                      log=lambda m, name=name: log(f"{role}: {name}: {m}"), record=int8_checks)
        if flavour == "tensorrt":
            tensorrt.check(dst)  # refuses, naming the node, what TensorRT's parser would
        converted[name] = graphs.graph_entry(dst, root, q)
    spec = replace(reference, graphs=converted, tokenizer=role,
                   arrays={k: f"{role}/{Path(v).name}" for k, v in reference.arrays.items()})
    kept = ()
    if (plan.fidelity_target or plan.fidelity_kl) and converted["decoder"].quant == "int4":
        kept = _meet_target(root, role, reference, spec, errors["decoder"], plan, calib_items, reader_for,
                            caches["decoder"], log)
    shared = fused.updates_cache_in_place(root / converted["decoder"].file)  # not after an fp16 conversion
    return replace(spec, kv=replace(reference.kv, shared=shared)), kept


TARGET_PROMPTS = 6  # calibration prompts per stage that --fidelity-target measures (after the 16 GPTQ sees)
TARGET_TOKENS = 16


def _meet_target(root: Path, role: str, reference: ModelSpec, spec: ModelSpec, errors: dict[str, float],
                 plan: QuantPlan, calib_items: list, reader_for: Callable, cache: dict, log) -> tuple[str, ...]:
    """Keep in 8 bits the decoder MatMuls whose int4 costs most (relative output error on the calibration
    prompts), as many as _next_count predicts, until every stage of `role` reaches plan.fidelity_target top-1 agreement
    and stays within plan.fidelity_kl mean KL on calibration prompts GPTQ did not see. Returns the MatMuls kept
    beyond plan.keep_int8. Out of reach even all in 8 bits: an error for targets the user set; for the default,
    a warning, all kept in 8 bits (the nearest to the target there is)."""
    from edgevlm.calibration.fidelity import STAGES, measure, reference_run, stage_inputs

    ranked = sorted(errors, key=errors.get, reverse=True)
    items = calib_items[16:16 + TARGET_PROMPTS] or calib_items[:TARGET_PROMPTS]
    ref_model = _ort_model(root, reference)
    inputs = {stage: stage_inputs(stage, ref_model, items) for stage, r in STAGES.items() if r == role}
    recorded = {stage: [reference_run(ref_model, *x, TARGET_TOKENS) for x in xs] for stage, xs in inputs.items()}
    src, dst = root / reference.graphs["decoder"].file, root / spec.graphs["decoder"].file
    target, kl_target = plan.fidelity_target or 0.0, plan.fidelity_kl or float("inf")
    wanted = " and ".join([*([f"top-1 {target}"] if target else []),
                           *([f"KL {kl_target}"] if plan.fidelity_kl else [])])
    count = 0
    while True:
        candidate = _ort_model(root, spec)
        scores = [measure(ref_model, candidate, xs, TARGET_TOKENS, recorded[stage]) for stage, xs in inputs.items()]
        top1, kl = min(f.top1_agreement for f in scores), max(f.mean_kl for f in scores)
        kept = tuple(ranked[:count])
        log(f"{role}: {count} more MatMuls in 8 bits: top-1 agreement {top1:.4f}, mean KL {kl:.4f} on calibration "
            f"prompts (target {wanted})")
        if top1 >= target and kl <= kl_target:
            if kept:
                log(f"{role}: kept in 8 bits for the fidelity target: {_names(kept, len(ranked))}")
            return kept
        if count >= len(ranked):
            if not plan.targets_given:
                log(f"{role}: warning: the default fidelity target ({wanted}) is out of reach even with every decoder "
                    f"MatMul in 8 bits; all kept in 8 bits")
                return kept
            raise EdgeVLMError(f"the fidelity target ({wanted}) is out of reach for the {role}: top-1 agreement "
                               f"{top1:.4f}, mean KL {kl:.4f} with every decoder MatMul in 8 bits; no bundle "
                               "written (lower the target or export --quant int8)")
        count = _next_count(ranked, errors, count, kl, kl_target if kl > kl_target else None)
        del candidate
        remove_graph(dst)
        _convert_graph(src, dst, "int4", "decoder", plan, reader_for, extra_int8=tuple(ranked[:count]), cache=cache)


def _names(kept, of: int) -> str:
    """MatMul names for a log line: all of them, up to 8; then a count (the manifest lists every one)."""
    if len(kept) <= 8:
        return ", ".join(kept)
    return f"{len(kept)} of {of} MatMuls ({'every one' if len(kept) == of else ', '.join(kept[:3]) + ', ...'})"


def _next_count(ranked: list[str], errors: dict[str, float], count: int, kl: float, kl_target: float | None) -> int:
    """How many of the `ranked` MatMuls to keep in 8 bits next, `count` having been measured at mean KL `kl`. For a
    KL target: the fewest whose int4 output error (summed over those left in int4) predicts, in proportion, 80%
    of the target; else (top-1 agreement, which has no such model) twice as many. Always more than `count`."""
    doubled = min(len(ranked), max(2, count * 2))
    if kl_target is None or kl <= 0:
        return doubled
    left = [sum(errors[name] for name in ranked[c:]) for c in range(len(ranked) + 1)]
    wanted = 0.8 * kl_target / kl * left[count]
    return next((c for c in range(count + 1, len(ranked) + 1) if left[c] <= wanted), len(ranked))


def _fidelity(root: Path, models: dict, references: dict, items: list, tokens: int, log,
              flavour: str = "onnxruntime") -> dict:
    """Per stage: the exported model against its fp32 reference on held-out prompts."""
    from edgevlm.calibration.fidelity import STAGES, measure, stage_inputs

    report = {}
    loaded = {role: (_ort_model(root, references[role], flavour), _ort_model(root, models[role], flavour))
              for role in models}
    describe = None
    if "extractor" in loaded:
        describe = _describer(loaded["extractor"][0])
    for stage, role in STAGES.items():
        if role not in loaded:
            continue
        if all(g.quant == "fp32" for g in models[role].graphs.values()):
            continue
        log(f"measuring fidelity: {stage} ({len(items)} prompts x {tokens} tokens) ...")
        reference, candidate = loaded[role]
        result = measure(reference, candidate, stage_inputs(stage, reference, items, describe), tokens)
        ref_bytes = sum(bundle.graph_bytes(root / g.file) for g in references[role].graphs.values())
        new_bytes = sum(bundle.graph_bytes(root / g.file) for g in models[role].graphs.values())
        report[stage] = {**result.to_dict(), "role": role, "size_ratio": round(new_bytes / ref_bytes, 4)}
    return report


def _describer(extractor):
    """Descriptions for items that have none, from the fp32 extractor (greedy, 64 tokens)."""
    from edgevlm import prompts
    from edgevlm.generation import generate
    from edgevlm.images import load_image
    from edgevlm.pipeline import render_prompt

    def describe(item) -> str:
        prepared = extractor.prepare(render_prompt(extractor, prompts.extract_prompt(item.instruction),
                                                   with_image=True), load_image(item.image))
        extractor.encode(prepared)
        tokens = list(generate(extractor.prefill(prepared), prompts.EXTRACT.with_max_new_tokens(64),
                               eos_ids=extractor.eos_ids, max_context=extractor.max_context,
                               rng=np.random.default_rng(0)))
        return extractor.tokenizer.decode(tokens).strip() or prompts.FALLBACK_INSTRUCTION

    return describe


def _gate(report: dict, min_agreement: float | None, max_kl: float | None) -> None:
    for stage, r in report.items():
        if min_agreement is not None and r["top1_agreement"] < min_agreement:
            raise EdgeVLMError(f"fidelity gate failed: {stage} top-1 agreement {r['top1_agreement']:.4f} < "
                               f"{min_agreement}; no bundle written (try a higher precision or --int4-method)")
        if max_kl is not None and r["mean_kl"] > max_kl:
            raise EdgeVLMError(f"fidelity gate failed: {stage} mean KL {r['mean_kl']:.4g} > {max_kl}; "
                               "no bundle written (try a higher precision or --int4-method)")
