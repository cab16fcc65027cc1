"""Calibration sets: images with questions, read from a shipped set or a user's folder.

A set is a folder holding `items.jsonl` (one JSON object per line) and the images it names:

    {"image": "images/003.png", "question": "How many red shapes are there?",
     "choices": ["1", "2", "3"],                       # optional: multiple choice
     "instruction": "the number of red shapes",        # optional: what the extractor should attend to
     "description": "A red circle at the top left...", # optional: a reference description for the think stage
     "split": "calib"}                                 # optional: "calib" (for quantizers) or "eval" (fidelity)

Items without a split are assigned one deterministically (every third one to "eval"). Items without
an instruction use a generic one; items without a description are described by the reference
extractor when the fidelity is measured.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgevlm import prompts
from edgevlm.errors import UsageError

SETS_DIR = Path(__file__).parent / "sets"
DEFAULT_SET = "scenes"
ITEMS = "items.jsonl"


@dataclass(frozen=True)
class Item:
    image: Path
    question: str
    choices: tuple[str, ...] | None
    instruction: str
    description: str | None
    split: str


def available() -> list[str]:
    return sorted(p.name for p in SETS_DIR.iterdir() if (p / ITEMS).exists()) if SETS_DIR.exists() else []


def load(name_or_dir: str | Path = DEFAULT_SET) -> list[Item]:
    """The items of a shipped set (by name) or of a folder with items.jsonl; one-line errors for bad input."""
    folder = Path(name_or_dir)
    if not (folder / ITEMS).exists():
        if (SETS_DIR / str(name_or_dir) / ITEMS).exists():
            folder = SETS_DIR / str(name_or_dir)
        else:
            raise UsageError(f"calibration set {name_or_dir!r} not found: give a folder with {ITEMS} "
                             f"or one of: {', '.join(available())}")
    items = []
    for n, line in enumerate((folder / ITEMS).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            image = folder / raw["image"]
            question = str(raw["question"]).strip()
        except (ValueError, KeyError, TypeError) as e:
            raise UsageError(f"{folder / ITEMS} line {n}: not an item with image and question ({e})") from None
        if not image.is_file():
            raise UsageError(f"{folder / ITEMS} line {n}: image {raw['image']} not found")
        if not question:
            raise UsageError(f"{folder / ITEMS} line {n}: the question is empty")
        split = raw.get("split") or ("eval" if len(items) % 3 == 2 else "calib")
        choices = tuple(raw["choices"]) if raw.get("choices") else None
        items.append(Item(image, question, choices, raw.get("instruction") or prompts.FALLBACK_INSTRUCTION,
                          raw.get("description"), split))
    if not items:
        raise UsageError(f"{folder / ITEMS} has no items")
    return items


def split(items: list[Item]) -> tuple[list[Item], list[Item]]:
    """(calibration items, held-out evaluation items); a set with no eval items is used for both."""
    calib = [i for i in items if i.split != "eval"]
    held = [i for i in items if i.split == "eval"]
    return calib or held, held or calib
