"""Accuracy on a set of (image, question, choices, answer) items, per mode and per question type.

    edgevlm eval --data items.jsonl --bundle A --bundle B --modes direct,extract-think [--json]

A set is a JSONL file, image paths relative to it:

    {"image": "images/003.png", "question": "How many red shapes are there?",
     "choices": ["1", "2", "3", "4"], "answer": "B", "type": "count"}

Multiple-choice answers are letters (compared case-insensitively); open answers are compared after
normalisation (case, surrounding punctuation and quotes, hyphens and repeated spaces). An item whose prompt
does not fit a model's context (say a description too long for the reasoner) is scored wrong, with a line
on stderr, and the run goes on.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

from edgevlm.errors import InputTooLongError, UsageError


def load_items(path: str | Path) -> list[dict]:
    """The items of a JSONL file, image paths made absolute; a one-line error for anything malformed."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path} not found")
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            if not str(item["question"]).strip() or "answer" not in item:
                raise KeyError("question/answer")
        except (ValueError, KeyError, TypeError) as e:
            raise UsageError(f"{path} line {n}: not an item with image, question and answer ({e})") from None
        if item.get("image"):
            item["image"] = path.parent / item["image"]
            if not item["image"].is_file():
                raise UsageError(f"{path} line {n}: image {item['image']} not found")
        items.append(item)
    if not items:
        raise UsageError(f"{path} has no items")
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


def evaluate(pipe, items: list[dict], *, mode: str, label: str = "", progress: bool = True, **options) -> dict:
    """Run every item through `pipe` in `mode` and summarize the answers' correctness."""
    records = []
    for n, item in enumerate(items, 1):
        if item.get("image") is None:
            raise UsageError(f"item {n} has no image")
        kind = str(item.get("type") or "untyped")
        try:
            result = pipe(item["image"], str(item["question"]), choices=item.get("choices") or None, mode=mode,
                          **options)
        except InputTooLongError as e:  # e.g. a runaway description the reasoner cannot read: no answer
            sys.stderr.write(f"{label} {mode}: item {n}: {e}; scored wrong\n")
            records.append((kind, False))
        else:
            records.append((kind, is_correct(result.answer, item["answer"], result.multiple_choice)))
        if progress and (sys.stderr.isatty() or n % 50 == 0 or n == len(items)):
            accuracy = sum(hit for _, hit in records) / n
            end = "\n" if n == len(items) or not sys.stderr.isatty() else ""
            sys.stderr.write(f"\r{label} {mode}: {n}/{len(items)}, accuracy {accuracy:.3f}".ljust(78) + end)
            sys.stderr.flush()
    return summarize(records)


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
