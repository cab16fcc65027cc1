"""`python -m edgevlm.demo train` end to end at toy size: data, vision pretraining, both models tuned at once
(two processes), installed atomically with their test split, then scored by `edgevlm eval`."""

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from test_cli import ENV, assert_one_line_error, edgevlm

from edgevlm.train import demo, scenes

pytest.importorskip("torch")


def test_scene_labels_name_every_cell():
    shapes = [scenes.Shape("square", "red", 0, 0, True), scenes.Shape("circle", "blue", 2, 1, False)]
    scene = scenes.Scene(size=(384, 288), background="gray", text="7", text_cell=(1, 2), shapes=shapes)
    labels = demo.scene_labels(asdict(scene))
    kind, color, size, text = labels[:9], labels[9:18], labels[18:27], labels[27:36]
    assert kind == [2, 0, 0, 0, 0, 0, 0, 1, 0] and size == [2, 0, 0, 0, 0, 0, 0, 1, 0]
    assert color[0] == 1 + list(scenes.COLORS).index("red") and color[7] == 1 + list(scenes.COLORS).index("blue")
    assert text == [0, 0, 0, 0, 0, 1 + scenes.TEXTS.index("7"), 0, 0, 0]
    assert labels[36:] == [list(scenes.BACKGROUNDS).index("gray")]
    assert len(labels) == sum(slots for _, slots, _ in demo._label_groups())


def test_each_patch_knows_its_cell():
    import numpy as np

    cell = demo.cell_of_patch(8)  # 8x8 patches over a 3x3 grid: cells of 3, 2 and 3 patches a side
    assert [(cell == c).sum() for c in range(9)] == [9, 6, 9, 6, 4, 6, 9, 6, 9]
    assert cell[0] == 0 and cell[63] == 8 and cell[3 * 8 + 3] == 4 and cell[7] == 2  # corners and the centre
    assert np.all(np.diff(cell.reshape(8, 8), axis=1) >= 0)  # reading order along each row


def test_descriptions_hold_the_question_relevant_cells_only_also_as_slots():
    import re

    import numpy as np

    def sentences(text):  # "A red square at the top left." -> ("top left", "a red square")
        found = re.findall(r"([^.]+) at the ([a-z ]+)\.", text)
        return [(place, what.strip()[0].lower() + what.strip()[1:]) for what, place in found]

    rng = np.random.default_rng(1)
    for _ in range(60):
        scene = scenes.random_scene(rng)
        full = dict(sentences(scenes.describe(scene)))
        assert len(full) == 9
        for q in scenes.questions(scene, rng):
            cells = sentences(q["description"])
            for place, what in cells:  # true facts of the scene, without sizes (no question asks about them)
                article = "an" if what.split()[1][0] in "aeiou" else "a"  # "a small orange ..." -> "an orange ..."
                assert what == re.sub(r"^an? (small|large) ", f"{article} ", full[place])
            slots = sentences(scenes.describe(scene, q["cells"], slots=True))
            assert [place for place, _ in slots] == [scenes.place(r, c) for r in range(3) for c in range(3)]
            assert [s for s in slots if s[1] != scenes.SKIPPED] == cells  # the same cells, the rest "-"
            answer = q["choices"]["ABCD".index(q["answer"])] if q["choices"] else q["answer"]
            shapes = {scenes.place(s.row, s.col): f"{'an' if s.color == 'orange' else 'a'} {s.color} {s.kind}"
                      for s in scene.shapes}
            if q["type"] in ("color", "shape"):  # the one cell the question names
                (place, what), = cells
                assert q["question"].endswith(f"at the {place}?") and answer in what
            elif q["type"] == "text":
                assert cells == [(scenes.place(*scene.text_cell), f'the text "{answer}"')]
            else:  # the colors or positions of all the shapes, or all of them: every shape, no text
                assert dict(cells) == shapes
            if q["type"] == "count":
                assert sum(f" {q['question'].split()[2]} " in what for what in shapes.values()) == int(answer)
            elif q["type"] == "position":
                assert q["question"][len("Where is the "):-1] in shapes[answer]


