"""`edgevlm` as a user runs it: real subprocesses, exit codes, one-line errors, never a traceback."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def edgevlm(*args, stdin: bytes | None = None, env: dict | None = None, timeout: int = 300):
    return subprocess.run([sys.executable, "-m", "edgevlm", *map(str, args)], input=stdin, capture_output=True,
                          env=env or ENV, timeout=timeout)


def assert_one_line_error(proc, code: int, *needles: str):
    err = proc.stderr.decode()
    assert proc.returncode == code, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgevlm: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "some.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Built through the CLI, as the README does."""
    root = tmp_path_factory.mktemp("cli_models")
    for family, name in (("llava_onevision", "ex"), ("qwen3", "re")):
        proc = edgevlm("make-tiny", family, root / name)
        assert proc.returncode == 0, proc.stderr.decode()
        assert proc.stdout.decode().strip() == str(root / name)
    return ["--extractor", root / "ex", "--reasoner", root / "re"]


@pytest.mark.parametrize("mode, stages", [
    ("extract-think", ["plan", "extract", "think"]),
    ("direct", ["direct"]),
    ("extract", ["plan", "extract"]),
])
def test_run_json_has_every_field(image, models, mode, stages):
    proc = edgevlm("run", image, "What is shown?", *models, "--mode", mode, "--json", "--max-new-tokens", "8",
                   "--think-budget", "8")
    assert proc.returncode == 0, proc.stderr.decode()
    d = json.loads(proc.stdout)
    for key in ("answer", "extraction", "instruction", "reasoning", "timings", "tokens", "models"):
        assert key in d
    assert [k for k in d["timings"] if not k.endswith("_ms")] == stages
    for stage in stages:
        assert {"preprocess_ms", "vision_ms", "prefill_ms", "decode_ms", "ttft_ms", "decode_tok_s"} <= set(
            d["timings"][stage])
        assert {"prompt", "generated"} <= set(d["tokens"][stage])
    assert d["models"]["extractor"] == str(models[1])


def test_stream_profile_and_stdin_image(image, models):
    proc = edgevlm("run", "-", "What is shown?", *models, "--stream", "--profile", "--max-new-tokens", "6",
                   "--think-budget", "6", stdin=image.read_bytes())
    assert proc.returncode == 0, proc.stderr.decode()
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert out.startswith("[plan] ") and "\n[extract] " in out and "\n[think] " in out
    assert out.rstrip().splitlines()[-1].startswith("Answer: ")
    table = err.strip().splitlines()
    assert table[0].split()[:3] == ["stage", "prompt", "new"] and [r.split()[0] for r in table[1:4]] == [
        "plan", "extract", "think"]
    assert table[-1].startswith("total ")


def test_default_preset_offline_names_the_offline_options(image, tmp_path):
    env = {**ENV, "HF_HOME": str(tmp_path / "hf"), "EDGEVLM_CACHE": str(tmp_path / "ev")}  # nothing cached
    proc = edgevlm("run", image, "q", env=env)
    assert_one_line_error(proc, 1, "markendo/llava-extract-qwen3-0.6B", "HF_HUB_OFFLINE", "--extractor DIR")


@pytest.mark.parametrize("make, needle", [
    (lambda p: None, "no such file"),
    (lambda p: p.write_text("hello"), "not an image"),
    (lambda p: p.write_bytes(b""), "empty"),
])
def test_bad_image_files(tmp_path, make, needle):
    path = tmp_path / "x.png"
    make(path)
    assert_one_line_error(edgevlm("run", path, "q"), 1, needle)


def test_truncated_image(tmp_path, image):
    path = tmp_path / "cut.png"
    path.write_bytes(image.read_bytes()[:300])
    assert_one_line_error(edgevlm("run", path, "q"), 1, "corrupt or truncated")


@pytest.mark.parametrize("args, needle", [
    (["   "], "question is empty"),
    (["q", "--preset", "nope"], "unknown preset 'nope'"),
    (["q", "--mode", "dream"], "unknown mode 'dream'"),
    (["q", "--think-budget", "0"], "--think-budget"),
    (["q", "--bogus"], "No such option"),
])
def test_usage_errors_exit_2(image, args, needle):
    assert_one_line_error(edgevlm("run", image, *args), 2, needle)


def test_missing_arguments_are_usage_errors():
    assert_one_line_error(edgevlm("run"), 2, "Missing argument")
    assert_one_line_error(edgevlm("make-tiny", "resnet", "/tmp/x"), 2, "unknown family 'resnet'")


def test_question_longer_than_the_context(image, models):
    question = " ".join(["How many red circles are next to the blue square?"] * 300)
    assert_one_line_error(edgevlm("run", image, question, *models), 1, "tokens", "shorten the question")


def test_unsupported_model_family(image, models, tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    assert_one_line_error(edgevlm("run", image, "q", "--extractor", tmp_path / "bert", "--reasoner", models[3]), 1,
                          "'bert'", "llava_onevision")
    assert_one_line_error(edgevlm("run", image, "q", "--extractor", models[1], "--reasoner", tmp_path / "bert"), 1,
                          "causal LM")
    assert_one_line_error(edgevlm("run", image, "q", "--extractor", tmp_path / "nothing", "--reasoner", models[3]), 1,
                          "no such model directory")


def test_unavailable_device(image, models):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_one_line_error(edgevlm("run", image, "q", *models, "--device", "cuda"), 1, "no CUDA GPU")


@pytest.mark.parametrize("command", [[], ["run"], ["make-tiny"], ["export"], ["info"], ["bench"]])
def test_every_command_has_help(command):
    proc = edgevlm(*command, "--help")
    assert proc.returncode == 0 and "Usage:" in proc.stdout.decode()


def test_console_script_is_installed():
    exe = shutil.which("edgevlm", path=os.path.dirname(sys.executable)) or shutil.which("edgevlm")
    assert exe, "the edgevlm console script is not on PATH"
    proc = subprocess.run([exe, "--version"], capture_output=True, env=ENV)
    assert proc.returncode == 0 and proc.stdout.decode().startswith("edgevlm, version")
