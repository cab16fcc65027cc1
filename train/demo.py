"""The demo models' recipe: a small extractor and reasoner trained with the paper's method on procedural
scenes (edgevlm.train.scenes), shipped inside the runtime package (edgevlm.demo) so `--preset demo`
works offline.

Rebuild them from scratch (fixed seed; about 20 minutes on 2 CPU cores on a fast day, see README.md):

    python -m edgevlm.demo train    (or: python -m edgevlm.train.demo train)

That writes scene data, builds the two models from configs (the paper's architectures, shrunk: a
SigLIP tower + projector + Qwen3 extractor, a Qwen3 reasoner with built look-back heads, sharing a
tokenizer trained on the scenes' language), pretrains the extractor's tower to see the scenes and the
reasoner to copy, tunes the extractor (visual extraction tuning: image + perception prompt ->
description, tower frozen) and the reasoner (plan; description + question -> reasoning + answer) with
edgevlm.train.tune, and replaces the shipped weights. The held-out test split (`test/`) is what
`edgevlm eval --preset demo` scores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgevlm.bundle import atomic_directory, atomic_file, check_output
from edgevlm.demo import DEMO_DIR, EXAMPLE, EXAMPLE_LABEL, EXTRACTOR, REASONER, TEST_SET, available  # noqa: F401
from edgevlm.errors import EdgeVLMError
from edgevlm.signals import sigterm_as_interrupt

# The paper's extractor architecture (LLaVA-OneVision: SigLIP + 2-layer MLP projector + Qwen3), shrunk. One
# patch per cell of the scenes' 3x3 grid (126 px views, 42 px patches): the tower learns each cell's facts in a
# minute (16 px patches straddle cells, and reached 0.80-0.94 per label in four).
VISION = dict(model_type="siglip_vision_model", hidden_size=128, intermediate_size=256, num_hidden_layers=3,
              num_attention_heads=4, image_size=126, patch_size=42, vision_use_head=False)
PINPOINTS = [[126, 126]]
TEXT = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=48, max_position_embeddings=1024)
VOCAB = 1024
SEED = 0
SCENES = {"train": 3000, "val": 40, "test": 80}  # about 7.5 questions each
VISION_STEPS = 400
WHOLE_SCENE_STEPS = 1 / 3  # the share of the extractor's steps on whole scenes alone, before relevant details
WHOLE_SCENE_WEIGHT = 3  # then copies of each image's whole-scene example in its data (about a quarter)


def corpus(items: list[dict]) -> list[str]:
    """The scenes' language, for the demo tokenizer."""
    return [t for i in items for t in (i["description"], i["question"], i.get("reasoning") or "",
                                       i.get("instruction") or "", " ".join(i.get("choices") or []))]


def make_data(work: Path, seed: int = SEED, counts: dict[str, int] = SCENES, log=print) -> dict[str, Path]:
    """Train, validation and test scene sets (disjoint seeds) under `work`."""
    from edgevlm.train import scenes

    sets = {}
    for offset, (split, n) in enumerate(counts.items(), 1):
        log(f"scenes: {split} ({n} images)")
        sets[split] = scenes.make_set(work / split, n, seed=seed * 10 + offset, split=split) / "items.jsonl"
    return sets


def make_base_models(work: Path, items: list[dict], seed: int = SEED) -> tuple[Path, Path]:
    """The untrained extractor and reasoner, from configs, with a tokenizer trained on `items`' language."""
    from edgevlm.train import tiny

    texts = corpus(items)
    # written like every edgevlm output (with its marker), so the steps after may save over them
    with atomic_directory(work / "extractor-init", overwrite=True) as tmp:
        tiny._make_llava_onevision(tmp, seed, tok=tiny.build_tokenizer(VOCAB, texts), vision=VISION,
                                      text_extra=TEXT, pinpoints=PINPOINTS)
    with atomic_directory(work / "reasoner-init", overwrite=True) as tmp:
        tiny._make_qwen3(tmp, seed, tok=tiny.build_tokenizer(VOCAB, texts), text_extra=TEXT)
    _with_previous_token_head(work / "reasoner-init")
    return work / "extractor-init", work / "reasoner-init"


