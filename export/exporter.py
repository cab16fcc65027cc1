"""`edgevlm export`: HF checkpoints -> a bundle (ONNX graphs + manifest), written atomically."""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from edgevlm import bundle
from edgevlm.errors import UsageError

QUANTS = ("fp32", "fp16")
FORMATS = ("onnx",)
# Graphs each family exports (for progress counts).
_GRAPHS = {"llava_onevision": 3, "idefics3": 3, "causal_lm": 1}


def _exporter(family: str):
    from edgevlm.export import causal_lm, idefics3, llava_onevision

    return {"llava_onevision": llava_onevision, "idefics3": idefics3, "causal_lm": causal_lm}[family]


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


def export_bundle(out: str | Path, *, extractor: str | None = None, reasoner: str | None = None,
                  preset: str | None = None, with_reasoner: bool = True, fmt: str = "onnx", quant: str = "fp32",
                  vision_quant: str | None = None, target: str = "cpu", overwrite: bool = False,
                  log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> Path:
    """Export an extractor and a reasoner (hub ids or directories; else the preset's) into bundle `out`.

    `with_reasoner=False` exports the extractor alone: a bundle for `--mode direct`.
    """
    from edgevlm.families import extractor_family, reasoner_family
    from edgevlm.hub import resolve, resolve_extractor
    from edgevlm.presets import DEFAULT_PRESET, get_preset

    if fmt not in FORMATS:
        raise UsageError(f"format {fmt!r} is not available yet; this edgevlm exports: {', '.join(FORMATS)}")
    for q in (quant, vision_quant or quant):
        if q not in QUANTS:
            raise UsageError(f"quantization {q!r} is not available yet; choose one of: {', '.join(QUANTS)}")
    p = get_preset(preset or DEFAULT_PRESET)
    extractor, reasoner = extractor or p.extractor, reasoner or p.reasoner
    ex_dir = resolve_extractor(extractor)
    roles = [("extractor", extractor, ex_dir, extractor_family(ex_dir))]
    stages = {"extract": "extractor", "direct": "extractor"}
    if with_reasoner:
        re_dir = resolve(reasoner)
        roles.append(("reasoner", reasoner, re_dir, reasoner_family(re_dir)))
        stages.update(plan="reasoner", think="reasoner")
    total = sum(_GRAPHS[f.name] for *_, f in roles)
    done = [0]
    started = time.perf_counter()

    with bundle.atomic_directory(Path(out), overwrite=overwrite) as tmp:
        models = {}
        for role, name, model_dir, family in roles:
            @contextmanager
            def step(what: str, role=role):
                done[0] += 1
                log(f"[{done[0]}/{total}] {role}: exporting {what} ...")
                t = time.perf_counter()
                yield
                log(f"[{done[0]}/{total}] {role}: {what} done in {time.perf_counter() - t:.1f} s")

            kwargs = {"vision_quant": vision_quant} if family.vision else {}
            entry = _exporter(family.name).export_model(model_dir, tmp / role, tmp, quant=quant, step=step, **kwargs)
            entry["source"] = _source(name, model_dir)
            models[role] = entry
        manifest = {
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "stages": stages,
            "models": models,
            "target": target,
            "provenance": {"versions": _versions(), "export_seconds": None},
            "fidelity": None,
        }
        manifest["provenance"]["export_seconds"] = round(time.perf_counter() - started, 1)
        bundle.write_manifest(tmp, manifest, progress=lambda m: log(f"{m} ..."))
    log(f"wrote {out} in {time.perf_counter() - started:.1f} s")
    return Path(out)
