"""edgevlm eval: answer matching, per-type accuracy, several systems and modes side by side, bad input."""

import json

import pytest
from test_cli import assert_one_line_error, edgevlm

from edgevlm import evaluation
from edgevlm.calibration import scenes


def test_answer_matching():
    assert evaluation.is_correct("B", "b", multiple_choice=True)
    assert not evaluation.is_correct("", "B", multiple_choice=True)
    assert not evaluation.is_correct("C", "B", multiple_choice=True)
    assert evaluation.is_correct(" Top-left.", "top left", multiple_choice=False)
    assert evaluation.is_correct('"STOP 7"', "STOP 7", multiple_choice=False)
    assert not evaluation.is_correct("7 shapes", "7", multiple_choice=False)


def test_accuracy_is_counted_per_type():
    result = evaluation.summarize([("count", True), ("color", True), ("color", False)])
    assert result == {"accuracy": round(2 / 3, 4), "n": 3, "per_type": {"color": {"accuracy": 0.5, "n": 2},
                                                                         "count": {"accuracy": 1.0, "n": 1}}}
    assert "66.7" in evaluation.report({"s": {"direct": result}})


@pytest.fixture(scope="module")
def scene_set(tmp_path_factory):
    return scenes.make_set(tmp_path_factory.mktemp("eval"), 2, seed=3, split="test") / "items.jsonl"


def test_eval_scores_bundles_and_modes_side_by_side(tiny_bundle, scene_set):
    proc = edgevlm("eval", "--data", scene_set, "--bundle", tiny_bundle, "--modes", "direct,extract-think",
                   "--limit", "3", "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    doc = json.loads(proc.stdout)
    (system,) = doc["results"]
    modes = doc["results"][system]
    assert set(modes) == {"direct", "extract-think"}
    for result in modes.values():
        assert result["n"] == 3 and 0 <= result["accuracy"] <= 1
        assert sum(t["n"] for t in result["per_type"].values()) == 3


def test_an_item_whose_prompt_does_not_fit_is_scored_wrong_and_the_run_goes_on(pipelines, scene_set, capsys):
    from edgevlm.evaluation import load_items

    pipe = pipelines("llava_onevision")
    items = load_items(scene_set)[:2]
    context = pipe.reasoner.max_context
    pipe.reasoner.max_context = 60  # the think prompt (role, description, question) is longer
    try:
        result = evaluation.evaluate(pipe, items, mode="extract-think", label="tiny", max_new_tokens=4,
                                     think_budget=4, instruction="the shapes")
    finally:
        pipe.reasoner.max_context = context
    assert result["n"] == 2 and result["accuracy"] == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "scored wrong" in ln]
    assert len(lines) == 2 and "the think prompt is" in lines[0] and "the description" in lines[0]


def test_eval_bad_input_is_one_line(tiny_bundle, tmp_path, scene_set):
    assert_one_line_error(edgevlm("eval", "--bundle", tiny_bundle), 2, "--data")
    assert_one_line_error(edgevlm("eval", "--data", tmp_path / "none.jsonl", "--bundle", tiny_bundle), 2, "not found")
    assert_one_line_error(edgevlm("eval", "--data", scene_set, "--bundle", tiny_bundle, "--modes", "guess"), 2,
                          "guess")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"image": "missing.png", "question": "q", "answer": "a"}\n')
    assert_one_line_error(edgevlm("eval", "--data", broken, "--bundle", tiny_bundle), 2, "missing.png")