def test_reasoning_scans_the_shapes_in_order_with_verdicts_from_the_scene():
    import re

    import numpy as np

    rng = np.random.default_rng(2)
    checked = set()
    for _ in range(60):
        scene = scenes.random_scene(rng)
        ordered = sorted(scene.shapes, key=lambda s: (s.row, s.col))
        for q in scenes.questions(scene, rng):
            reasoning, kind = q["reasoning"], q["type"]
            if q["choices"]:  # the options in order up to the answer's, which is the only yes
                scan = re.search(r"The options: (.*)\. So the answer is (.+), option ([A-D])\.$", reasoning)
                steps = re.findall(r"([A-D]): ([^,;]+), (yes|no)", scan.group(1))
                assert [letter for letter, _, _ in steps] == list("ABCD"[:len(steps)])
                assert [verdict for _, _, verdict in steps] == ["no"] * (len(steps) - 1) + ["yes"]
                chosen = q["choices"]["ABCD".index(q["answer"])]
                assert steps[-1][:2] == (q["answer"], scan.group(2)) == (q["answer"], chosen)
            if kind in ("count", "compare"):
                colors = re.findall(r"(\w+) shapes", q["question"])
                steps = re.findall(r"an? (\w+) (\w+) at the ([a-z ]+): (\w+), (\w+), ([\d and]+)", reasoning)
                assert [(c, k, p) for c, k, p, _, _, _ in steps] == [(s.color, s.kind, scenes.place(s.row, s.col))
                                                                      for s in ordered]
                for n, (color, _, _, again, verdict, counts) in enumerate(steps):
                    counted = color in colors
                    assert again == color and verdict == ("no" if not counted else "yes" if kind == "count" else color)
                    assert counts == " and ".join(str(sum(s.color == c for s in ordered[:n + 1])) for c in colors)
                final = [sum(s.color == c for s in ordered) for c in colors]
                if kind == "count":
                    assert (q["choices"]["ABCD".index(q["answer"])] if q["choices"] else q["answer"]) == str(final[0])
                    assert reasoning.endswith(".") and f"That makes {final[0]} {colors[0]} shape" in reasoning
                else:
                    assert (q["answer"] == "yes") == (final[0] > final[1])
            elif kind in ("position", "relation"):
                names = re.findall(r"Looking for the (\w+ \w+)", reasoning)
                scans = re.findall(r"Looking for [^:]+: (.*?)\.(?: |$)", reasoning)
                found = []
                for name, scan in zip(names, scans, strict=True):
                    steps = re.findall(r"an? (\w+) (\w+) at the ([a-z ]+): (\w+), (yes|no), (\w+), (yes|no)", scan)
                    assert [step[:3] for step in steps] == [(s.color, s.kind, scenes.place(s.row, s.col))
                                                            for s in ordered[:len(steps)]]
                    for color, shape, _, color_again, same_color, shape_again, same_shape in steps:
                        assert (color_again, shape_again) == (color, shape)
                        wanted_color, wanted_shape = name.split()
                        assert same_color == ("yes" if color == wanted_color else "no")
                        assert same_shape == ("yes" if shape == wanted_shape else "no")
                    assert f"{steps[-1][0]} {steps[-1][1]}" == name  # it stops at the shape the question names
                    assert all(f"{color} {shape}" != name for color, shape, *_ in steps[:-1])
                    found.append(next(s for s in ordered if f"{s.color} {s.kind}" == name))
                if kind == "position":
                    assert q["answer"] == scenes.place(found[0].row, found[0].col)
                else:
                    side = re.search(r"to the (left|right) of", q["question"]).group(1)
                    a, b = (s.col for s in found)
                    assert (q["answer"] == "yes") == (a < b if side == "left" else a > b)
                    order = "left of" if a < b else "right of" if a > b else "the same as"
                    assert f" column is {order} the " in reasoning and f"the {side}: {q['answer']}. So" in reasoning
            checked.add((kind, bool(q["choices"])))
    assert {kind for kind, _ in checked} == {"count", "color", "shape", "position", "text", "arithmetic", "compare",
                                             "relation"}
    assert {kind for kind, options in checked if options} == {"count", "color"}  # with options and without
    assert {("count", False), ("color", False)} <= checked


