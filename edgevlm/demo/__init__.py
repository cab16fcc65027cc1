"""The demo models' files: a small extractor and reasoner trained on procedural scenes, shipped inside the
package so `--preset demo` works offline, with their held-out test split and the README's example.

How they are made (the recipe; needs torch) is edgevlm.train.demo; rebuild them with

    python -m edgevlm.demo train
"""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).parent
EXTRACTOR = DEMO_DIR / "extractor"
REASONER = DEMO_DIR / "reasoner"
TEST_SET = DEMO_DIR / "test"
EXAMPLE = DEMO_DIR / "example.png"  # the README's example image (from the test split) ...
EXAMPLE_LABEL = DEMO_DIR / "example.json"  # ... its question and the scene graph's answer


def available() -> bool:
    return (EXTRACTOR / "config.json").exists() and (REASONER / "config.json").exists()
