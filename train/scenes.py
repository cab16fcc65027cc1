"""Procedural scenes: coloured shapes and text in the cells of a 3x3 grid, with questions of several types
whose answers, instructions, descriptions (the question-relevant cells, in reading order: what an
extractor following the instruction reports; `cells` lists them) and step-by-step reasoning come from
the scene graph. Seeded and reproducible.

They feed calibration and fidelity measurement (the three stages need an image, a question, an
instruction and a description), and are the seed of the demo models' training data.

    python -m edgevlm.train.scenes --out DIR --n 24 --seed 0
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 210), "yellow": (235, 200, 30),
    "purple": (130, 60, 180), "orange": (240, 130, 30), "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (245, 245, 240), "gray": (190, 190, 190), "beige": (230, 220, 190)}
# What a scene's text says: a short word or a digit, drawn large enough to read at 128 px.
TEXTS = ("STOP", "EXIT", "CUP", "OPEN", "BOX", "GATE", "DOOR", "MILK", "2", "3", "4", "5", "6", "7", "8", "9")


@dataclass
class Shape:
    kind: str
    color: str
    row: int  # 0 top, 1 middle, 2 bottom
    col: int  # 0 left, 1 centre, 2 right
    big: bool


@dataclass
class Scene:
    size: tuple[int, int]  # width, height
    background: str
    shapes: list[Shape] = field(default_factory=list)
    text: str | None = None
    text_cell: tuple[int, int] = (0, 1)  # row, col of a cell no shape occupies


ROWS, COLUMNS = ("top", "middle", "bottom"), ("left", "center", "right")


def place(row: int, col: int) -> str:
    """A cell's name: row, then column ("top left", "middle right", "bottom center"), and "center".

    Every cell but the center has a two-word name that says its row and its column. With one-word names for
    the middle row and column ("left", "top"), the demo extractor told to describe "the shape at the left"
    often wrote it at the center, the right or the bottom left: 9 of its 15 misses in 303 validation
    extractions were "the shape at the left" or "at the right"; with these names it missed 5."""
    if (row, col) == (1, 1):
        return "center"
    return f"{ROWS[row]} {COLUMNS[col]}"


def random_scene(rng: np.random.Generator, size: tuple[int, int] = (384, 288)) -> Scene:
    cells = [(r, c) for r in range(3) for c in range(3)]
    n = int(rng.integers(2, 7))
    picked = [cells[i] for i in rng.choice(len(cells), size=n, replace=False)]
    shapes = [Shape(str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), r, c, bool(rng.random() < 0.5))
              for r, c in picked]
    scene = Scene(size=size, background=str(rng.choice(list(BACKGROUNDS))), shapes=shapes)
    if rng.random() < 0.6:
        free = [cell for cell in cells if cell not in picked]  # at most 6 of 9 cells hold shapes
        scene.text = str(rng.choice(TEXTS))
        scene.text_cell = free[int(rng.integers(len(free)))]
    return scene


def from_dict(d: dict) -> Scene:
    """A Scene from its asdict() form (the `scene` field of an item)."""
    return Scene(size=tuple(d["size"]), background=d["background"], shapes=[Shape(**s) for s in d["shapes"]],
                 text=d.get("text"), text_cell=tuple(d.get("text_cell", (0, 1))))


def render(scene: Scene) -> Image.Image:
    w, h = scene.size
    image = Image.new("RGB", scene.size, BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    cw, ch = w / 3, h / 3
    for s in scene.shapes:
        cx, cy = (s.col + 0.5) * cw, (s.row + 0.5) * ch
        r = min(cw, ch) * (0.38 if s.big else 0.22)
        box = [cx - r, cy - r, cx + r, cy + r]
        if s.kind == "circle":
            draw.ellipse(box, fill=COLORS[s.color])
        elif s.kind == "square":
            draw.rectangle(box, fill=COLORS[s.color])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[s.color])
    if scene.text:
        row, col = scene.text_cell
        draw.text(((col + 0.5) * cw, (row + 0.5) * ch), scene.text, fill=(0, 0, 0), anchor="mm",
                  font_size=int(ch * 0.5), stroke_width=2, stroke_fill=(0, 0, 0))
    return image


def _name(s: Shape) -> str:
    return f"{'large' if s.big else 'small'} {s.color} {s.kind}"


def _cells(scene: Scene, sizes: bool = True) -> dict[tuple[int, int], str]:
    cells = {(s.row, s.col): _a(_name(s) if sizes else f"{s.color} {s.kind}") for s in scene.shapes}
    if scene.text:
        cells[tuple(scene.text_cell)] = f'the text "{scene.text}"'
    return cells


SKIPPED = "-"  # a cell the instruction does not ask about, in slot descriptions


def _sentence(what: str, row: int, col: int) -> str:
    return f"{what[0].upper()}{what[1:]} at the {place(row, col)}."


def describe(scene: Scene, only: list[tuple[int, int]] | None = None, slots: bool = False) -> str:
    """A description from the scene graph, one sentence per cell in reading order, what is there first and
    then where, named as questions name places ("A small red square at the bottom left."). By default the
    background and all nine cells (empty ones as "nothing"); with `only`, just those cells: the
    question-relevant details an instruction asks for. `slots` keeps all nine sentences with `only` and
    writes the others as SKIPPED ("- at the top left."): every cell has its place in the text, which a
    small extractor learns far more easily than which sentences to leave out. (The demo models scored about
    the same with the place written first.)"""
    cells = _cells(scene, sizes=only is None)  # no question asks about sizes: only a whole scene has them
    if only is None:
        parts = [f"The background is {scene.background}."]
        parts += [_sentence(cells.get((r, c), "nothing"), r, c) for r in range(3) for c in range(3)]
        return " ".join(parts)
    wanted = {tuple(cell) for cell in only}
    if slots:
        return " ".join(_sentence(cells[(r, c)] if (r, c) in wanted else SKIPPED, r, c)
                        for r in range(3) for c in range(3))
    return " ".join(_sentence(cells[(r, c)], r, c) for r, c in sorted(wanted))


def _at(shapes: list[Shape]) -> list[tuple[int, int]]:
    return [(s.row, s.col) for s in shapes]


def _letters(options: list[str], answer: str) -> tuple[list[str], str]:
    return options, "ABCDEFGH"[options.index(answer)]


def _count_choices(count: int, rng: np.random.Generator) -> list[str]:
    low = int(rng.integers(max(count - 3, 0), count + 1))  # the true count sits anywhere among four options
    return [str(n) for n in range(low, low + 4)]


def _a(words: str) -> str:
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def _entry(s: Shape) -> str:
    return f"{_a(f'{s.color} {s.kind}')} at the {place(s.row, s.col)}"


def _in_order(shapes: list[Shape]) -> list[Shape]:
    return sorted(shapes, key=lambda s: (s.row, s.col))  # the description's order (reading order)


def _listing(shapes: list[Shape]) -> str:
    return "; ".join(_entry(s) for s in _in_order(shapes)) or "none"


# Reasoning goes through the description in order, one shape at a time, with a verdict on each, instead
# of looking a shape up among six: a small model copies the next item of a list reliably (the demo
# reasoner lists all the shapes right 39 times in 40), but finding the red ones, or the place of one
# named shape, by attention alone it got right a third of the time. Each step restates what the verdict
# is about just before it ("a red circle at the top: red, yes"), so the verdict compares the token or two
# right behind it with what the question asks for; counts run along the list, so the total is the last one
# written.
def _count_scan(shapes: list[Shape], colors: list[str]) -> str:
    """Every shape, its color, the verdict (yes or no; with two colors, the one it counts for) and the counts."""
    counts, steps = dict.fromkeys(colors, 0), []
    for s in _in_order(shapes):
        verdict = "no"
        if s.color in counts:
            counts[s.color] += 1
            verdict = "yes" if len(colors) == 1 else s.color
        steps.append(f"{_entry(s)}: {s.color}, {verdict}, {' and '.join(str(counts[c]) for c in colors)}")
    total = " and ".join(f"{counts[c]} {c} shape{'' if counts[c] == 1 else 's'}" for c in colors)
    return (f"Counting the {' and the '.join(colors)} shapes in the description: {'; '.join(steps) or 'none'}. "
            f"That makes {total}.")


def _find_scan(shapes: list[Shape], wanted: Shape, column: bool = False, against: str | None = None) -> str:
    """The shapes in order until the wanted one, each with its color and a verdict on that, then its kind and
    a verdict on that: one word compared at a time (judging both at once, the demo reasoner often matched the
    kind alone). With `column`, the wanted one's column after its verdicts; with `against`, the column it is
    to be compared with, carried over from an earlier scan so that it sits in this one's header."""
    steps = []
    for s in _in_order(shapes):
        found = s == wanted
        steps.append(f"{_entry(s)}: {s.color}, {'yes' if s.color == wanted.color else 'no'}, "
                     f"{s.kind}, {'yes' if s.kind == wanted.kind else 'no'}"
                     + (f", the {COLUMNS[s.col]} column" if found and column else ""))
        if found:
            break
    compare = f", to compare with the {against} column" if against else ""
    return f"Looking for the {wanted.color} {wanted.kind}{compare}: {'; '.join(steps)}."


