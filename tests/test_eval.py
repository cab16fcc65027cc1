"""edgevlm eval: answer matching, per-type accuracy, several systems and modes side by side, bad input."""

import json

import pytest
from test_cli import assert_one_line_error, edgevlm

from edgevlm import evaluation
from edgevlm.errors import UsageError
from edgevlm.train import scenes


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


def _items_file(folder, lines):
    path = folder / "items.jsonl"
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def test_an_item_whose_image_cannot_be_read_is_scored_wrong_and_the_run_goes_on(pipelines, scene_set, tmp_path,
                                                                                  capsys):
    good = next(i for i in evaluation.load_items(scene_set) if not i.get("choices"))
    cut = tmp_path / "cut.png"
    cut.write_bytes(good["image"].read_bytes()[:200])  # a truncated PNG
    item = {"question": good["question"], "answer": good["answer"], "type": good["type"]}
    path = _items_file(tmp_path, [{**item, "image": str(good["image"])}, "", {**item, "image": "cut.png"},
                                  {**item, "image": str(good["image"])}])
    items = evaluation.load_items(path)
    result = evaluation.evaluate(pipelines("llava_onevision"), items, mode="direct", label="tiny", max_new_tokens=2)
    assert result["n"] == 3 and [i["_line"] for i in items] == [1, 3, 4]
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "scored wrong" in ln]
    assert len(lines) == 1
    assert lines[0].startswith("tiny direct: line 3: ") and "cut.png is corrupt or truncated" in lines[0]


GOOD = {"image": "a.png", "question": "Which?", "choices": ["x", "y", "z", "w"], "answer": "B", "type": "t"}


@pytest.mark.parametrize("line, problem", [
    ("{not json", "not valid JSON (Expecting property name enclosed in double quotes at column 2)"),
    ("[1, 2]", "not a JSON object but an array"),
    ({"question": "q", "answer": "a"}, '"image" is missing'),
    ({"image": "a.png", "answer": "a"}, '"question" is missing'),
    ({"image": "a.png", "question": "q"}, '"answer" is missing'),
    ({"image": "a.png", "question": 5, "answer": "a"}, '"question" must be a string, not a number: put it in quotes'),
    ({"image": "a.png", "question": "  ", "answer": "a"}, '"question" is empty'),
    ({"image": ["a.png"], "question": "q", "answer": "a"}, '"image" must be a string, not an array'),
    ({**GOOD, "choices": "x, y"}, '"choices" must be a list of strings, not a string'),
    ({**GOOD, "choices": ["x", 2]}, '"choices" must hold strings only'),
    ({**GOOD, "choices": [str(i) for i in range(27)]}, '"choices" has 27 options; at most 26 are supported'),
    ({**GOOD, "type": 7}, '"type" must be a string, not a number'),
    ({**GOOD, "answer": "E"}, "\"answer\" 'E' is not the letter of one of the 4 choices (A-D)"),
    ({**GOOD, "answer": "x"}, "\"answer\" 'x' is not the letter of one of the 4 choices (A-D)"),
])
def test_every_line_is_checked_before_the_run(tmp_path, line, problem):
    (tmp_path / "a.png").write_bytes(b"")  # never read: the check is of the lines
    path = _items_file(tmp_path, [GOOD, line, GOOD])
    with pytest.raises(UsageError) as e:
        evaluation.load_items(path)
    assert str(e.value) == f"{path}:2: {problem}"


def test_eval_refuses_a_malformed_line_past_the_limit_before_loading_models(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    path = _items_file(tmp_path, [GOOD, GOOD, {**GOOD, "answer": ["A"]}])
    # --limit 1 scores one item, but every line is checked first; no model is loaded (--preset demo would be)
    assert_one_line_error(edgevlm("eval", "--data", path, "--preset", "demo", "--limit", "1"), 2,
                          f"{path}:3: \"answer\" must be a string")


def test_compare_scores_each_system_in_each_mode(tiny_bundle, scene_set):
    from edgevlm.loading import Source

    items = evaluation.load_items(scene_set)[:2]
    source = Source(bundle=str(tiny_bundle))
    results = evaluation.compare([source], items, modes=["direct"], progress=False, max_new_tokens=2)
    assert list(results) == [source.label()] and list(results[source.label()]) == ["direct"]
    assert results[source.label()]["direct"]["n"] == 2
    assert source.label() in evaluation.report(results)


@pytest.mark.parametrize("modes, needle", [(["extract"], "unknown mode 'extract'"), ([], "no mode to score"),
                                           (["direct"], "the seed must be at least 0")])
def test_compare_checks_modes_and_options_before_loading_anything(tmp_path, modes, needle):
    from edgevlm.loading import Source

    missing = [Source(bundle=str(tmp_path / "none"))]  # loading it would be a BundleError
    with pytest.raises(UsageError, match=needle):
        evaluation.compare(missing, [], modes=modes, seed=-1)


def test_eval_constrained_scores_free_and_constrained_side_by_side(tiny_bundle, scene_set):
    proc = edgevlm("eval", "--data", scene_set, "--bundle", tiny_bundle, "--modes", "direct", "--limit", "6",
                   "--constrained", "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    (modes,) = json.loads(proc.stdout)["results"].values()
    assert set(modes) == {"direct free", "direct constrained"}
    assert all(r["n"] == 6 for r in modes.values())


def test_constrained_answers_stay_in_their_types_answer_set(pipelines, scene_set):
    from edgevlm.evaluation import answer_sets, load_items

    items = load_items(scene_set)[:6]
    sets = answer_sets(items)
    assert sets and all(a == sorted(set(a)) for a in sets.values())
    pipe = pipelines("llava_onevision")
    for item in items:
        kind = str(item.get("type") or "untyped")
        r = pipe(item["image"], item["question"], choices=item.get("choices") or None, mode="direct",
                 max_new_tokens=24, temperature=1.0, **({} if item.get("choices") else {"one_of": sets[kind]}))
        if r.stages["direct"].stop_reason == "constraint":
            continue
        allowed = [chr(65 + i) for i in range(len(item["choices"]))] if item.get("choices") else sets[kind]
        assert r.answer in allowed, (item["question"], r.answer)
