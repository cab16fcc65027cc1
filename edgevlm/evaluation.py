"""Accuracy on a set of (image, question, choices, answer) items, per mode and per question type.

    edgevlm eval --data items.jsonl --bundle A --bundle B --modes direct,extract-think [--json]

A set is a JSONL file, image paths relative to it:

    {"image": "images/003.png", "question": "How many red shapes are there?",
     "choices": ["1", "2", "3", "4"], "answer": "B", "type": "count"}

Multiple-choice answers are letters (compared case-insensitively); open answers are compared after
normalisation (case, surrounding punctuation and quotes, hyphens and repeated spaces). Every line is checked
before the run starts (edgevlm.calibration.data.item_problem): a malformed one is a usage error naming FILE:LINE.
An item whose image cannot be read, or whose prompt does not fit a model's context (say a description too long
for the reasoner), is scored wrong, with a line on stderr naming it, and the run goes on.
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path

from edgevlm import loading
from edgevlm.calibration.data import read_items
from edgevlm.errors import ImageError, InputTooLongError, UsageError
from edgevlm.loading import Source
from edgevlm.options import Options

MODES = ("extract-think", "direct")  # the modes that answer (extract stops at a description)


def load_items(path: str | Path, *, image: bool = True) -> list[dict]:
    """The items of a JSONL file (eval's and tune's), every line checked first, image paths made absolute; a
    one-line UsageError naming FILE:LINE for anything malformed. `_line` holds each item's line number.
    `image=False`: items may be text alone (a reasoner's tuning data)."""
    path = Path(path)
    items = []
    for n, item in read_items(path, image=image):
        if item.get("image") is not None:
            item["image"] = path.parent / item["image"]
            if not item["image"].is_file():
                raise UsageError(f"{path}:{n}: image {item['image']} not found")
        item["_line"] = n
        items.append(item)
    return items


def normalize(text: str) -> str:
    text = str(text).strip().lower().replace("-", " ")
    text = text.strip(" \t\n.,;:!?\"'`*")
    return re.sub(r"\s+", " ", text)


def is_correct(prediction: str, answer: str, multiple_choice: bool) -> bool:
    if multiple_choice:
        return prediction.strip().upper()[:1] == str(answer).strip().upper()[:1] and bool(prediction.strip())
    return normalize(prediction) == normalize(answer)


def summarize(records: list[tuple[str, bool]]) -> dict:
    """(question type, correct) pairs -> {"accuracy", "n", "per_type": {type: {"accuracy", "n"}}}."""
    per_type: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for kind, hit in records:
        per_type[kind][0] += bool(hit)
        per_type[kind][1] += 1
    correct = sum(c for c, _ in per_type.values())
    return {"accuracy": round(correct / max(len(records), 1), 4), "n": len(records),
            "per_type": {t: {"accuracy": round(c / k, 4), "n": k} for t, (c, k) in sorted(per_type.items())}}


def answer_sets(items: list[dict]) -> dict[str, list[str]]:
    """Each question type's open answers in `items` (what `--constrained` restricts an open answer to)."""
    found: dict[str, set[str]] = defaultdict(set)
    for item in items:
        if not item.get("choices"):
            found[str(item.get("type") or "untyped")].add(str(item["answer"]))
    return {kind: sorted(answers) for kind, answers in found.items()}


def evaluate(pipe, items: list[dict], *, mode: str, label: str = "", progress: bool = True,
             constrained: bool | None = None, **options) -> dict:
    """Run every item through `pipe` in `mode` and summarize the answers' correctness. `constrained`: True
    restricts each answer to its question type's answer set (multiple choice: the options' letters), False
    leaves every answer free (as in the paper), None keeps the pipeline's defaults."""
    records = []
    sets = answer_sets(items) if constrained else {}
    for n, item in enumerate(items, 1):
        if item.get("image") is None:
            raise UsageError(f"item {n} has no image")
        kind = str(item.get("type") or "untyped")
        constraint = {"constrain": False} if constrained is False else \
            {"one_of": sets[kind]} if constrained and not item.get("choices") else {}
        try:
            result = pipe(item["image"], str(item["question"]), choices=item.get("choices") or None, mode=mode,
                          **options, **constraint)
        except (ImageError, InputTooLongError) as e:  # an unreadable image, a runaway description: no answer
            where = f"line {item['_line']}" if "_line" in item else f"item {n}"
            sys.stderr.write(f"{label} {mode}: {where}: {e}; scored wrong\n")
            records.append((kind, False))
        else:
            records.append((kind, is_correct(result.answer, item["answer"], result.multiple_choice)))
        if progress and (sys.stderr.isatty() or n % 50 == 0 or n == len(items)):
            accuracy = sum(hit for _, hit in records) / n
            end = "\n" if n == len(items) or not sys.stderr.isatty() else ""
            sys.stderr.write(f"\r{label} {mode}: {n}/{len(items)}, accuracy {accuracy:.3f}".ljust(78) + end)
            sys.stderr.flush()
    return summarize(records)


def compare(sources: list[Source], items: list[dict], *, modes: list[str] | tuple[str, ...] = ("extract-think",),
            progress: bool = True, constrained: bool = False, **options) -> dict[str, dict[str, dict]]:
    """Score each system in `sources` (loaded one at a time) on `items` in each of `modes`, with the pipeline
    `options` (checked first): {system label: {mode: summary}}, as `report` prints it. `constrained`: each
    mode twice, side by side: "MODE free" (every answer free text) and "MODE constrained" (each answer
    restricted to its type's answer set)."""
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        problem = f"unknown mode {bad[0]!r}" if bad else "no mode to score"
        raise UsageError(f"{problem}; choose from: {', '.join(MODES)}")
    Options.of(options)

    runs = [(f"{m} {kind}", m, flag) for m in modes for kind, flag in (("free", False), ("constrained", True))] \
        if constrained else [(m, m, None) for m in modes]

    def score(source: Source, pipe) -> tuple[str, dict]:
        label = source.label()
        return label, {name: evaluate(pipe, items, mode=m, label=label, progress=progress, constrained=flag,
                                      **options) for name, m, flag in runs}

    return dict(loading.each(sources, score, load_reasoner="extract-think" in modes))


def report(results: dict[str, dict[str, dict]]) -> str:
    """One row per system and mode: overall accuracy, then each question type's."""
    types = sorted({t for modes in results.values() for r in modes.values() for t in r["per_type"]})
    header = ["system", "mode", "n", "accuracy", *types]
    rows = [[system, mode, str(r["n"]), f"{100 * r['accuracy']:.1f}",
             *(f"{100 * r['per_type'][t]['accuracy']:.1f}" if t in r["per_type"] else "-" for t in types)]
            for system, modes in results.items() for mode, r in modes.items()]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in [header, *rows]]
    return "\n".join(lines) + "\n(accuracy in %; per question type to the right)"
