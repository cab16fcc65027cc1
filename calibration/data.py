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

The same line format, with an "answer" (a choice's letter, or the text), holds `edgevlm eval`'s and
`edgevlm tune`'s items; `read_items` checks every line of any of them before anything runs.
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
# Optional text an item may carry (null is the same as absent): its question type (eval), the extractor's
# instruction, a reference description, the reasoning tune teaches, the calibration split.
TEXT_FIELDS = ("type", "instruction", "description", "reasoning", "split")


@dataclass(frozen=True)
class Item:
    image: Path
    question: str
    choices: tuple[str, ...] | None
    instruction: str
    description: str | None
    split: str


def item_problem(raw: object, *, answer: bool = True, image: bool = True) -> str | None:
    """What is wrong with one parsed JSONL line as an item, in a few words; None if nothing. `answer`: one is
    required (eval, tune); calibration items need none, but one given is checked all the same. `image`: one is
    required (a reasoner's tuning data may be text alone). A number as the answer (a count) becomes its text."""
    if not isinstance(raw, dict):
        return f"not a JSON object but {_kind(raw)}"
    required = ("question",) + (("image",) if image else ()) + (("answer",) if answer else ())
    for key in required:
        if key not in raw:
            return f'"{key}" is missing'
    if isinstance(raw.get("answer"), (int, float)) and not isinstance(raw["answer"], bool):
        raw["answer"] = str(raw["answer"])
    for key in ("image", "question", "answer"):
        value = raw.get(key)
        if key == "image" and not image and value is None:
            continue
        if key in raw and not isinstance(value, str):
            quote = ": put it in quotes" if _kind(value) == "a number" else ""
            return f'"{key}" must be a string, not {_kind(value)}{quote}'
        if key in raw and not value.strip():
            return f'"{key}" is empty'
    choices = raw.get("choices")
    if choices is not None:
        if not isinstance(choices, list):
            return f'"choices" must be a list of strings, not {_kind(choices)}'
        if not all(isinstance(c, str) for c in choices):
            return '"choices" must hold strings only'
        if len(choices) > len(prompts.LETTERS):
            return f'"choices" has {len(choices)} options; at most {len(prompts.LETTERS)} are supported'
    for key in TEXT_FIELDS:
        if raw.get(key) is not None and not isinstance(raw[key], str):
            return f'"{key}" must be a string, not {_kind(raw[key])}'
    if choices and "answer" in raw:  # multiple choice: the answer is an option's letter
        letters = prompts.LETTERS[:len(choices)]
        letter = raw["answer"].strip().upper()
        if len(letter) != 1 or letter not in letters:
            span = letters if len(letters) == 1 else f"{letters[0]}-{letters[-1]}"
            return f'"answer" {raw["answer"][:40]!r} is not the letter of one of the {len(choices)} choices ({span})'
    return None


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "true/false"
    return {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
            type(None): "null"}.get(type(value), type(value).__name__)


def read_items(path: str | Path, *, answer: bool = True, image: bool = True) -> list[tuple[int, dict]]:
    """(line number, item) for every non-blank line of a JSONL file, each checked by item_problem: a bad line is a
    UsageError naming FILE:LINE and what is wrong, before anything runs."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (as some Windows editors write) is no error
    except (FileNotFoundError, IsADirectoryError):
        raise UsageError(f"{path} not found") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text (byte {e.start} cannot be decoded)") from None
    except OSError as e:
        raise UsageError(f"{path} cannot be read ({e.strerror or e})") from None
    items = []
    # "\n" only: str.splitlines() would also split at U+2028 and others, which JSON strings may hold as they are
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise UsageError(f"{path}:{n}: not valid JSON (nested too deeply)") from None
        problem = item_problem(raw, answer=answer, image=image)
        if problem:
            raise UsageError(f"{path}:{n}: {problem}")
        items.append((n, raw))
    if not items:
        raise UsageError(f"{path} has no items")
    return items


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
    for n, raw in read_items(folder / ITEMS, answer=False):
        image = folder / raw["image"]
        if not image.is_file():
            raise UsageError(f"{folder / ITEMS}:{n}: image {raw['image']} not found")
        split = raw.get("split") or ("eval" if len(items) % 3 == 2 else "calib")
        choices = tuple(raw["choices"]) if raw.get("choices") else None
        items.append(Item(image, raw["question"].strip(), choices,
                          raw.get("instruction") or prompts.FALLBACK_INSTRUCTION, raw.get("description"), split))
    return items


def split(items: list[Item]) -> tuple[list[Item], list[Item]]:
    """(calibration items, held-out evaluation items); a set with no eval items is used for both."""
    calib = [i for i in items if i.split != "eval"]
    held = [i for i in items if i.split == "eval"]
    return calib or held, held or calib
