"""The JSONL item format eval, tune and calibration sets share: one checker (calibration.data.item_problem), one
reader (read_items). Property-based: any line is either an item every consumer can use, or one UsageError
naming FILE:LINE."""

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgevlm import evaluation, prompts
from edgevlm.calibration import data
from edgevlm.errors import UsageError

FUZZ = settings(max_examples=int(os.environ.get("EDGEVLM_FUZZ_EXAMPLES", 200)), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=8)
# unicode of every kind, and the line separators str.splitlines() knows besides "\n", which JSON keeps raw
TEXT = st.text(max_size=12) | st.sampled_from(["a\u2028b", "\x85", "x\x0cy", "\x1c", "\u2029"])
LETTER = st.sampled_from(list("ABCDEFabcdef") + ["", " B ", "AB", "(A)", "Z"])
FIELD = {
    "image": st.one_of(TEXT, JSON),
    "question": st.one_of(TEXT, JSON),
    "answer": st.one_of(TEXT, LETTER, JSON),
    "choices": st.one_of(st.none(), st.lists(TEXT, max_size=5), st.lists(TEXT, min_size=26, max_size=28), JSON),
    "type": st.one_of(st.none(), TEXT, JSON),
    "instruction": st.one_of(st.none(), TEXT, JSON),
    "description": st.one_of(st.none(), TEXT),
    "reasoning": st.one_of(st.none(), TEXT, JSON),
    "split": st.one_of(st.none(), st.sampled_from(["calib", "eval", "test"]), JSON),
}
NONEMPTY = TEXT.filter(str.strip)
VALID = st.fixed_dictionaries({"image": NONEMPTY, "question": NONEMPTY, "answer": NONEMPTY},
                              optional={"type": TEXT, "description": TEXT, "scene": JSON, "choices": st.just([])})
MULTIPLE_CHOICE = st.lists(TEXT, min_size=1, max_size=5).flatmap(lambda choices: st.fixed_dictionaries(
    {"image": NONEMPTY, "question": NONEMPTY, "choices": st.just(choices),
     "answer": st.sampled_from(prompts.LETTERS[:len(choices)] + prompts.LETTERS[:len(choices)].lower())}))
# items of the format, items near it (each field present or not, each value right or wrong), and any JSON
ITEMS = VALID | MULTIPLE_CHOICE | st.fixed_dictionaries({}, optional=FIELD) | JSON


def _usable(item: dict) -> None:
    """What every consumer does with a checked item must work."""
    choices = item.get("choices") or None
    question = prompts.format_question(item["question"], choices)
    if "answer" in item:
        multiple_choice = bool(choices) or prompts.is_multiple_choice(question)
        evaluation.is_correct(item["answer"], item["answer"], multiple_choice)
        if choices:
            assert item["answer"].strip().upper() in prompts.LETTERS[:len(choices)]
            assert evaluation.is_correct(item["answer"].strip(), item["answer"], multiple_choice=True)
    for key in data.TEXT_FIELDS:
        assert item.get(key) is None or isinstance(item[key], str)


@FUZZ
@given(ITEMS, st.booleans())
def test_a_checked_item_is_usable_and_a_problem_is_one_line(raw, answer):
    problem = data.item_problem(raw, answer=answer)
    if problem is None:
        assert isinstance(raw, dict) and isinstance(raw["image"], str) and raw["image"].strip()
        assert isinstance(raw["question"], str) and raw["question"].strip()
        assert not answer or isinstance(raw["answer"], str)
        _usable(raw)
    else:
        assert isinstance(problem, str) and problem and "\n" not in problem and "\r" not in problem


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("items")


@FUZZ
@given(st.lists(ITEMS, min_size=1, max_size=6), st.lists(st.sampled_from(["", "  ", "\r"]), max_size=6),
       st.booleans())
def test_a_file_reads_whole_or_names_its_first_bad_line(folder, raws, blanks, ascii_only):
    path = folder / "items.jsonl"
    lines = [json.dumps(r, ensure_ascii=ascii_only) for r in raws] + blanks  # blank lines at the end are skipped
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    problems = [(n, data.item_problem(r)) for n, r in enumerate(raws, 1)]
    bad = [(n, p) for n, p in problems if p]
    if bad:
        with pytest.raises(UsageError) as e:
            data.read_items(path)
        n, problem = bad[0]
        assert str(e.value) == f"{path}:{n}: {problem}"
    else:
        assert data.read_items(path) == list(enumerate(raws, 1))


@FUZZ
@given(st.text(max_size=300))
def test_any_text_reads_as_items_or_one_line_naming_the_file(folder, text):
    path = folder / "any.jsonl"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        items = data.read_items(path, answer=False)
    except UsageError as e:
        message = str(e)
        assert message.startswith(str(path)) and "\n" not in message and "\r" not in message
    else:
        assert items and all(data.item_problem(raw, answer=False) is None for _, raw in items)


@pytest.mark.parametrize("bad, message", [
    (b"\xff\xfe{}", "is not UTF-8 text (byte 0 cannot be decoded)"),
    (b"[" * 100_000, ":1: not valid JSON"),
    (b"\n\n  \n", "has no items"),
])
def test_unreadable_files_are_one_line(tmp_path, bad, message):
    path = tmp_path / "x.jsonl"
    path.write_bytes(bad)
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        data.read_items(path)


def test_a_byte_order_mark_is_no_error(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"image": "a.png", "question": "q", "answer": "a"}).encode())
    assert data.read_items(path) == [(1, {"image": "a.png", "question": "q", "answer": "a"})]


def test_the_shipped_sets_pass():
    root = Path(data.__file__).parent
    for path in [root.parent / "edgevlm" / "demo" / "test" / "items.jsonl", *root.glob("sets/*/items.jsonl")]:
        if path.exists():
            assert data.read_items(path, answer=False)


def test_a_calibration_set_is_checked_line_by_line_too(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / data.ITEMS).write_text('{"image": "a.png", "question": "q"}\n{"image": "a.png", "question": 3}\n')
    with pytest.raises(UsageError, match=rf"{tmp_path / data.ITEMS}:2: \"question\" must be a string, not a number"):
        data.load(tmp_path)
    (tmp_path / data.ITEMS).write_text('{"image": "a.png", "question": "q"}\n')  # no answer: a calibration item
    assert data.load(tmp_path)[0].question == "q"


def test_a_reasoners_tuning_data_may_be_text_alone_and_counts_may_be_numbers(tmp_path):
    from edgevlm.evaluation import load_items

    data = tmp_path / "items.jsonl"
    data.write_text('{"question": "How many cups?", "answer": 3, "description": "Three cups.", "reasoning": "r"}\n')
    [item] = load_items(data, image=False)
    assert item["answer"] == "3" and item.get("image") is None
    with pytest.raises(UsageError, match=r'items.jsonl:1: "image" is missing'):
        load_items(data)  # eval needs its images
