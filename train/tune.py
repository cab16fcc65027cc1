"""Tuning: the paper's visual extraction tuning for the extractor, and reasoner tuning for plan + think.

    edgevlm tune --model DIR --data train.jsonl --out DIR [--steps N] [--lora R] [--resume]

The data is a JSONL file of items (paths relative to the file):

    {"image": "images/003.png", "question": "How many red shapes are there?", "choices": ["1", "2", "3"],
     "answer": "B", "instruction": "the number of red shapes",
     "description": "The image shows 4 shapes ...",                      # the extraction target
     "reasoning": "The red shapes in the description: ... That makes 2."} # optional, for the reasoner

An extractor (a VLM) learns (image, perception prompt with the instruction) -> description, the
recipe of PAPER.md, plus (image, question) -> answer for `direct` mode on a fraction of the steps. A
reasoner (a text LM) learns planner prompt -> "Contents to observe: <instruction>" and (description,
question) -> reasoning and "Answer:" in thinking mode, or the answer alone without thinking. Items with
no description are described by a `teacher` extractor first. The prompts are exactly those the runtime
renders (edgevlm.prompts and the model's chat template), so a tuned model works in `edgevlm run` as is.

Training is full fine-tuning, or LoRA (peft): merged into the weights when saved, or saved alone
(`adapter_only`: a few MB, merged into its base on first use by edgevlm.export.checkpoints.resolve);
`freeze_vision` keeps an extractor's tower and projector as they are. A checkpoint is kept
under OUT.partial/ every `save_every` steps; `resume=True` continues from it, with the same batches.
Needs torch and transformers (``pip install edgevlm[export]``).
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgevlm import prompts
from edgevlm.bundle import atomic_directory, atomic_file, check_output
from edgevlm.errors import EdgeVLMError, UsageError, first_line
from edgevlm.evaluation import load_items
from edgevlm.families import export_module, extractor_family, read_config, reasoner_family, vision_modules
from edgevlm.tokenizer import Prompt, Tokenizer
from edgevlm.train import loop

CHECKPOINT = "checkpoint.pt"
MAX_VAL = 160  # validation examples scored at each evaluation (a random sample of the held-out items')
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VISION_MODULES = vision_modules()  # every family's vision tower and projector: kept by freeze_vision


@dataclass(frozen=True)
class Example:
    prompt: Prompt  # the rendered chat prompt, ending where the model's answer starts
    target: Prompt  # what the model learns to write (its end-of-turn token is added)
    image: Path | None = None
    kind: str = ""  # extract, direct, plan, think, answer


def _question(item: dict) -> tuple[str, bool]:
    question = prompts.format_question(str(item["question"]), item.get("choices") or None)
    return question, bool(item.get("choices")) or prompts.is_multiple_choice(question)


def extractor_examples(model_dir: Path, items: list[dict], extra_fraction: float = 0.25) -> list[Example]:
    """(image, perception prompt) -> description for every item; (image, question) -> answer for an
    `extra_fraction` of them (so `direct` mode answers in the format the runtime parses)."""
    tok, family = Tokenizer(model_dir), extractor_family(model_dir)
    out = []
    for n, item in enumerate(items):
        if item.get("image") is None:
            continue
        instruction = item.get("instruction") or prompts.FALLBACK_INSTRUCTION
        out.append(Example(family.render(tok, prompts.extract_prompt(instruction), with_image=True),
                           Prompt.literal(item["description"]), item["image"], "extract"))
        if extra_fraction and n % round(1 / extra_fraction) == 0:
            question, mc = _question(item)
            out.append(Example(family.render(tok, prompts.direct_prompt(question, multiple_choice=mc), with_image=True),
                               Prompt.literal(str(item["answer"])), item["image"], "direct"))
    return out


def reasoner_examples(model_dir: Path, items: list[dict], extra_fraction: float = 0.25) -> list[Example]:
    """Per item: the reasoning + answer (thinking mode); for every other item the planner's instruction
    (a short mapping from a long prompt) and for an `extra_fraction` the answer alone (thinking off)."""
    tok, family = Tokenizer(model_dir), reasoner_family(model_dir)
    thinking = tok.token_id("</think>") is not None
    out = []
    for n, item in enumerate(items):
        question, mc = _question(item)
        if item.get("instruction") and n % 2 == 0:
            out.append(Example(family.render(tok, prompts.planner_prompt(question), enable_thinking=False),
                               Prompt.literal(f"{prompts.PLANNER_ANSWER_TAG} {item['instruction']}"), kind="plan"))
        answer = f"Answer: {item['answer']}"
        think = prompts.reasoner_prompt(item["description"], question, multiple_choice=mc, think=True)
        reasoning = item.get("reasoning") or ""
        if thinking:
            # <think> and </think> are the markers thinking mode writes; the reasoning between them is text
            target = (tok.markers("<think>\n") + Prompt.literal(reasoning) + tok.markers("\n</think>\n\n")
                      + Prompt.literal(answer))
            out.append(Example(family.render(tok, think, enable_thinking=True), target, kind="think"))
        else:
            out.append(Example(family.render(tok, think), Prompt.literal(f"{reasoning}\n{answer}".strip()),
                               kind="think"))
        if not extra_fraction or n % round(1 / extra_fraction):
            continue
        direct = prompts.reasoner_prompt(item["description"], question, multiple_choice=mc, think=False)
        out.append(Example(family.render(tok, direct, enable_thinking=False if thinking else None),
                           Prompt.literal(answer), kind="answer"))
    return out


def describe_with_teacher(items: list[dict], teacher: str) -> None:
    """Fill in missing descriptions with a teacher extractor (greedy, the item's instruction)."""
    from edgevlm.pipeline import Pipeline

    todo = [i for i in items if not i.get("description")]
    if not todo:
        return
    pipe = Pipeline.from_pretrained(extractor=teacher, load_reasoner=False, vision_cache_mb=0)
    for n, item in enumerate(todo, 1):
        instruction = item.get("instruction") or prompts.FALLBACK_INSTRUCTION
        item["description"] = pipe(item["image"], str(item["question"]), mode="extract", instruction=instruction,
                                   ).extraction
        _progress("describing", n, len(todo))
    _progress_done()


def _progress(what: str, n: int, total: int, extra: str = "") -> None:
    """A progress line that rewrites itself on a terminal; in a log, a line every 50."""
    if sys.stderr.isatty():
        sys.stderr.write(f"\r{what} {n}/{total} {extra}".ljust(78))
        sys.stderr.flush()
    elif n % 50 == 0 or n == total:
        sys.stderr.write(f"{what} {n}/{total} {extra}\n")


def _progress_done() -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\n")


class _Batcher:
    """Token ids (and pixels) of examples, built once each and padded into batches."""

    def __init__(self, model_dir: Path, vision: bool):
        self.tok = Tokenizer(model_dir)
        self.eos = self.tok.token_id("<|im_end|>")
        if self.eos is None:
            eos = sorted(self.tok.eos_token_ids(model_dir))
            if not eos:
                raise UsageError(f"{model_dir} defines no end-of-sequence token")
            self.eos = eos[0]
        pad = self.tok.special_tokens.get("pad_token")
        self.pad = (self.tok.token_id(pad) if pad else None) or 0
        self.processor = None
        if vision:

            self.processor = export_module(extractor_family(model_dir).name).load_hf_processor(model_dir)
        self._cache: dict = {}
        # An image's pixels, and a prompt's ids with its image tokens expanded (which depends on the image's
        # size alone), each made once: an image is asked about many times, an instruction about many images.
        self._pixels: dict = {}
        self._prompts: dict = {}

    def encode(self, ex: Example):
        key = (ex.prompt, ex.target, ex.image)
        if key not in self._cache:
            target = self.tok.encode_prompt(ex.target) + [self.eos]
            if ex.image is None:
                prompt, pixels = self.tok.encode_prompt(ex.prompt), None
            else:
                prompt, pixels = self._with_image(ex.prompt, ex.image)
            self._cache[key] = (prompt, target, pixels)
        return self._cache[key]

    def _with_image(self, text: Prompt, path: Path):
        from edgevlm.images import load_image

        if path in self._pixels and (text, self._pixels[path][1]) in self._prompts:
            pixels, size = self._pixels[path]
            return self._prompts[(text, size)], pixels
        image = load_image(path)  # as `run` reads it: upright, alpha on white, within the same limits
        from edgevlm.backends.torch_ref import hf_prepare

        ids, out = hf_prepare(self.processor, self.tok, text, image)
        pixels = {k: v[0] for k, v in out.items() if k not in ("input_ids", "attention_mask")}
        self._pixels[path] = (pixels, image.size)
        self._prompts[(text, image.size)] = ids
        return self._prompts[(text, image.size)], pixels

    def batch(self, examples: list[Example]) -> dict:
        import torch

        encoded = [self.encode(ex) for ex in examples]
        length = max(len(p) + len(t) for p, t, _ in encoded)
        ids = torch.full((len(encoded), length), self.pad, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for row, (prompt, target, _) in enumerate(encoded):
            seq = prompt + target
            ids[row, :len(seq)] = torch.tensor(seq)
            labels[row, len(prompt):len(seq)] = torch.tensor(target)
            mask[row, :len(seq)] = 1
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        pixels = [p for _, _, p in encoded if p is not None]
        if pixels:
            if len(pixels) != len(encoded):
                raise UsageError("a batch mixes examples with and without images")
            patches = max(p["pixel_values"].shape[0] for p in pixels)
            values = torch.zeros((len(pixels), patches, *pixels[0]["pixel_values"].shape[1:]))
            for row, p in enumerate(pixels):
                values[row, :p["pixel_values"].shape[0]] = p["pixel_values"]
            out["pixel_values"] = values
            for key in pixels[0]:
                if key != "pixel_values":
                    out[key] = torch.stack([p[key] for p in pixels])
        return out


def _token_accuracy(logits, labels) -> tuple[int, int]:
    predicted = logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    keep = target != -100
    return int(((predicted == target) & keep).sum()), int(keep.sum())


def _check_settings(**settings) -> None:
    """Whole numbers at least 1 (warmup 0) and a finite learning rate above 0; NaN passes `lr <= 0`."""
    for name, value in settings.items():
        least = 0 if name == "warmup" else 1
        if name == "lr":
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
                raise UsageError(f"the learning rate must be a finite number above 0, not {value!r}")
        elif isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise UsageError(f"{name.replace('_', ' ')} must be a whole number of at least {least}, not {value!r}")


def _load_checkpoint(path: Path) -> dict:
    """A checkpoint tune wrote: tensors and plain values only (weights_only), so a file planted in
    OUT.partial/ cannot run code when --resume loads it."""
    import pickle

    import torch

    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise EdgeVLMError(f"{path} holds objects other than tensors and numbers, which tune's checkpoints never "
                           "do, so it was not loaded; delete it and train without --resume") from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise EdgeVLMError(f"{path} is unreadable ({first_line(e)}); delete it and train without --resume") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "step", "steps", "batch_size"} <= state.keys():
        raise EdgeVLMError(f"{path} is not a checkpoint of edgevlm tune; delete it and train without --resume")
    return state


def tune(model_dir: str | Path, data: str | Path | list[dict], out: str | Path, *, steps: int = 1000,
         batch_size: int = 16, lr: float = 1e-3, warmup: int = 50, lora: int = 0, extra_fraction: float = 0.25,
         val_items: list[dict] | None = None, val_fraction: float = 0.05, eval_every: int = 200,
         save_every: int = 200, resume: bool = False, teacher: str | None = None, seed: int = 0,
         threads: int | None = None, adapter_only: bool = False, freeze_vision: bool = False, log=print,
         on_step=None, label: str = "tuning") -> dict:
    """Tune the model in `model_dir` on `data` and save it to `out` (atomically). Returns the validation scores.

    The role follows the model: a VLM is tuned as the extractor, a text LM as the reasoner (and planner).
    `extra_fraction` of the items also train the second format: direct answers for an extractor, answers
    without thinking for a reasoner. The result holds the last validation scores and `history`, the
    scores at every evaluation (the first one before any step). `on_step(step)` is called after each step.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from edgevlm.export.checkpoints import resolve

    _check_settings(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, eval_every=eval_every,
                    save_every=save_every)
    source, out = str(model_dir), Path(out)
    check_output(out, overwrite=True)  # now, not after the training: only a directory edgevlm wrote is replaced
    partial = out.parent / f"{out.name}.partial"
    if partial.exists() and not partial.is_dir():
        raise UsageError(f"{partial} is a file; tune keeps its checkpoint in that directory: move the file away")
    model_dir = resolve(source)  # a directory, hub id, .gguf file or adapter, like everywhere else
    vision = "vision_config" in read_config(model_dir)
    items = load_items(data, image=vision) if isinstance(data, (str, Path)) else list(data)
    if adapter_only and not lora:
        raise UsageError("--adapter-only saves a LoRA adapter: give its rank with --lora")
    if val_items is None:  # hold out whole images, so validation never sees a training image
        groups = sorted({str(i.get("image")) for i in items})
        order = np.random.default_rng(seed).permutation(len(groups))
        held = {groups[i] for i in order[:max(1, int(len(groups) * val_fraction))]} if len(groups) > 1 else set()
        val_items = [i for i in items if str(i.get("image")) in held]
        items = [i for i in items if str(i.get("image")) not in held]
    if teacher:
        describe_with_teacher(items + val_items, teacher)
    missing = [i for i in items + val_items if not i.get("description")]
    if missing:
        raise UsageError(f"{len(missing)} items have no description: add them, or pass a teacher extractor "
                         "(--teacher) to write them")

    def make(part):
        examples = extractor_examples if vision else reasoner_examples
        return examples(model_dir, part, extra_fraction)

    train, val = make(items), make(val_items)
    val = [val[i] for i in np.random.default_rng(seed).permutation(len(val))[:MAX_VAL]]
    if not train:
        raise UsageError("no training examples (an extractor needs items with images)")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    model = auto.from_pretrained(model_dir, dtype=torch.float32)
    if freeze_vision:  # an extractor's tower and projector stay as they are; its language model learns to read them
        for name, p in model.named_parameters():
            if set(name.split(".")) & set(VISION_MODULES):
                p.requires_grad_(False)
    if lora:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise UsageError("--lora needs peft: pip install peft==0.21.2") from None
        model = get_peft_model(model, LoraConfig(r=lora, lora_alpha=2 * lora, target_modules=LORA_TARGETS,
                                                 lora_dropout=0.0))
    model.train()
    batcher = _Batcher(model_dir, vision)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = loop.adamw(params, lr)
    start = 0
    # the whole run's batch order up front, so a resumed run sees exactly the batches it would have seen
    order = np.random.default_rng(seed + 1).integers(len(train), size=(steps, batch_size))
    if resume and (partial / CHECKPOINT).exists():
        state = _load_checkpoint(partial / CHECKPOINT)
        if state["steps"] != steps or state["batch_size"] != batch_size:
            raise UsageError(f"the checkpoint in {partial} was made with --steps {state['steps']} "
                             f"--batch-size {state['batch_size']}; resume with the same")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        log(f"resuming from step {start}/{steps}")

    def validate() -> dict:
        model.eval()
        correct = total = 0
        loss_sum = 0.0
        with torch.no_grad():
            for i in range(0, len(val), batch_size):
                batch = batcher.batch(val[i:i + batch_size])
                result = model(**batch)
                c, t = _token_accuracy(result.logits, batch["labels"])
                correct, total, loss_sum = correct + c, total + t, loss_sum + float(result.loss) * t
        model.train()
        return {"val_loss": round(loss_sum / max(total, 1), 4), "val_token_accuracy": round(correct / max(total, 1), 4)}

    history = [{"step": start, **validate()}] if val else []
    if history:
        log(json.dumps(history[0]))
    t0, losses = time.perf_counter(), []

    def after(done: int, loss: float) -> None:  # progress, validation, the checkpoint, then the caller's hook
        losses.append(loss)
        if done % 10 == 0 or done == steps:
            rate = (done - start) / (time.perf_counter() - t0)
            _progress(label, done, steps, f"loss {np.mean(losses[-10:]):.4f}  {rate:.2f} steps/s")
        if (val and done % eval_every == 0) or done == steps:
            history.append({"step": done, "train_loss": round(float(np.mean(losses[-50:])), 4),
                            **(validate() if val else {})})
            _progress_done()
            log(json.dumps(history[-1]))
        if done % save_every == 0 and done < steps:
            partial.mkdir(parents=True, exist_ok=True)
            with atomic_file(partial / CHECKPOINT) as tmp:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": done,
                            "steps": steps, "batch_size": batch_size}, tmp)
        if on_step:
            on_step(done)

    loop.run(params, optimizer, lambda step: model(**batcher.batch([train[i] for i in order[step]])).loss,
             loop.Schedule(lr, steps, warmup), out=out, start=start, on_step=after)  # cosine decay to a tenth
    if adapter_only:  # the adapter names its base as given (a local one by absolute path), not a cache dir
        local = Path(source).expanduser()
        model.peft_config["default"].base_model_name_or_path = str(local.resolve()) if local.exists() else source
        with atomic_directory(out, overwrite=True) as tmp:
            model.save_pretrained(tmp)
    else:
        save_model((model.merge_and_unload() if lora else model).eval(), model_dir, out)
    (partial / CHECKPOINT).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # OUT.partial/ goes if that emptied it: anything else there is not tune's
        partial.rmdir()
    return {**history[-1], "history": history}


def save_model(model, model_dir: Path, out: Path) -> None:
    """The tuned weights with the base model's tokenizer, processor and configs, written atomically."""
    with atomic_directory(out, overwrite=True) as tmp:
        for f in model_dir.iterdir():
            if f.is_file() and not f.name.endswith((".safetensors", ".bin")) and f.name not in (
                    "model.safetensors.index.json", "config.json"):
                shutil.copy2(f, tmp / f.name)
        model.save_pretrained(tmp)
