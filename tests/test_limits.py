"""Limits that used to give wrong answers silently: a thinking budget past the reasoner's context, NaN
numbers, and output files that cannot be written after minutes of work."""

import os
import subprocess
import sys

import pytest
from conftest import random_image

from edgevlm.pipeline import Pipeline

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def test_the_thinking_budget_is_clamped_to_the_reasoners_context(torch_models):
    """The default budget (4096) on a reasoner with little context left: thinking is cut in time for an
    answer, and the result says so (today: it thinks to the end of the context and answers nothing)."""
    reasoner = torch_models("qwen3")
    pipe = Pipeline(torch_models("llava_onevision"), reasoner)
    saved = reasoner.max_context, reasoner.eos_ids
    try:
        # the think prompt takes ~90 of the 200; no end-of-sequence, so the random model thinks until stopped
        reasoner.max_context, reasoner.eos_ids = 200, set()
        r = pipe(random_image(), "What is shown?", instruction="the objects", max_new_tokens=8, temperature=0)
    finally:
        reasoner.max_context, reasoner.eos_ids = saved
    think = r.stages["think"]
    end = reasoner.tokenizer.token_id("</think>")
    assert end in think.token_ids  # the clamped budget forced it
    assert think.prompt_tokens + think.new_tokens <= 200
    assert any("thinking budget was clamped from 4096" in note for note in r.notes), r.notes
    assert r.to_dict()["notes"] == r.notes


def test_a_budget_that_fits_is_left_alone(torch_models):
    pipe = Pipeline(torch_models("llava_onevision"), torch_models("qwen3"))
    r = pipe(random_image(), "What is shown?", instruction="the objects", max_new_tokens=8, think_budget=8,
             temperature=0)
    assert not r.notes


def edgevlm(*args):
    return subprocess.run([sys.executable, "-m", "edgevlm", *map(str, args)], capture_output=True, env=ENV,
                          timeout=300)


@pytest.mark.parametrize("args, needle", [
    (["--trace", "/nonexistent-folder/t.json"], "does not exist"),
    (["--temperature", "nan"], "not a finite number"),
    (["--temperature", "inf"], "not a finite number"),
])
def test_run_refuses_bad_options_before_loading_anything(tmp_path, args, needle):
    image = tmp_path / "x.png"
    random_image().save(image)
    # an extractor that does not exist: the options must fail first, in one line, with exit 2
    proc = edgevlm("run", image, "What?", "--extractor", tmp_path / "none", "--reasoner", tmp_path / "none", *args)
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err


def test_an_output_that_is_a_folder_or_unwritable_is_refused(tmp_path):
    from edgevlm.bundle import check_output_file
    from edgevlm.errors import UsageError

    with pytest.raises(UsageError, match="is a directory"):
        check_output_file(str(tmp_path), "--json")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # root may write anywhere: then there is nothing to refuse
            with pytest.raises(UsageError, match="cannot be written"):
                check_output_file(str(locked / "x.json"), "--json")
    finally:
        locked.chmod(0o700)
    check_output_file(str(tmp_path / "fine.json"), "--json")  # a new file in a writable folder passes