# ---------------------------------------------------------------- a copying prior
# The reasoner's answers copy from its prompt: the word a sign says, the colour the description gives, the
# shapes it lists. Pretrained models do this with induction heads (a head that finds the earlier occurrence
# of the current token and copies what followed it), which need a previous-token head below them. From
# scratch, a 4-layer model of this size did not form one in our step budget: repeating a random sequence
# was 13% right after 1750 steps. With layer 0's first head built to attend to the previous token, it is 93%
# right after 350-800 (the induction head forms abruptly). A second head looks two tokens back: the
# reasoning's verdicts ("a red circle at the top left: red, yes") judge the word or two just behind them. The
# extractor, which reads its facts from image features, got nothing from the prior (24 of 80
# validation extractions exact with it, 30 without), so it has none.
PREVIOUS_TOKEN_PAIRS = 6  # the highest RoPE frequencies, which together peak at one position back
PREVIOUS_TOKEN_GAIN = 3.5  # q/k-norm gain on them: ~8 logits between the previous token and its neighbours
COPY_STEPS = 2000  # at most, for copy pretraining (it stops once the model copies: after 550-800 steps)
LOOKBACK = (1, 2)  # the built heads' offsets (1, 2, 3, 4 scored the same: 199 against 203 of 303 on gold)