def test_demo_train_builds_installs_and_scores(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "edgevlm.demo", "train", "--out", out, "--work", tmp_path / "work",
                           "--scenes", "6,2,2", "--vision-steps", "2", "--extractor-steps", "2",
                           "--reasoner-steps", "2", "--copy-steps", "2"], capture_output=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert "extractor: visual extraction tuning" in proc.stderr.decode()
    for name in ("extractor", "reasoner"):
        assert (out / name / "config.json").exists() and (out / name / "model.safetensors").exists()
    items = [json.loads(line) for line in (out / "test" / "items.jsonl").read_text().splitlines()]
    assert items and set(items[0]) == {"image", "question", "choices", "answer", "type"}
    assert all((out / "test" / i["image"]).exists() for i in items)
    example = json.loads((out / "example.json").read_text())  # the README's example: a test question, labelled
    first = next(i for i in items if i["type"] == "shape")
    assert example == {"question": first["question"], "answer": first["answer"]}
    assert (out / "example.png").read_bytes() == (out / "test" / first["image"]).read_bytes()
    proc = edgevlm("eval", "--data", out / "test" / "items.jsonl", "--extractor", out / "extractor", "--reasoner",
                   out / "reasoner", "--modes", "extract-think,direct", "--limit", "2", "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    (result,) = json.loads(proc.stdout)["results"].values()
    assert result["extract-think"]["n"] == 2 and result["direct"]["n"] == 2


def test_the_extractor_stops_when_the_demo_training_is_killed(tmp_path):
    import os
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "edgevlm.demo", "train", "--out", tmp_path / "out", "--work",
                             tmp_path / "work", "--scenes", "6,2,2", "--vision-steps", "2", "--extractor-steps",
                             "100000", "--reasoner-steps", "100000", "--copy-steps", "2"],
                            stderr=subprocess.PIPE, env=ENV, text=True)
    try:
        for line in proc.stderr:  # the extractor's process is tuning
            if "extractor: visual extraction tuning" in line:
                break
        (child,) = [int(pid) for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
                    if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
        proc.send_signal(signal.SIGKILL)  # no cleanup runs in the parent
        proc.wait(timeout=60)
        deadline = time.monotonic() + 60
        while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
            if Path(f"/proc/{child}/stat").read_text().split()[2] == "Z":  # exited; not yet reaped
                break
            time.sleep(0.5)
        alive = Path(f"/proc/{child}").exists() and Path(f"/proc/{child}/stat").read_text().split()[2] != "Z"
        if alive:
            os.kill(child, signal.SIGKILL)
        assert not alive, "the extractor trained on after its parent was killed"
        assert not (tmp_path / "out" / "extractor").exists()  # nothing half-trained was installed
    finally:
        proc.kill()


def test_demo_train_refuses_to_replace_a_folder_holding_a_users_file_before_training(tmp_path):
    from edgevlm import bundle

    out = tmp_path / "out"
    with bundle.atomic_directory(out / "reasoner") as tmp:  # an earlier run's reasoner ...
        (tmp / "config.json").write_text("{}")
    (out / "reasoner" / "notes.txt").write_text("mine")  # ... and the user's file beside it
    proc = subprocess.run([sys.executable, "-m", "edgevlm.demo", "train", "--out", out, "--work", tmp_path / "work",
                           "--scenes", "6,2,2"], capture_output=True, env=ENV, timeout=120)
    assert_one_line_error(proc, 2, f"{out / 'reasoner'} holds notes.txt, which edgevlm did not write")
    assert (out / "reasoner" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "work").exists()  # refused before any data or training


def test_the_shipped_demo_folders_are_edgevlms_to_replace():
    from edgevlm import bundle

    if not demo.available():
        pytest.skip("this checkout has no demo models")
    for folder in (demo.EXTRACTOR, demo.REASONER, demo.TEST_SET):  # their markers list exactly their files
        files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {bundle.MARKER}
        assert set(json.loads((folder / bundle.MARKER).read_text())["files"]) == files, folder
        bundle.check_output(folder, overwrite=True)  # so `python -m edgevlm.demo train` may replace them


def test_the_demo_preset_says_how_to_build_it_when_absent():
    if demo.available():
        pytest.skip("this checkout has the demo models")
    image = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"
    assert_one_line_error(edgevlm("run", image, "What is shown?", "--preset", "demo"), 1,
                          "python -m edgevlm.demo train")


# ---------------------------------------------------------------- the shipped demo models
ROOT = Path(__file__).resolve().parents[1]
shipped = pytest.mark.skipif(not demo.available(), reason="this checkout has no demo models")
DEMO_SAMPLE_FLOOR = 0.85  # extract-think accuracy a sample of the test split must reach (README: the whole split)


def _eval(*args) -> dict:
    proc = edgevlm("eval", *args, "--json", timeout=3000)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    return json.loads(proc.stdout)["results"]


@shipped
def test_the_readme_example_gets_the_scene_graphs_answer():
    import shlex

    from edgevlm.evaluation import normalize

    quickstart = (ROOT / "README.md").read_text().split("## Quickstart", 1)[1].split("```")[1]
    line = next(line for line in quickstart.splitlines() if line.startswith("edgevlm run"))
    label = json.loads(demo.EXAMPLE_LABEL.read_text())
    args = shlex.split(line)[1:]
    assert label["question"] in args and args[args.index("--preset") + 1] == "demo"
    proc = subprocess.run([sys.executable, "-m", "edgevlm", *args], cwd=ROOT, capture_output=True, env=ENV,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert normalize(proc.stdout.decode().strip().splitlines()[-1]) == normalize(label["answer"])


@shipped
def test_the_demo_answers_the_start_of_its_test_split():
    # the first 64 questions (9 scenes, every type); the whole split's accuracy is in README.md
    (result,) = _eval("--preset", "demo", "--limit", "64").values()
    assert result["extract-think"]["n"] == 64
    assert result["extract-think"]["accuracy"] >= DEMO_SAMPLE_FLOOR


@shipped
@pytest.mark.slow  # exports the demo three times and answers 3 x 160 questions
def test_int8_and_int4_demo_bundles_keep_the_accuracy(tmp_path):
    bundles = []
    for quant in ("fp32", "int8", "int4"):
        proc = edgevlm("export", "--preset", "demo", "--quant", quant, "--out", tmp_path / quant, timeout=1200)
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]
        bundles += ["--bundle", tmp_path / quant]
    results = _eval("--data", demo.TEST_SET / "items.jsonl", *bundles, "--limit", "160", "--temperature", "0")
    fp32, int8, int4 = (results[label]["extract-think"]["accuracy"] for label in results)
    assert fp32 >= DEMO_SAMPLE_FLOOR
    assert int8 >= fp32 - 0.02 and int4 >= fp32 - 0.05  # 160 questions: 1 and 3 points on the whole split


def test_the_built_heads_attend_one_and_two_tokens_back(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from edgevlm.train import tiny

    tiny._make_qwen3(tmp_path / "m", 0, text_extra=demo.TEXT)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32, attn_implementation="eager")
    before = [w.clone() for w in (model.model.layers[0].self_attn.q_proj.weight, model.lm_head.weight)]
    demo.previous_token_head(model, offsets=(1, 2))
    ids = torch.randint(4, model.config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        heads = model(input_ids=ids, output_attentions=True).attentions[0]  # layer 0: [batch, head, query, key]
    i = torch.arange(2, 300)
    one, two, other = heads[:, 0, i, i - 1], heads[:, 1, i, i - 2], heads[:, 2, i, i - 1]
    assert one.min() > 0.9 and two.min() > 0.9  # at every position
    assert other.mean() < 0.5  # a head not built does not
    assert not torch.equal(before[0], model.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(before[1], model.lm_head.weight)
    with pytest.raises(ValueError, match="key-value group"):
        demo.previous_token_head(model, offsets=(1, 2, 3))  # 4 heads in 2 groups: 2 share a key


def test_copy_pretraining_trains_in_place_and_keeps_the_previous_token_head(tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from edgevlm.train import tiny

    tiny._make_qwen3(tmp_path / "m", 0)
    demo._with_previous_token_head(tmp_path / "m")
    before = load_file(tmp_path / "m" / "model.safetensors")
    lines = []
    score = demo.pretrain_copying(tmp_path / "m", max_steps=50, batch_size=8, log=lines.append)
    assert 0.0 <= score <= 1.0 and len(lines) == 1 and f"{score:.3f}" in lines[0]
    after = load_file(tmp_path / "m" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32, attn_implementation="eager")
    ids = torch.randint(4, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        head = model(input_ids=ids, output_attentions=True).attentions[0][0, 0]
    assert head[torch.arange(1, 64), torch.arange(63)].mean() > 0.8
