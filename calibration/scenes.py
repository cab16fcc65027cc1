"""Procedural scenes: coloured shapes and text at known places, with questions whose answers and
question-relevant descriptions come from the scene graph. Seeded and reproducible.

They feed calibration and fidelity measurement (the three stages need an image, a question, an
instruction and a description), and are the seed of the demo models' training data.

    python -m edgevlm.calibration.scenes --out DIR --n 24 --seed 0
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 210), "yellow": (235, 200, 30),
    "purple": (130, 60, 180), "orange": (240, 130, 30), "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (245, 245, 240), "gray": (190, 190, 190), "beige": (230, 220, 190)}
WORDS = ("STOP", "EXIT", "CUP", "OPEN", "BOX", "GATE", "LEFT", "DOOR")


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


def place(row: int, col: int) -> str:
    vertical, horizontal = ("top", "middle", "bottom")[row], ("left", "center", "right")[col]
    if (row, col) == (1, 1):
        return "center"
    return horizontal if row == 1 else vertical if col == 1 else f"{vertical} {horizontal}"


def random_scene(rng: np.random.Generator, size: tuple[int, int] = (384, 288)) -> Scene:
    cells = [(r, c) for r in range(3) for c in range(3)]
    n = int(rng.integers(2, 7))
    picked = [cells[i] for i in rng.choice(len(cells), size=n, replace=False)]
    shapes = [Shape(str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), r, c, bool(rng.random() < 0.5))
              for r, c in picked]
    scene = Scene(size=size, background=str(rng.choice(list(BACKGROUNDS))), shapes=shapes)
    if rng.random() < 0.6:
        free = [cell for cell in cells if cell not in picked]  # at most 6 of 9 cells hold shapes
        scene.text = f"{rng.choice(WORDS)} {int(rng.integers(1, 10))}"
        scene.text_cell = free[int(rng.integers(len(free)))]
    return scene


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
                  font_size=int(ch * 0.3))
    return image


def _name(s: Shape) -> str:
    return f"{'large' if s.big else 'small'} {s.color} {s.kind}"


def describe(scene: Scene, focus: str | None = None) -> str:
    """A fine-grained description from the scene graph; `focus` (a colour or shape) is described first."""
    shapes = sorted(scene.shapes, key=lambda s: (focus not in (s.color, s.kind), s.row, s.col))
    parts = [f"The image shows {len(shapes)} shapes on a {scene.background} background."]
    parts += [f"There is a {_name(s)} at the {place(s.row, s.col)}." for s in shapes]
    if scene.text:
        parts.append(f'The text "{scene.text}" is written in black at the {place(*scene.text_cell)}.')
    else:
        parts.append("There is no text in the image.")
    return " ".join(parts)


def _letters(options: list[str], answer: str) -> tuple[list[str], str]:
    return options, "ABCDEFGH"[options.index(answer)]


def questions(scene: Scene, rng: np.random.Generator) -> list[dict]:
    """Questions of several types with their instruction (what to observe) and answer."""
    out = []
    color = str(rng.choice([s.color for s in scene.shapes]))
    count = sum(s.color == color for s in scene.shapes)
    opts = sorted({count, count + 1, max(count - 1, 0), count + 2})
    choices, letter = _letters([str(o) for o in opts], str(count))
    out.append({"type": "count", "question": f"How many {color} shapes are there?", "choices": choices,
                "answer": letter, "instruction": f"the number of {color} shapes in the image"})
    s = scene.shapes[int(rng.integers(len(scene.shapes)))]
    others = [c for c in COLORS if c != s.color]
    opts = [s.color] + [str(c) for c in rng.choice(others, size=3, replace=False)]
    rng.shuffle(opts)
    choices, letter = _letters(opts, s.color)
    out.append({"type": "color", "question": f"What color is the {s.kind} at the {place(s.row, s.col)}?",
                "choices": choices, "answer": letter,
                "instruction": "the colors of the shapes and their positions in the image"})
    out.append({"type": "position", "question": f"Where is the {s.color} {s.kind}?", "choices": None,
                "answer": place(s.row, s.col), "instruction": f"the positions of the {s.color} shapes"})
    if scene.text:
        out.append({"type": "text", "question": "What does the text in the image say?", "choices": None,
                    "answer": scene.text, "instruction": "the text written in the image"})
    total = len(scene.shapes)
    out.append({"type": "arithmetic", "question": "If two more shapes were added, how many shapes would there be?",
                "choices": None, "answer": str(total + 2), "instruction": "the number of shapes in the image"})
    return out


def make_set(out: str | Path, n: int, seed: int = 0, eval_fraction: float = 0.34) -> Path:
    """Write n scenes (images/NNN.png) and items.jsonl (one line per question) into `out`."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        scene = random_scene(rng)
        name = f"images/{i:03d}.png"
        render(scene).save(out / name, optimize=True)
        split = "eval" if i >= n * (1 - eval_fraction) else "calib"
        for q in questions(scene, rng):
            focus = next((w for w in (*COLORS, *SHAPES) if w in q["question"]), None)
            lines.append({"image": name, "split": split, "description": describe(scene, focus), **q})
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
