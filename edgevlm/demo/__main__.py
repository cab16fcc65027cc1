"""Rebuild the shipped demo models: python -m edgevlm.demo train [--out DIR] [--seed 0]"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from edgevlm import demo
from edgevlm.bundle import atomic_directory, atomic_file, check_output
from edgevlm.errors import EdgeVLMError
from edgevlm.signals import sigterm_as_interrupt

EXTRACTOR_STEPS, REASONER_STEPS = 1200, 1500
COMMON = dict(batch_size=16, lr=2e-3, eval_every=100, save_every=100)


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _to_fp16(model_dir: Path) -> None:
    """Store the weights in half precision (the runtime and the exporter load them as float32)."""
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    tensors = {k: v.half().contiguous() for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})


def _ship_test_set(src: Path, dest: Path) -> None:
    """The test split as an eval set: items.jsonl (image, question, choices, answer, type) + its images."""
    keep = ("image", "question", "choices", "answer", "type")
    lines = [json.loads(line) for line in (src / "items.jsonl").read_text().splitlines() if line.strip()]
    (dest / "images").mkdir(parents=True, exist_ok=True)
    for name in sorted({item["image"] for item in lines}):
        shutil.copy2(src / name, dest / name)
    (dest / "items.jsonl").write_text("".join(json.dumps({k: item[k] for k in keep}) + "\n" for item in lines))


def _ship_example(test: Path, out: Path) -> None:
    """The README's example: the test split's first open shape question, its image, and its label."""
    item = next(json.loads(line) for line in (test / "items.jsonl").read_text().splitlines()
                if line.strip() and json.loads(line)["type"] == "shape")
    with atomic_file(out / demo.EXAMPLE.name) as tmp:
        shutil.copy2(test / item["image"], tmp)
    with atomic_file(out / demo.EXAMPLE_LABEL.name) as tmp:
        tmp.write_text(json.dumps({"question": item["question"], "answer": item["answer"]}) + "\n")


def train(out: Path, work: Path, seed: int, extractor_steps: int, reasoner_steps: int, vision_steps: int,
          copy_steps: int, scenes: dict[str, int]) -> None:
    import multiprocessing

    import torch

    from edgevlm import tune
    from edgevlm.evaluation import load_items

    t0 = time.perf_counter()
    sets = demo.make_data(work, seed=seed, counts=scenes, log=_log)
    items, val = demo.slot_items(load_items(sets["train"])), demo.slot_items(load_items(sets["val"]))
    extractor, reasoner = demo.make_base_models(work, items + demo.whole_scene_items(items), seed=seed)
    _log(f"{len(items)} training questions on {scenes['train']} scenes")
    # The two models train at once, one core each (small models use two threads poorly); the one that
    # finishes first hands its core to the other.
    context = multiprocessing.get_context("spawn")
    reasoner_done = context.Event()
    job = context.Process(
        target=demo.train_extractor,
        args=(extractor, sets, work / "extractor", extractor_steps, vision_steps, seed, 1, COMMON, reasoner_done))
    job.start()
    on_step = demo.two_threads_once(lambda: not job.is_alive(), lambda m: _log(f"reasoner: {m}"), "the extractor")

    try:
        torch.set_num_threads(1)
        demo.pretrain_copying(reasoner, max_steps=copy_steps, seed=seed, log=lambda m: _log(f"reasoner: {m}"))
        _log(f"reasoner: tuning ({reasoner_steps} steps)")
        tune.tune(reasoner, items, work / "reasoner", steps=reasoner_steps, val_items=val, threads=1,
                  label="reasoner", log=lambda m: _log(f"reasoner: {m}"), on_step=on_step, **COMMON, seed=seed)
        reasoner_done.set()
        job.join()
    finally:
        if job.is_alive():
            job.terminate()
    if job.exitcode != 0:
        raise SystemExit(f"the extractor's training failed (exit code {job.exitcode})")
    # Each part is written beside the shipped one and swapped in by one rename: an interrupted run leaves
    # the shipped demo whole.
    for name in ("extractor", "reasoner"):
        with atomic_directory(out / name, overwrite=True) as tmp:
            shutil.copytree(work / name, tmp, dirs_exist_ok=True)
            _to_fp16(tmp)
    with atomic_directory(out / "test", overwrite=True) as tmp:
        _ship_test_set(work / "test", tmp)
    _ship_example(work / "test", out)
    _log(f"done in {(time.perf_counter() - t0) / 60:.1f} min; score it with: edgevlm eval --preset demo")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m edgevlm.demo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="Train the demo extractor and reasoner from scratch and install them.")
    p.add_argument("--out", type=Path, default=demo.DEMO_DIR, help="Where the models and test split go.")
    p.add_argument("--work", type=Path, default=None, help="Scratch folder for data (default: a temp dir).")
    p.add_argument("--seed", type=int, default=demo.SEED)
    p.add_argument("--extractor-steps", type=int, default=EXTRACTOR_STEPS)
    p.add_argument("--reasoner-steps", type=int, default=REASONER_STEPS)
    p.add_argument("--vision-steps", type=int, default=demo.VISION_STEPS)
    p.add_argument("--copy-steps", type=int, default=demo.COPY_STEPS, help="At most, for copy pretraining.")
    p.add_argument("--scenes", default=",".join(map(str, demo.SCENES.values())), metavar="TRAIN,VAL,TEST",
                   help="How many scenes per split (about 7.5 questions each).")
    args = parser.parse_args()
    try:
        scenes = dict(zip(demo.SCENES, map(int, args.scenes.split(",")), strict=True))
    except ValueError:
        parser.error(f"--scenes takes three counts, TRAIN,VAL,TEST; got {args.scenes!r}")
    if min(args.extractor_steps - 1, args.reasoner_steps, args.vision_steps, args.copy_steps) < 1:
        parser.error("the extractor needs at least 2 steps (whole scenes, then relevant details), the others 1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        for name in ("extractor", "reasoner", "test"):  # now, not after the training: it replaces only its own
            check_output(args.out / name, overwrite=True)
        args.out.mkdir(parents=True, exist_ok=True)
        with sigterm_as_interrupt():  # a terminated run cleans its partial output up, as Ctrl-C does
            if args.work:
                args.work.mkdir(parents=True, exist_ok=True)
                train(args.out, args.work, args.seed, args.extractor_steps, args.reasoner_steps, args.vision_steps,
                      args.copy_steps, scenes)
            else:
                with tempfile.TemporaryDirectory(prefix="edgevlm-demo-") as work:
                    train(args.out, Path(work), args.seed, args.extractor_steps, args.reasoner_steps,
                          args.vision_steps, args.copy_steps, scenes)
    except EdgeVLMError as e:
        parser.exit(e.exit_code, f"edgevlm: error: {e}\n")  # one line, as `edgevlm` gives it


if __name__ == "__main__":
    main()
