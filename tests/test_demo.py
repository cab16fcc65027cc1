"""`python -m edgevlm.demo train` end to end at toy size: data, vision pretraining, both models tuned at once
(two processes), installed atomically with their test split, then scored by `edgevlm eval`."""

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from test_cli import ENV, assert_one_line_error, edgevlm

from edgevlm import demo
from edgevlm.calibration import scenes

pytest.importorskip("torch")


def test_scene_labels_name_every_cell():
    shapes = [scenes.Shape("square", "red", 0, 0, True), scenes.Shape("circle", "blue", 2, 1, False)]
    scene = scenes.Scene(size=(384, 288), background="gray", text="7", text_cell=(1, 2), shapes=shapes)
    labels = demo.scene_labels(asdict(scene))
    kind, color, size = labels[:9], labels[9:18], labels[18:27]
    assert kind == [2, 0, 0, 0, 0, 0, 0, 1, 0] and size == [2, 0, 0, 0, 0, 0, 0, 1, 0]
    assert color[0] == 1 + list(scenes.COLORS).index("red") and color[7] == 1 + list(scenes.COLORS).index("blue")
    assert labels[27:] == [1 + scenes.TEXTS.index("7"), 5, list(scenes.BACKGROUNDS).index("gray")]
    assert len(labels) == sum(count for _, count, _ in demo._label_groups())


def test_demo_train_builds_installs_and_scores(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "edgevlm.demo", "train", "--out", out, "--work", tmp_path / "work",
                           "--scenes", "6,2,2", "--vision-steps", "2", "--extractor-steps", "2",
                           "--reasoner-steps", "2"], capture_output=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert "extractor: visual extraction tuning" in proc.stderr.decode()
    for name in ("extractor", "reasoner"):
        assert (out / name / "config.json").exists() and (out / name / "model.safetensors").exists()
    items = [json.loads(line) for line in (out / "test" / "items.jsonl").read_text().splitlines()]
    assert items and set(items[0]) == {"image", "question", "choices", "answer", "type"}
    assert all((out / "test" / i["image"]).exists() for i in items)
    proc = edgevlm("eval", "--data", out / "test" / "items.jsonl", "--extractor", out / "extractor", "--reasoner",
                   out / "reasoner", "--modes", "extract-think,direct", "--limit", "2", "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    (result,) = json.loads(proc.stdout)["results"].values()
    assert result["extract-think"]["n"] == 2 and result["direct"]["n"] == 2


def test_the_demo_preset_says_how_to_build_it_when_absent():
    if demo.available():
        pytest.skip("this checkout has the demo models")
    image = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"
    assert_one_line_error(edgevlm("run", image, "What is shown?", "--preset", "demo"), 1,
                          "python -m edgevlm.demo train")