def previous_token_head(model, offsets: tuple[int, ...] = LOOKBACK) -> None:
    """Make the first attention heads of a Qwen3 text model's layer 0 attend to the token `offsets[h]`
    positions before each token (head h; the default: one back, then two back).

    Every token embedding gets a constant first coordinate; the heads' queries and keys read only it, so they
    are the same vector at every position, and RoPE turns their dot product into a function of distance.
    Head h's query is that vector turned back by `offsets[h]` positions' angle, so its score peaks at that
    distance. Their value and output projections stay random: what the heads carry forward is for training
    to use. Heads share keys in groups (grouped-query attention), so built heads fill whole groups."""
    import torch

    text = model.model
    config = text.config
    dim, half = config.head_dim, config.head_dim // 2
    group = config.num_attention_heads // config.num_key_value_heads
    if len(offsets) % group or len(offsets) > config.num_attention_heads:
        raise ValueError(f"{len(offsets)} built heads do not fill whole key-value groups of {group}")
    pairs = torch.arange(PREVIOUS_TOKEN_PAIRS)
    angle = 1.0 / config.rope_parameters["rope_theta"] ** (2 * pairs.float() / dim)  # per position
    attention = text.layers[0].self_attn
    with torch.no_grad():
        embeddings = text.embed_tokens.weight
        embeddings[:, 0] = 8 * embeddings[:, 1:].pow(2).mean().sqrt()
        for kv in range(len(offsets) // group):
            key = attention.k_proj.weight[kv * dim:(kv + 1) * dim]
            key.zero_()
            key[pairs, 0] = 1.0
        for head, offset in enumerate(offsets):
            query = attention.q_proj.weight[head * dim:(head + 1) * dim]
            query.zero_()
            query[pairs, 0], query[pairs + half, 0] = (offset * angle).cos(), -(offset * angle).sin()
        for norm in (attention.q_norm, attention.k_norm):
            norm.weight[pairs] = norm.weight[pairs + half] = PREVIOUS_TOKEN_GAIN


def pretrain_copying(model_dir: Path, *, max_steps: int = COPY_STEPS, target: float = 0.9, batch_size: int = 32,
                     lr: float = 1e-3, seed: int = SEED, log=print) -> float:
    """Train a language model with a previous-token head to repeat random token sequences until it copies
    (held-out accuracy `target`, checked every 50 steps) or `max_steps`; saved in place. Returns that accuracy.

    Tuned on the scenes after it (with the colour-filtered descriptions of an earlier recipe), the demo reasoner
    reached validation token accuracy 0.907 in 100 steps and 0.981 in 600; without it, 0.793 and 0.929 after 800."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgevlm.train import loop
    from edgevlm.train.tune import _token_accuracy

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    vocab = model.get_output_embeddings().weight.shape[0]
    rng = np.random.default_rng(seed)

    def batch(rows, length):  # ids 4.. (past the special tokens), each row twice; the loss on the repeat
        half = torch.from_numpy(rng.integers(4, vocab, size=(rows, length)))
        ids = torch.cat([half, half], 1)
        labels = ids.clone()
        labels[:, :length] = -100
        return ids, labels

    held_out = batch(64, 24)

    def accuracy():
        model.eval()
        with torch.no_grad():
            correct, total = _token_accuracy(model(input_ids=held_out[0]).logits, held_out[1])
        model.train()
        return correct / total

    torch.manual_seed(seed)
    model.train()
    params = list(model.parameters())
    optimizer = loop.adamw(params, lr)
    score = 0.0

    def loss_of(step):  # a random length per step, drawn before the batch
        ids, labels = batch(batch_size, int(rng.integers(8, 33)))
        return model(input_ids=ids, labels=labels).loss

    def after(done, loss):  # every 50 steps: the held-out accuracy; stop once it reaches the target
        nonlocal score
        if done % 50 == 0:
            score = accuracy()
            log(f"copy pretraining {done}/{max_steps}: loss {loss:.3f}, held-out copy accuracy {score:.3f}")
            return score >= target

    loop.run(params, optimizer, loss_of, loop.Schedule(lr, max_steps, warmup=30, decay=None), out=model_dir,
             check_gradients=False, name="copy pretraining step", on_step=after)
    model.save_pretrained(model_dir)
    return score


def _with_previous_token_head(model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    previous_token_head(model)
    model.save_pretrained(model_dir)


# ---------------------------------------------------------------- vision pretraining
# The paper's extractor starts from a pretrained SigLIP tower; ours starts from scratch, so before visual
# extraction tuning the tower and projector learn to see the scenes. Every patch token of the base view
# learns to say what its cell holds (shape, colour, size, text) and which cell it is in: the facts sit in
# the tokens where they are drawn, with a plain code of the place, so the language model finds the cell a
# sentence names by attending to tokens that say that place, as it would with a pretrained SigLIP's local
# features. (Heads on all tokens at once spread the facts over the image, and the language model learned
# to ignore it; pooled per-cell heads left the place implicit and it read the wrong cells half the time.)
def _label_groups():
    """(name, slots, classes): per-cell groups have 9 slots in reading order."""
    from edgevlm.train import scenes

    return [("kind", 9, 1 + len(scenes.SHAPES)), ("color", 9, 1 + len(scenes.COLORS)), ("size", 9, 3),
            ("text", 9, 1 + len(scenes.TEXTS)), ("background", 1, len(scenes.BACKGROUNDS))]


def scene_labels(scene: dict) -> list[int]:
    """Class indices for every (group, slot) of _label_groups, from a scene graph (scenes.Scene as a dict)."""
    from edgevlm.train import scenes

    kind, color, size, text = [0] * 9, [0] * 9, [0] * 9, [0] * 9
    for s in scene["shapes"]:
        cell = s["row"] * 3 + s["col"]
        kind[cell] = 1 + scenes.SHAPES.index(s["kind"])
        color[cell] = 1 + list(scenes.COLORS).index(s["color"])
        size[cell] = 2 if s["big"] else 1
    if scene["text"]:
        text[scene["text_cell"][0] * 3 + scene["text_cell"][1]] = 1 + scenes.TEXTS.index(scene["text"])
    return kind + color + size + text + [list(scenes.BACKGROUNDS).index(scene["background"])]


def cell_of_patch(side: int) -> np.ndarray:
    """[side*side]: the cell (0-8, reading order) of the 3x3 grid in which each patch's centre falls, for the
    base view (the whole image, squashed to a square)."""
    cell = np.minimum(((np.arange(side) + 0.5) / side * 3).astype(int), 2)
    return (cell[:, None] * 3 + cell[None, :]).reshape(-1)


def pretrain_vision(extractor_dir: Path, items: list[dict], *, steps: int = VISION_STEPS, batch_size: int = 32,
                    lr: float = 2e-3, seed: int = SEED, log=print) -> dict:
    """Train the extractor's vision tower and projector on scene labels; saves them in place. Returns the
    held-out accuracy per label group (per patch, for the cell groups and the patch's own cell)."""
    import torch
    from PIL import Image
    from transformers import LlavaOnevisionForConditionalGeneration

    from edgevlm.export import llava_onevision
    from edgevlm.train import loop
    from edgevlm.train.tune import save_model

    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(extractor_dir, dtype=torch.float32)
    processor = llava_onevision.load_hf_processor(extractor_dir).image_processor
    scenes_by_image = {str(i["image"]): i["scene"] for i in items}
    paths = sorted(scenes_by_image)
    pixels, labels = [], []
    for n, path in enumerate(paths, 1):
        with Image.open(path) as im:
            pixels.append(processor(images=im.convert("RGB"), return_tensors="pt")["pixel_values"][0])
        labels.append(scene_labels(scenes_by_image[path]))
        if n % 1000 == 0:
            log(f"vision pretraining: preprocessed {n}/{len(paths)} images")
    pixels, labels = torch.stack(pixels), torch.tensor(labels)
    groups = [*_label_groups(), ("cell", 0, 9)]
    tower, projector = model.model.vision_tower, model.model.multi_modal_projector
    side = VISION["image_size"] // VISION["patch_size"]
    cell = torch.from_numpy(cell_of_patch(side))

    def features(batch):  # [b, views, 3, h, w] -> the base view's patch tokens [b, side*side, d]
        hidden = tower(batch.flatten(0, 1), output_hidden_states=True).hidden_states[-1]
        return projector(hidden).reshape(batch.shape[0], batch.shape[1], side * side, -1)[:, 0]

    width = model.config.text_config.hidden_size
    heads = torch.nn.ModuleDict({name: torch.nn.Linear(width, n_classes) for name, _, n_classes in groups})
    params = [*tower.parameters(), *projector.parameters(), *heads.parameters()]
    optimizer = loop.adamw(params, lr, betas=(0.9, 0.999))
    n_val = max(1, len(paths) // 20)
    train_idx = np.arange(n_val, len(paths))
    rng = np.random.default_rng(seed)

    def loss_and_hits(idx):
        tokens = features(pixels[idx])
        loss, hits, at = 0.0, {}, 0
        for name, slots, _ in groups:
            if name == "cell":
                logits, target = heads[name](tokens), cell.expand(len(idx), -1)
            elif slots == 9:  # every patch names its cell's content
                logits, target = heads[name](tokens), labels[idx, at:at + slots][:, cell]
            else:
                logits, target = heads[name](tokens.mean(1, keepdim=True)), labels[idx, at:at + slots]
            loss = loss + torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
            hits[name] = (logits.argmax(-1) == target).float().mean().item()
            at += slots
        return loss / len(groups), hits

    def after(done, loss):
        if done % 50 == 0:
            log(f"vision pretraining {done}/{steps}: loss {loss:.4f}")

    loop.run(params, optimizer, lambda step: loss_and_hits(torch.as_tensor(rng.choice(train_idx, batch_size)))[0],
             loop.Schedule(lr, steps, warmup=30, decay="linear"), out=extractor_dir, clip=None,
             name="vision pretraining step", on_step=after)
    with torch.no_grad():
        _, hits = loss_and_hits(torch.arange(n_val))
    accuracy = {name: round(v, 4) for name, v in hits.items()}
    log(f"vision pretraining: held-out accuracy {accuracy}")
    save_model(model.eval(), Path(extractor_dir), Path(extractor_dir))
    return accuracy


def slot_items(items: list[dict]) -> list[dict]:
    """The items with their question-relevant descriptions as nine slots (scenes.describe(slots=True)), the
    form both demo models use: the extractor writes every cell in reading order and "-" where the instruction
    does not ask (a small model leaves the right sentences out far less reliably: 0 of 80 validation
    extractions exact), and the reasoner reads that."""
    from edgevlm.train import scenes

    return [{**i, "description": scenes.describe(scenes.from_dict(i["scene"]), i["cells"], slots=True)}
            if "scene" in i and "cells" in i else i for i in items]


def whole_scene_items(items: list[dict]) -> list[dict]:
    """One item per image whose target is the whole scene, every cell in reading order, under the generic
    instruction. Mixed into the extractor's data: describing every cell makes it read the image (on
    question-relevant targets alone, a few short sentences, it learned to write a plausible prior instead),
    and picking out the relevant cells is then a filter over what it already sees."""
    from edgevlm import prompts
    from edgevlm.train import scenes

    seen, out = set(), []
    for item in items:
        if item["image"] in seen or "scene" not in item:
            continue
        seen.add(item["image"])
        out.append({**item, "instruction": prompts.FALLBACK_INSTRUCTION,
                    "description": scenes.describe(scenes.from_dict(item["scene"]))})
    return out


def two_threads_once(other_done, log, other: str):
    """An on_step hook for tune: once `other_done()` (the model training beside this one has finished), go
    on with two threads."""
    import torch

    def on_step(step):
        if torch.get_num_threads() < 2 and other_done():
            torch.set_num_threads(2)
            log(f"{other} is done: going on with two threads")

    return on_step


def train_extractor(extractor: Path, sets: dict, out: Path, steps: int, vision_steps: int, seed: int, threads: int,
                    options: dict, cores_free=None) -> None:
    """Vision pretraining, then visual extraction tuning with the tower and projector frozen (runs in its own
    process beside the reasoner's). Tuned with them, the extractor stopped reading the image: it wrote one
    plausible shape into every occupied cell. When `cores_free` (an Event) is set, it goes on with two threads;
    when the process that started it is gone, it stops."""
    import torch

    from edgevlm.evaluation import load_items
    from edgevlm.train import tune

    torch.set_num_threads(threads)
    items, val = slot_items(load_items(sets["train"])), slot_items(load_items(sets["val"]))

    def log(message):
        print(f"[{time.strftime('%H:%M:%S')}] extractor: {message}", file=sys.stderr, flush=True)

    parent = os.getppid()
    more_threads = two_threads_once(lambda: cores_free is not None and cores_free.is_set(), log, "the reasoner")

    def on_step(step):
        if os.getppid() != parent:  # the process that started this one was killed: do not train on as an orphan
            raise SystemExit("the demo's training process is gone; the extractor stops too")
        more_threads(step)

    options = {**options, "freeze_vision": True, "on_step": on_step}

    log("pretraining the vision tower on the scene labels")
    pretrain_vision(extractor, items, steps=vision_steps, seed=seed, log=log)
    # Curriculum: whole scenes first (the model learns to read every cell of the image), then the
    # question-relevant slots with whole scenes mixed in (it learns which cells an instruction wants).
    whole = whole_scene_items(items)
    first = max(1, min(steps - 1, int(steps * WHOLE_SCENE_STEPS)))
    log(f"visual extraction tuning, whole scenes ({first} steps)")
    tune.tune(extractor, whole, out.with_name(out.name + "-whole"), steps=first, val_items=whole_scene_items(val),
              label="extractor", log=log, **options, seed=seed)
    log(f"visual extraction tuning, question-relevant details ({steps - first} steps)")
    tune.tune(out.with_name(out.name + "-whole"), items + WHOLE_SCENE_WEIGHT * whole, out, steps=steps - first,
              val_items=val, label="extractor", log=log, **options, seed=seed)


# ---------------------------------------------------------------- python -m edgevlm.demo train
USAGE = "Rebuild the shipped demo models: python -m edgevlm.demo train [--out DIR] [--seed 0]"
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
    with atomic_file(out / EXAMPLE.name) as tmp:
        shutil.copy2(test / item["image"], tmp)
    with atomic_file(out / EXAMPLE_LABEL.name) as tmp:
        tmp.write_text(json.dumps({"question": item["question"], "answer": item["answer"]}) + "\n")


def train(out: Path, work: Path, seed: int, extractor_steps: int, reasoner_steps: int, vision_steps: int,
          copy_steps: int, scenes: dict[str, int]) -> None:
    import multiprocessing

    import torch

    from edgevlm.evaluation import load_items
    from edgevlm.train import tune

    t0 = time.perf_counter()
    sets = make_data(work, seed=seed, counts=scenes, log=_log)
    items, val = slot_items(load_items(sets["train"])), slot_items(load_items(sets["val"]))
    extractor, reasoner = make_base_models(work, items + whole_scene_items(items), seed=seed)
    _log(f"{len(items)} training questions on {scenes['train']} scenes")
    # The two models train at once, one core each (small models use two threads poorly); the one that
    # finishes first hands its core to the other.
    context = multiprocessing.get_context("spawn")
    reasoner_done = context.Event()
    job = context.Process(
        target=train_extractor,
        args=(extractor, sets, work / "extractor", extractor_steps, vision_steps, seed, 1, COMMON, reasoner_done))
    job.start()
    on_step = two_threads_once(lambda: not job.is_alive(), lambda m: _log(f"reasoner: {m}"), "the extractor")

    try:
        torch.set_num_threads(1)
        pretrain_copying(reasoner, max_steps=copy_steps, seed=seed, log=lambda m: _log(f"reasoner: {m}"))
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
    parser = argparse.ArgumentParser(prog="python -m edgevlm.demo", description=USAGE)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="Train the demo extractor and reasoner from scratch and install them.")
    p.add_argument("--out", type=Path, default=DEMO_DIR, help="Where the models and test split go.")
    p.add_argument("--work", type=Path, default=None, help="Scratch folder for data (default: a temp dir).")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--extractor-steps", type=int, default=EXTRACTOR_STEPS)
    p.add_argument("--reasoner-steps", type=int, default=REASONER_STEPS)
    p.add_argument("--vision-steps", type=int, default=VISION_STEPS)
    p.add_argument("--copy-steps", type=int, default=COPY_STEPS, help="At most, for copy pretraining.")
    p.add_argument("--scenes", default=",".join(map(str, SCENES.values())), metavar="TRAIN,VAL,TEST",
                   help="How many scenes per split (about 7.5 questions each).")
    args = parser.parse_args()
    try:
        scenes = dict(zip(SCENES, map(int, args.scenes.split(",")), strict=True))
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