def _order(a: int, b: int) -> str:
    """Column a against column b, in words the question's side can be matched against ("left of")."""
    return "left of" if a < b else "right of" if a > b else "the same as"


def _option_scan(options: list[str], answer: str) -> str:
    """The options in order until the answer's, each with a verdict: the letter is then just behind."""
    steps = []
    for letter, option in zip("ABCDEFGH", options, strict=False):
        steps.append(f"{letter}: {option}, {'yes' if option == answer else 'no'}")
        if option == answer:
            break
    return f"The options: {'; '.join(steps)}. So the answer is {answer}, option {letter}."


# Instructions name what to observe, over all the objects, the way the paper's planner examples do ("What is
# the value of the smallest bar?" -> "the heights of all bars and their values"): selecting the red shapes, or
# the one red circle, is the reasoner's work, on text. An extractor filtering the image by an instruction's
# colour word ("the red shapes") was what the demo extractor could not learn: 0 of 11 counts exact.
COLORS_OF_ALL = "the colors of all the shapes"
OPTIONS = 0.5  # the share of count and color questions asked with lettered options (the rest are open)
POSITIONS_OF_ALL = "the positions of all the shapes"


def questions(scene: Scene, rng: np.random.Generator) -> list[dict]:
    """Questions of several types, each with its instruction (what to observe, from the question alone),
    its description (the question-relevant details of the image: what an extractor following that
    instruction writes), its answer (a letter for multiple choice) and `reasoning`: the step-by-step
    reasoning from the description to the answer.

    Perception: count, color, shape, position, text. Reasoning over the extracted facts: arithmetic
    (on counts), compare (two counts), relation (two positions).
    """
    out = []

    def add(kind, question, answer, instruction, cells, reasoning, choices=None):
        letter = answer
        if choices is not None:
            choices, letter = _letters(choices, answer)
            reasoning += " " + _option_scan(choices, answer)
        out.append({"type": kind, "question": question, "choices": choices, "answer": letter,
                    "instruction": instruction, "description": describe(scene, cells),
                    "cells": sorted(set(cells)), "reasoning": reasoning})

    color = str(rng.choice([s.color for s in scene.shapes] + [str(rng.choice(list(COLORS)))]))
    same = [s for s in scene.shapes if s.color == color]
    add("count", f"How many {color} shapes are there?", str(len(same)), COLORS_OF_ALL, _at(scene.shapes),
        _count_scan(scene.shapes, [color]), _count_choices(len(same), rng) if rng.random() < OPTIONS else None)

    s = scene.shapes[int(rng.integers(len(scene.shapes)))]
    where = place(s.row, s.col)
    opts = [s.color] + [str(c) for c in rng.choice([c for c in COLORS if c != s.color], size=3, replace=False)]
    rng.shuffle(opts)
    add("color", f"What color is the {s.kind} at the {where}?", s.color, f"the shape at the {where}", _at([s]),
        f"The description has {_entry(s)}. Its color is {s.color}.", opts if rng.random() < OPTIONS else None)

    s = scene.shapes[int(rng.integers(len(scene.shapes)))]
    where = place(s.row, s.col)
    add("shape", f"What shape is at the {where}?", s.kind, f"the shape at the {where}", _at([s]),
        f"The description has {_entry(s)}. The shape is a {s.kind}.")

    unique = [s for s in scene.shapes if sum((t.color, t.kind) == (s.color, s.kind) for t in scene.shapes) == 1]
    if unique:
        s = unique[int(rng.integers(len(unique)))]
        add("position", f"Where is the {s.color} {s.kind}?", place(s.row, s.col), POSITIONS_OF_ALL, _at(scene.shapes),
            f"{_find_scan(scene.shapes, s)} So the {s.color} {s.kind} is at the {place(s.row, s.col)}.")

    if scene.text:
        add("text", "What does the text in the image say?", scene.text, "the text written in the image",
            [tuple(scene.text_cell)], f'The description has the text "{scene.text}" at the {place(*scene.text_cell)}.')

    total, extra = len(scene.shapes), int(rng.integers(1, 4))
    more = {1: "one more shape was", 2: "two more shapes were", 3: "three more shapes were"}[extra]
    add("arithmetic", f"If {more} added, how many shapes would there be?", str(total + extra),
        "all the shapes in the image", _at(scene.shapes),
        f"The shapes in the description: {_listing(scene.shapes)}. That makes {total} shapes. "
        f"{total} + {extra} = {total + extra}.")

    a, b = (str(c) for c in rng.choice(list(COLORS), size=2, replace=False))
    na, nb = (sum(s.color == c for s in scene.shapes) for c in (a, b))
    add("compare", f"Are there more {a} shapes than {b} shapes?", "yes" if na > nb else "no",
        COLORS_OF_ALL, _at(scene.shapes),
        f"{_count_scan(scene.shapes, [a, b])} {na} is {'more' if na > nb else 'not more'} than {nb}.")

    if len(unique) >= 2:
        i, j = rng.choice(len(unique), size=2, replace=False)
        s, t = unique[int(i)], unique[int(j)]
        side = "left" if rng.random() < 0.5 else "right"
        yes = _order(s.col, t.col) == f"{side} of"
        add("relation", f"Is the {s.color} {s.kind} to the {side} of the {t.color} {t.kind}?", "yes" if yes else "no",
            POSITIONS_OF_ALL, _at(scene.shapes),
            f"{_find_scan(scene.shapes, s, column=True)} "
            f"{_find_scan(scene.shapes, t, column=True, against=COLUMNS[s.col])} "
            f"So the {COLUMNS[s.col]} column is {_order(s.col, t.col)} the {COLUMNS[t.col]} column, and the question "
            f"asks about the {side}: {'yes' if yes else 'no'}. "
            f"So the {s.color} {s.kind} is {'' if yes else 'not '}to the {side} of the {t.color} {t.kind}.")
    return out


def make_set(out: str | Path, n: int, seed: int = 0, eval_fraction: float = 0.34, split: str | None = None,
             progress=None) -> Path:
    """Write n scenes (images/NNN.png) and items.jsonl (one line per question) into `out`.

    Items are split into "calib" and "eval" by `eval_fraction`, or all get `split` when given."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        scene = random_scene(rng)
        name = f"images/{i:03d}.png" if n <= 1000 else f"images/{i:04d}.png"
        render(scene).save(out / name, optimize=True)
        item_split = split or ("eval" if i >= n * (1 - eval_fraction) else "calib")
        for q in questions(scene, rng):
            lines.append({"image": name, "split": item_split, **q, "scene": asdict(scene)})
        if progress:
            progress(i + 1, n)
    (out / "items.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a procedural scene set (images + items.jsonl).")
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_set(args.out, args.n, args.seed))


if __name__ == "__main__":
    main()
