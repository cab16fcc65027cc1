"""Files: edgevlm never destroys what it did not write. An output replaces only a directory edgevlm wrote all of
(every file in it listed by its `.edgevlm` marker or, in a bundle, by the manifest's file table), swaps in
whole, gets the modes the umask gives, and is cleaned up when the process is terminated; --resume loads
tensors only; a merged adapter follows its base; training stops on a non-finite loss and saves nothing."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgevlm import bundle
from edgevlm.errors import EdgeVLMError, UsageError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def edgevlm(*args, timeout: int = 300):
    return subprocess.run([sys.executable, "-m", "edgevlm", *map(str, args)], capture_output=True, env=ENV,
                          timeout=timeout)


def one_line_error(proc, code: int, *needles: str) -> str:
    """The error: stderr's one `edgevlm:` line, its last (tune logs its scores there before it)."""
    err = proc.stderr.decode()
    assert proc.returncode == code, err
    lines = [line for line in err.strip().splitlines() if line.startswith("edgevlm")]
    assert len(lines) == 1 and err.strip().endswith(lines[0]) and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def snapshot(root: Path) -> dict:
    """Every path under root with its bytes (None for a directory)."""
    return {p.relative_to(root).as_posix(): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def hidden(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def marker(*files: str) -> str:
    return json.dumps({"files": list(files)})


def a_bundle(*files: str) -> str:
    return json.dumps({"format": bundle.FORMAT, "format_version": bundle.FORMAT_VERSION,
                       "files": {f: {"sha256": "0" * 64, "bytes": 1} for f in files}})


def refusal(out: Path, name: str | None = None) -> str:
    """The line refusing to replace `out` because of `name` (or of any name, captured), as a regular expression."""
    return (re.escape(f"{out} holds ") + (re.escape(name) if name else "(.+)")
            + re.escape(", which edgevlm did not write; remove it, or choose another output directory"))


OLD_MARKER = "edgevlm wrote this directory and may replace it (--overwrite, tune --out).\n"  # before it listed files


# ---------------------------------------------------------------- whose directory it is
def test_an_absent_or_empty_directory_is_written_without_overwrite(tmp_path):
    (tmp_path / "empty").mkdir()
    for name in ("absent", "empty"):
        with bundle.atomic_directory(tmp_path / name) as tmp:
            (tmp / "a.txt").write_text("new")
        assert sorted(os.listdir(tmp_path / name)) == [bundle.MARKER, "a.txt"]
    assert hidden(tmp_path) == []


@pytest.mark.parametrize("contents, foreign", [
    # a model, cache or demo output: its marker lists every file in it
    ({bundle.MARKER: marker("config.json", "sub/w.bin"), "config.json": "{}", "sub/w.bin": "w"}, None),
    ({bundle.MARKER: OLD_MARKER}, None),  # the old marker lists nothing: alone, it is all there is
    ({bundle.MARKER: OLD_MARKER, "config.json": "{}"}, "config.json"),
    ({bundle.MARKER: marker("config.json"), "config.json": "{}", "notes.txt": "mine"}, "notes.txt"),
    ({bundle.MARKER: marker("a.txt"), "a.txt": "a", "sub/notes.txt": "mine"}, "sub/notes.txt"),
    ({bundle.MARKER: marker("sub"), "sub/notes.txt": "mine"}, "sub/notes.txt"),  # a listed folder is not its files
    ({bundle.MARKER: marker("a.txt"), "a.txt": "a", "manifest.json": "{}"}, "manifest.json"),
    ({bundle.MARKER: "[1, 2]", "a.txt": "a"}, "a.txt"),
    # a bundle: its manifest's table lists every file in it
    ({"manifest.json": a_bundle("x.onnx", "tok/t.json"), "x.onnx": "g", "tok/t.json": "{}"}, None),
    ({"manifest.json": a_bundle("x.onnx"), "x.onnx": "g", "notes.md": "mine"}, "notes.md"),
    ({"manifest.json": a_bundle("x.onnx"), "x.onnx": "g", bundle.MARKER: marker("x.onnx")}, bundle.MARKER),
    ({"manifest.json": json.dumps({"format": bundle.FORMAT, "format_version": 1}), "x.onnx": "g"}, "manifest.json"),
    ({"manifest.json": json.dumps({"format": bundle.FORMAT, "files": ["x.onnx"]}), "x.onnx": "g"}, "manifest.json"),
    # neither
    ({"manifest.json": json.dumps({"format": "someone-elses"}), "x.onnx": "g"}, "manifest.json"),
    ({"notes.txt": "my thesis", "sub/.edgevlm": ""}, "notes.txt"),  # a marker deeper down does not make the top ours
    ({"config.json": "{}", "model.safetensors": "weights"}, "config.json"),  # someone's model
])
def test_overwrite_replaces_a_directory_edgevlm_wrote_all_of_and_refuses_any_other(tmp_path, contents, foreign):
    out = tmp_path / "out"
    write(out, contents)
    before = snapshot(out)
    with pytest.raises(UsageError, match="exists and is not empty; .*--overwrite"):
        with bundle.atomic_directory(out) as tmp:
            (tmp / "new.txt").write_text("new")
    assert bundle.written_by_edgevlm(out) == (foreign is None)
    if foreign is None:
        with bundle.atomic_directory(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
        assert sorted(os.listdir(out)) == [bundle.MARKER, "new.txt"]
    else:
        with pytest.raises(UsageError, match=f"^{refusal(out, foreign)}$"):
            with bundle.atomic_directory(out, overwrite=True) as tmp:
                (tmp / "new.txt").write_text("new")
        assert snapshot(out) == before
    assert hidden(tmp_path) == []


NAMES = [bundle.MARKER, "manifest.json", "config.json", "notes.txt", "sub/x", f"sub/{bundle.MARKER}",
         "sub/manifest.json", f"{bundle.MARKER}/x", "manifest.json/y"]
LISTINGS = st.lists(st.sampled_from([*NAMES, "sub", "../notes.txt", "/etc/passwd"]), max_size=6)
JUNK = st.sampled_from(["", "{not json", "[" * 5000, json.dumps([bundle.FORMAT]), json.dumps({"files": "sub/x"})])
MARKERS = st.one_of(LISTINGS.map(lambda names: marker(*names)), st.just(OLD_MARKER), JUNK)
MANIFESTS = st.one_of(LISTINGS.map(lambda names: a_bundle(*names)), JUNK, st.sampled_from(
    [json.dumps({"format": bundle.FORMAT}), json.dumps({"format": "other", "files": {n: {} for n in NAMES}})]))


@st.composite
def directories(draw) -> dict[str, str]:
    """Files a directory may hold (path: text): markers and manifests, edgevlm's or not, listing what is there,
    less or more, beside other files."""
    names = draw(st.sets(st.sampled_from(NAMES), max_size=5))
    texts = {bundle.MARKER: MARKERS, bundle.MANIFEST: MANIFESTS}
    return {name: draw(texts.get(name.rpartition("/")[2], st.text(max_size=20))) for name in sorted(names)}


def listed_by_edgevlm(files: dict[str, str]) -> set[str] | None:
    """What the record edgevlm would have written there lists, with the record itself: a bundle's manifest (a
    malformed table: None), else the marker (the old form: itself alone); None without either. A listed
    name that is a folder there is not listed: that would list everything in it."""
    folders = {name.rsplit("/", 1)[0] for name in files if "/" in name}
    def parsed(text):
        try:
            return json.loads(text)
        except (TypeError, ValueError, RecursionError):
            return None

    manifest = parsed(files.get(bundle.MANIFEST))
    if isinstance(manifest, dict) and manifest.get("format") == bundle.FORMAT:
        table = manifest.get("files")
        return {bundle.MANIFEST, *table} - folders if isinstance(table, dict) else None
    if bundle.MARKER not in files:
        return None
    record = parsed(files[bundle.MARKER])
    names = record.get("files") if isinstance(record, dict) else None
    return {bundle.MARKER, *(n for n in names if isinstance(n, str) and n not in folders)} if isinstance(
        names, list) else {bundle.MARKER}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=directories(), overwrite=st.booleans())
def test_a_full_directory_is_replaced_only_when_edgevlm_listed_every_file_in_it(files, overwrite):
    with tempfile.TemporaryDirectory() as root:
        out = Path(root) / "out"
        out.mkdir()
        try:
            write(out, files)
        except OSError:  # a name used both as a file and as a folder: not a directory that can exist
            return
        listed = listed_by_edgevlm(files)
        ours = listed is not None and set(files) <= listed
        before = snapshot(out)
        try:
            with bundle.atomic_directory(out, overwrite=overwrite) as tmp:
                (tmp / "new.txt").write_text("new")
        except UsageError as e:
            assert "\n" not in str(e) and str(out) in str(e)
            assert files and not (overwrite and ours)
            assert snapshot(out) == before  # every file intact
            named = re.fullmatch(refusal(out), str(e))
            if overwrite:  # the line names an entry that is there and that no record of edgevlm's lists
                assert named and named.group(1) in before and (listed is None or named.group(1) not in listed)
        else:
            assert not files or (overwrite and ours)  # every file in it was listed
            assert sorted(os.listdir(out)) == [bundle.MARKER, "new.txt"]
        assert os.listdir(root) == ["out"]


def test_a_model_carries_a_marker_listing_its_files_and_a_bundle_only_its_manifest(tiny_dir, tiny_bundle):
    model = tiny_dir("qwen3")
    files = {p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file()}
    assert set(json.loads((model / bundle.MARKER).read_text())["files"]) == files - {bundle.MARKER}
    assert bundle.written_by_edgevlm(model)
    assert not list(tiny_bundle.rglob(bundle.MARKER))  # a bundle holds only what its manifest lists
    assert bundle.written_by_edgevlm(tiny_bundle)
    listed = set(json.loads((tiny_bundle / bundle.MANIFEST).read_text())["files"])
    on_disk = {p.relative_to(tiny_bundle).as_posix() for p in tiny_bundle.rglob("*") if p.is_file()}
    assert on_disk - listed == {bundle.MANIFEST}


def test_make_tiny_export_and_tune_refuse_to_replace_a_folder_edgevlm_did_not_write(tiny_dir, scene_items, tmp_path):
    pytest.importorskip("torch")
    from edgevlm.export.exporter import export_bundle
    from edgevlm.train import tune

    mine = tmp_path / "mine"
    write(mine, {"thesis.tex": "years of work", "figures/a.png": "png"})
    before = snapshot(mine)
    line = one_line_error(edgevlm("make-tiny", "qwen3", mine, "--overwrite"), 2)
    assert re.fullmatch(f"edgevlm: error: {refusal(mine, 'figures')}", line), line
    with pytest.raises(UsageError, match=refusal(mine, "figures")):
        export_bundle(mine, extractor=str(tiny_dir("llava_onevision")), with_reasoner=False, overwrite=True,
                      log=lambda m: None)
    with pytest.raises(UsageError, match=refusal(mine, "figures")):  # before any training
        tune.tune(tiny_dir("qwen3"), scene_items, mine, steps=1, log=lambda m: None)
    assert snapshot(mine) == before
    assert hidden(tmp_path) == []
    # what edgevlm wrote it replaces: a tuned model, tuned again into the same place
    out = tmp_path / "tuned"
    for _ in range(2):
        tune.tune(tiny_dir("qwen3"), scene_items, out, steps=1, batch_size=2, val_fraction=0.2, log=lambda m: None)
        assert (out / bundle.MARKER).is_file() and (out / "model.safetensors").is_file()


def test_a_file_added_beside_a_bundle_is_never_deleted(tiny_dir, tiny_bundle, tmp_path):
    from edgevlm.export.exporter import export_bundle

    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    (out / "notes.md").write_text("what I measured on this bundle")
    bundle.load(out)  # a note in the root is allowed there: the bundle still loads
    before = snapshot(out)
    with pytest.raises(UsageError, match=f"^{refusal(out, 'notes.md')}$"):
        with bundle.atomic_directory(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    with pytest.raises(UsageError, match=refusal(out, "notes.md")):
        export_bundle(out, extractor=str(tiny_dir("llava_onevision")), with_reasoner=False, overwrite=True,
                      fidelity_samples=0, log=lambda m: None)
    assert snapshot(out) == before and hidden(tmp_path) == []
    (out / "notes.md").unlink()  # without it, the bundle is all edgevlm's, and an export replaces it
    export_bundle(out, extractor=str(tiny_dir("llava_onevision")), with_reasoner=False, overwrite=True,
                  fidelity_samples=0, log=lambda m: None)
    assert set(bundle.load(out).manifest.models) == {"extractor"} and hidden(tmp_path) == []


def test_a_file_added_to_a_model_edgevlm_wrote_is_never_deleted(tiny_dir, scene_items, tmp_path):
    pytest.importorskip("torch")
    from edgevlm.train import tiny, tune

    model = tmp_path / "model"
    tiny.make_tiny("qwen3", model)
    tiny.make_tiny("qwen3", model, overwrite=True)  # what edgevlm wrote, it replaces
    (model / "my-notes.txt").write_text("mine")
    before = snapshot(model)
    line = one_line_error(edgevlm("make-tiny", "qwen3", model, "--overwrite"), 2)
    assert re.fullmatch(f"edgevlm: error: {refusal(model, 'my-notes.txt')}", line), line
    tuned = tmp_path / "tuned"
    tune.tune(tiny_dir("qwen3"), scene_items, tuned, steps=1, batch_size=2, val_fraction=0.2, log=lambda m: None)
    (tuned / "sub").mkdir()
    (tuned / "sub" / "eval.json").write_text("{}")
    tuned_before = snapshot(tuned)
    with pytest.raises(UsageError, match=refusal(tuned, "sub/eval.json")):  # before any training
        tune.tune(tiny_dir("qwen3"), scene_items, tuned, steps=1, batch_size=2, val_fraction=0.2, log=lambda m: None)
    assert snapshot(model) == before and snapshot(tuned) == tuned_before and hidden(tmp_path) == []


def test_a_copied_marker_does_not_make_the_files_beside_it_edgevlms(tiny_dir, tmp_path):
    mine = tmp_path / "mine"
    shutil.copytree(tiny_dir("qwen3"), mine)  # the marker lists every file here ...
    assert bundle.written_by_edgevlm(mine)
    (mine / "thesis.tex").write_text("years of work")  # ... but this one
    before = snapshot(mine)
    assert not bundle.written_by_edgevlm(mine)
    with pytest.raises(UsageError, match=f"^{refusal(mine, 'thesis.tex')}$"):
        with bundle.atomic_directory(mine, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert snapshot(mine) == before and hidden(tmp_path) == []


# ---------------------------------------------------------------- swapping in
def test_an_overwrite_is_one_swap_and_leaves_nothing_hidden(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with bundle.atomic_directory(out) as tmp:
        (tmp / "v").write_text("old")
    real_replace, missing = os.replace, []

    def replace(src, dst):  # `out` must exist after every rename a write makes
        real_replace(src, dst)
        if not out.exists():
            missing.append((src, dst))

    monkeypatch.setattr(os, "replace", replace)
    for version in ("new", "newer"):
        with bundle.atomic_directory(out, overwrite=True) as tmp:
            (tmp / "v").write_text(version)
        assert (out / "v").read_text() == version
    assert not missing, f"no {out} between the renames {missing}"
    assert os.listdir(tmp_path) == ["out"]


@pytest.mark.parametrize("fail", [RuntimeError, KeyboardInterrupt])
def test_a_failed_or_interrupted_overwrite_keeps_the_old_directory_whole(tmp_path, fail):
    out = tmp_path / "out"
    with bundle.atomic_directory(out) as tmp:
        write(tmp, {"v": "old", "sub/w": "old"})
    before = snapshot(out)
    with pytest.raises(fail):
        with bundle.atomic_directory(out, overwrite=True) as tmp:
            write(tmp, {"v": "new"})
            raise fail()
    assert snapshot(out) == before and os.listdir(tmp_path) == ["out"]


@pytest.mark.parametrize("fail", [OSError, KeyboardInterrupt])
def test_without_a_swap_call_an_interrupted_second_rename_puts_the_old_one_back(tmp_path, monkeypatch, fail):
    out = tmp_path / "out"
    with bundle.atomic_directory(out) as tmp:
        (tmp / "v").write_text("old")
    monkeypatch.setattr(bundle, "_exchange", lambda a, b: False)  # macOS, Windows, NFS: two renames
    with bundle.atomic_directory(out, overwrite=True) as tmp:  # the fallback works ...
        (tmp / "v").write_text("new")
    assert (out / "v").read_text() == "new" and os.listdir(tmp_path) == ["out"]
    real_replace = os.replace

    def replace(src, dst):
        if ".partial-" in Path(src).name:  # the new one moving in, after the old one moved aside
            raise fail()
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(fail):  # ... and when its second rename fails, the old one goes back
        with bundle.atomic_directory(out, overwrite=True) as tmp:
            (tmp / "v").write_text("newer")
    assert (out / "v").read_text() == "new" and os.listdir(tmp_path) == ["out"]


def test_an_old_directory_left_between_two_renames_by_a_killed_writer_goes_back(tmp_path):
    out = tmp_path / "out"
    orphan = tmp_path / f".out.old-{dead_pid()}-1a2b"
    write(orphan, {bundle.MARKER: marker("v"), "v": "old"})
    with pytest.raises(RuntimeError):
        with bundle.atomic_directory(out, overwrite=True):
            raise RuntimeError("this write fails too")
    assert (out / "v").read_text() == "old" and os.listdir(tmp_path) == ["out"]


# ---------------------------------------------------------------- modes
@pytest.mark.parametrize("umask, folder, file", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600), (0o002, 0o775, 0o664)])
def test_outputs_get_the_modes_the_umask_gives(tmp_path, umask, folder, file):
    old = os.umask(umask)
    try:
        with bundle.atomic_directory(tmp_path / "out") as tmp:
            (tmp / "plain.txt").write_text("x")
            sub = Path(tempfile.mkdtemp(dir=tmp))  # 0700, whatever the umask
            fd, made = tempfile.mkstemp(dir=sub)  # 0600
            os.close(fd)
    finally:
        os.umask(old)
    out = tmp_path / "out"
    for path in (out, out / sub.name):
        assert path.stat().st_mode & 0o777 == folder, oct(path.stat().st_mode)
    for path in (out / "plain.txt", out / bundle.MARKER, out / sub.name / Path(made).name):
        assert path.stat().st_mode & 0o777 == file, (path, oct(path.stat().st_mode))


# ---------------------------------------------------------------- SIGTERM
def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for rel, data in snapshot(root).items():
        h.update(rel.encode() + b"\0" + (data or b""))
    return h.hexdigest()


def _terminate_once_writing(cmd: list, folder: Path, name: str, started) -> bytes:
    """Run `edgevlm cmd`, send it SIGTERM once `started(partial directory)` holds, and return its stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "edgevlm", *map(str, cmd)], stderr=subprocess.PIPE, env=ENV)
    deadline = time.monotonic() + 180
    while proc.poll() is None:
        partial = [p for p in folder.iterdir() if p.name.startswith(f".{name}.")]
        try:
            if partial and started(partial[0]):
                break
        except FileNotFoundError:  # a file the writer renamed or removed while `started` looked: look again
            pass
        assert time.monotonic() < deadline, "the write did not start"
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()  # it was still writing when terminated
    assert err.decode().strip().splitlines()[-1] == "edgevlm: terminated"
    return err


def test_sigterm_mid_write_removes_the_partial_directory(tmp_path):
    _terminate_once_writing(["make-tiny", "llava_onevision", tmp_path / "model"], tmp_path, "model", lambda p: True)
    assert os.listdir(tmp_path) == []  # neither the model nor its partial directory


def test_sigterm_mid_overwrite_keeps_the_old_bundle_whole(tiny_dir, tiny_bundle, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    old = _digest(out)
    cmd = ["export", "--out", out, "--extractor", tiny_dir("llava_onevision"), "--no-reasoner", "--overwrite"]
    # terminated once the export has written graphs into its partial directory
    _terminate_once_writing(cmd, tmp_path, "bundle", lambda p: any(f.is_file() for f in p.rglob("*")))
    assert os.listdir(tmp_path) == ["bundle"]  # no partial directory
    assert _digest(out) == old
    bundle.load(out)


# ---------------------------------------------------------------- tuning: checkpoints, divergence, settings
@pytest.fixture(scope="module")
def scene_items(tmp_path_factory):
    from edgevlm.evaluation import load_items
    from edgevlm.train import scenes

    folder = scenes.make_set(tmp_path_factory.mktemp("scenes"), 6, seed=5, split="train")
    return load_items(folder / "items.jsonl")


@pytest.fixture(scope="module")
def data(scene_items, tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "items.jsonl"
    path.write_text("".join(json.dumps({**i, "image": str(i["image"])}) + "\n" for i in scene_items))
    return path


class Planted:
    """Unpickling this runs code: it writes a file."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return exec, (f"open({str(self.target)!r}, 'w').write('pwned')",)


def test_resume_refuses_a_checkpoint_that_would_run_code(tiny_dir, data, tmp_path):
    torch = pytest.importorskip("torch")
    from edgevlm.train import tune

    target = tmp_path / "pwned"
    (tmp_path / "out.partial").mkdir()
    torch.save({"model": Planted(target), "steps": 2}, tmp_path / "out.partial" / tune.CHECKPOINT)
    proc = edgevlm("tune", "--model", tiny_dir("qwen3"), "--data", data, "--out", tmp_path / "out", "--steps", "2",
                   "--batch-size", "2", "--resume")
    one_line_error(proc, 1, "checkpoint.pt holds objects other than tensors", "without --resume")
    assert not target.exists() and not (tmp_path / "out").exists()


def test_a_lora_run_resumes_from_a_checkpoint_of_tensors_alone(tiny_dir, scene_items, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from edgevlm.train import tune

    common = dict(steps=4, batch_size=2, lr=1e-2, lora=4, warmup=1, val_fraction=0.2, eval_every=2, save_every=2,
                  log=lambda m: None)

    def interrupt(step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tune.tune(tiny_dir("qwen3"), scene_items, tmp_path / "out", on_step=interrupt, **common)
    torch.load(tmp_path / "out.partial" / tune.CHECKPOINT, weights_only=True)  # no pickled objects in it
    scores = tune.tune(tiny_dir("qwen3"), scene_items, tmp_path / "out", resume=True, **common)
    assert scores["history"][0]["step"] == 2 and not (tmp_path / "out.partial").exists()


def test_a_diverging_tune_stops_with_one_line_naming_the_step_and_saves_nothing(tiny_dir, data, tmp_path):
    proc = edgevlm("tune", "--model", tiny_dir("qwen3"), "--data", data, "--out", tmp_path / "out", "--steps", "6",
                   "--batch-size", "2", "--lr", "1e30")
    line = one_line_error(proc, 1, "training diverged", "lower the learning rate")
    assert " at step " in line and "/6" in line
    assert os.listdir(tmp_path) == []  # neither the model nor a checkpoint of NaN weights


def test_the_demo_pretraining_stops_on_a_non_finite_loss(tiny_dir, tmp_path):
    pytest.importorskip("torch")
    from edgevlm.train import demo

    model = tmp_path / "reasoner"
    shutil.copytree(tiny_dir("qwen3"), model)
    before = snapshot(model)
    with pytest.raises(EdgeVLMError, match="training diverged: the loss is .* at copy pretraining step"):
        demo.pretrain_copying(model, max_steps=20, lr=1e30, log=lambda m: None)
    assert snapshot(model) == before


@pytest.mark.parametrize("setting", [dict(lr=float("nan")), dict(lr=float("inf")), dict(lr=0.0), dict(steps=2.5),
                                     dict(steps=float("inf")), dict(batch_size=float("nan")), dict(eval_every=0),
                                     dict(save_every=0), dict(warmup=-1)])
def test_non_finite_or_fractional_settings_are_usage_errors(tiny_dir, tmp_path, setting):
    pytest.importorskip("torch")
    from edgevlm.train import tune

    with pytest.raises(UsageError, match="must be a"):
        tune.tune(tiny_dir("qwen3"), [], tmp_path / "out", **setting)


@pytest.mark.parametrize("args", [["tune", "--lr", "nan"], ["tune", "--lr", "inf"], ["export", "--max-kl", "nan"],
                                  ["export", "--min-agreement", "nan"]])
def test_cli_refuses_non_finite_numbers(tmp_path, args):
    rest = {"tune": ["--model", "m", "--data", "d.jsonl", "--out", tmp_path / "o"],
            "export": ["--out", tmp_path / "o", "--quant", "int8"]}[args[0]]
    one_line_error(edgevlm(*args, *rest), 2, "is not a finite number")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- a merged adapter follows its base
def test_a_merged_adapter_is_made_again_when_its_base_is_retrained_in_place(tiny_dir, tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from edgevlm.export.checkpoints import resolve

    monkeypatch.setenv("EDGEVLM_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "base"
    shutil.copytree(tiny_dir("qwen3"), base)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    first = resolve(str(tmp_path / "adapter"))
    assert resolve(str(tmp_path / "adapter")) == first  # cached
    weights = base / "model.safetensors"
    stat = weights.stat()
    tensors = load_file(weights)
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"] + 1.0
    save_file(tensors, weights, metadata={"format": "pt"})  # retrained in place: same size, and even the same mtime
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size and weights.stat().st_mtime_ns == stat.st_mtime_ns
    second = resolve(str(tmp_path / "adapter"))
    assert second != first and (second / bundle.MARKER).is_file()
    merged = load_file(second / "model.safetensors")
    torch.testing.assert_close(merged["model.embed_tokens.weight"], tensors["model.embed_tokens.weight"])
