"""`edgevlm bench`, `run --trace` and the memory accounting, on a tiny bundle. The numbers themselves are
timings (not asserted); their structure, token counts, byte counts and ratios are."""

import copy
import json
import os
import subprocess
import sys

import jsonschema
import numpy as np
import pytest
from conftest import random_image
from PIL import Image

from edgevlm import bench as benchmod
from edgevlm import bundle as bundle_mod
from edgevlm.pipeline import Pipeline

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
FIXED = 6


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edgevlm", *map(str, args)], capture_output=True, env=ENV,
                          timeout=600)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "frame.png"
    random_image(60, 80).save(path)
    return path


@pytest.fixture(scope="module")
def benched(tiny_bundle, image, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = _cli("bench", "--bundle", tiny_bundle, "--image", image, "--question", "What is shown?",
                "--question", "How many shapes?", "--warmup", 1, "--runs", 3, "--fixed-tokens", FIXED,
                "--json", out / "b.json", "--plot", out / "b.png")
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return proc, out


def test_bench_json_validates_against_the_documented_schema(benched):
    proc, out = benched
    schema = json.loads(benchmod.SCHEMA_FILE.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    doc = json.loads((out / "b.json").read_text())
    jsonschema.validate(doc, schema)
    (result,) = doc["results"]
    assert list(result["stages"]) == ["plan", "extract", "think"]
    for stage in result["stages"].values():
        assert stage["new_tokens"] == FIXED  # --fixed-tokens: EOS ignored, every run the same length
        assert stage["latency_ms"]["p50"] <= stage["latency_ms"]["p90"] <= stage["latency_ms"]["max"]
        assert 0 < stage["kv_used_mb"] <= stage["kv_allocated_mb"]
        assert stage["roofline"]["bytes_per_token"] > 0 and 0 < stage["roofline"]["fraction"] <= 1
    assert result["stages"]["extract"]["vision_ms"]["p50"] > 0
    assert "p50 ms" in proc.stdout.decode() and "peak RSS" in proc.stdout.decode()
    assert "run 3/3" in proc.stderr.decode()  # progress


def test_bench_plot_is_a_png_with_a_bar_per_stage(benched):
    _, out = benched
    with Image.open(out / "b.png") as img:
        img.verify()
    pixels = np.asarray(Image.open(out / "b.png").convert("RGB")).reshape(-1, 3)
    for color in benchmod.COLORS["plan"], benchmod.COLORS["extract"], benchmod.COLORS["think"]:
        assert (pixels == color).all(-1).sum() > 100  # each stage's decode segment is drawn


def test_compare_prints_ratios_of_two_saved_runs(benched, tmp_path):
    _, out = benched
    doc = json.loads((out / "b.json").read_text())
    slower = copy.deepcopy(doc)
    slower["results"][0]["total_ms"]["p50"] *= 2
    slower["results"][0]["stages"]["think"]["decode_tok_s"] /= 4
    (tmp_path / "slow.json").write_text(json.dumps(slower))
    proc = _cli("bench", "--compare", out / "b.json", tmp_path / "slow.json")
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stdout.decode().splitlines()
    total, think = (next(line for line in lines if f" {stage} " in line) for stage in ("total", "think"))
    assert "2.00x" in total and "0.25x" in think


def test_trace_is_chrome_trace_json_with_every_decode_step(tiny_bundle, image, tmp_path):
    trace = tmp_path / "run.json"
    proc = _cli("run", image, "What is shown?", "--bundle", tiny_bundle, "--max-new-tokens", 5, "--think-budget", 5,
                "--json", "--trace", trace)
    assert proc.returncode == 0, proc.stderr.decode()
    result = json.loads(proc.stdout)
    events = json.loads(trace.read_text())["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)
    for stage, tokens in result["tokens"].items():
        names = [e["name"] for e in spans if e["cat"] == stage]
        assert {"preprocess", "prefill", "decode"} <= set(names)
        assert names.count("step") == tokens["generated"] - 1  # the first token comes from the prefill
    by_track = {}
    for e in spans:  # Perfetto needs the spans of one track to nest, never to overlap partly
        by_track.setdefault(e["tid"], []).append((e["ts"], e["ts"] + e["dur"]))
    for intervals in by_track.values():
        intervals.sort()
        for (_, a1), (b0, b1) in zip(intervals, intervals[1:], strict=False):
            assert b0 >= a1 - 1e-3 or b1 <= a1 + 1e-3


def test_kv_bytes_match_the_cache_layout(tiny_bundle, image):
    pipe = Pipeline.from_bundle(str(tiny_bundle))
    result = pipe(str(image), "What is shown?", max_new_tokens=4, think_budget=4)
    manifest = bundle_mod.load(tiny_bundle).manifest
    for name, stage in result.stages.items():
        kv = manifest.models[manifest.stages[name]].kv
        per_position = 2 * kv.layers * kv.kv_heads * kv.head_dim * 4  # keys and values, fp32
        # the last sampled token is never fed back, so the cache holds prompt + new - 1 positions
        assert stage.memory["kv_used"] == per_position * (stage.prompt_tokens + stage.new_tokens - 1)
        sets = 1 if kv.shared else 2  # one buffer written in place (fused decoders), or two used in turn
        assert stage.memory["kv_allocated"] >= sets * stage.memory["kv_used"]
        if kv.shared:  # reserved for the whole planned context at once
            role = manifest.stages[name]
            assert stage.memory["kv_allocated"] == per_position * pipe.memory_plan.max_context[role]
        assert stage.memory["weights"]["decoder"] > 0
    assert result.peak_rss_bytes > 0 and result.to_dict()["memory"]["extract"]["kv_used_mb"] > 0


@pytest.mark.parametrize("args, code, needle", [
    (["--bundle", "B"], 2, "--image"),
    (["--bundle", "B", "--image", "IMG", "--question", "q", "--target", "mars"], 2, "unknown target"),
    (["--bundle", "B", "--image", "IMG", "--question", "q", "--json", "/no/such/dir/x.json"], 2, "folder"),
    (["--compare", "IMG", "IMG"], 2, "not a bench JSON file"),
])
def test_bad_bench_input_is_one_line(tiny_bundle, image, args, code, needle):
    args = [str(tiny_bundle) if a == "B" else str(image) if a == "IMG" else a for a in args]
    proc = _cli("bench", *args)
    err = proc.stderr.decode().strip()
    assert proc.returncode == code and len(err.splitlines()) == 1 and needle in err, err


def test_peak_rss_counts_allocations_and_resets_per_bundle():
    from edgevlm.profiler import peak_rss_bytes, reset_peak_rss

    if not reset_peak_rss():
        pytest.skip("this system cannot reset the peak RSS")
    base = peak_rss_bytes()
    block = np.ones(200_000_000 // 8)  # written, so resident
    high = peak_rss_bytes()
    assert high >= base + 190_000_000
    del block
    reset_peak_rss()
    assert peak_rss_bytes() < high - 190_000_000


def test_the_roofline_leaves_out_token_embedding_rows_a_step_does_not_read(tiny_bundle, tiny_dir, image):
    b = bundle_mod.load(tiny_bundle)
    config = json.loads((tiny_dir("qwen3") / "config.json").read_text())
    # the reasoner's decoder looks its tokens up in-graph (untied: the head has its own matrix)
    assert b.models["reasoner"].graphs["decoder"].lookup_bytes == config["vocab_size"] * config["hidden_size"] * 4
    assert b.models["extractor"].graphs["decoder"].lookup_bytes == 0  # it takes embeddings as input
    result = Pipeline.from_bundle(tiny_bundle)(image, "What is shown?", max_new_tokens=4)
    think = result.stages["think"]
    lookup = b.models["reasoner"].graphs["decoder"].lookup_bytes
    assert think.memory["step_weights"] == think.memory["weights"]["decoder"] - lookup
    roof = benchmod.roofline([think], 10.0, lambda nbytes: 20.0)
    kv = think.memory["kv_used"] / (think.prompt_tokens + think.new_tokens)
    kv_read = kv * (think.prompt_tokens + think.new_tokens / 2)
    assert roof["bytes_per_token"] == int(think.memory["step_weights"] + kv_read)
    achieved = roof["bytes_per_token"] * 10.0 / 1e9
    assert roof["fraction"] == round(achieved / 20.0, 4) and not roof["ceiling_is_decode"]
    # a decode that reads faster than the read test: the test under-stated the memory, never above 100%
    slow = benchmod.roofline([think], 10.0, lambda nbytes: achieved / 2)
    assert slow["fraction"] == 1.0 and slow["ceiling_is_decode"]
    assert slow["bandwidth_gb_s"] == slow["achieved_gb_s"] == roof["achieved_gb_s"]


def test_bench_data_lines_are_checked_like_eval_items(tmp_path):
    from edgevlm import bench
    from edgevlm.errors import UsageError

    random_image().save(tmp_path / "a.png")
    data = tmp_path / "items.jsonl"
    data.write_text('{"image": "a.png", "question": "What?"}\n{"image": "a.png", "question": ["What?"]}\n')
    with pytest.raises(UsageError, match=r"items.jsonl:2: \"question\" must be a string"):
        bench.load_items([], [], str(data))
    data.write_text('{"image": "a.png", "question": "What?", "choices": ["x", "y"]}\n')
    [(image, question, choices)] = bench.load_items([], [], str(data))
    assert question == "What?" and choices == ["x", "y"] and image.size == (70, 50)


def test_export_refuses_a_nan_fidelity_gate(tmp_path):
    from edgevlm.errors import UsageError
    from edgevlm.export.exporter import export_bundle

    with pytest.raises(UsageError, match="min_agreement must be a finite number"):
        export_bundle(tmp_path / "b", preset="demo", min_agreement=float("nan"), log=lambda m: None)
    assert not (tmp_path / "b").exists()


def test_bench_run_times_each_system_into_a_document_that_validates(tiny_bundle, image):
    from edgevlm.loading import Source

    items = benchmod.load_items([str(image)], ["What is shown?"], None)
    source = Source(bundle=str(tiny_bundle), vision_cache_mb=0, prefix_cache_mb=0)
    messages = []
    doc = benchmod.run([source], items, options={"mode": "direct", "fixed_tokens": 3}, warmup=0, runs=2,
                       target="jetson-orin-nano", progress=messages.append)
    benchmod.validate(doc)
    (result,) = doc["results"]
    assert result["label"] == source.label() and result["source"] == {"bundle": str(tiny_bundle)}
    assert list(result["stages"]) == ["direct"] and result["stages"]["direct"]["new_tokens"] == 3
    assert result["stages"]["direct"]["roofline"]["bandwidth_gb_s"] == 68.0
    assert doc["machine"]["bandwidth_source"] == "jetson-orin-nano"
    assert {k: doc["settings"][k] for k in ("mode", "runs", "warmup", "items", "vision_cache", "prefix_cache")} == {
        "mode": "direct", "runs": 2, "warmup": 0, "items": 1, "vision_cache": False, "prefix_cache": False}
    assert messages[0] == f"loading {tiny_bundle}" and messages[-1].startswith(f"{result['label']}: run 2/2")
    out = image.parent / "doc.json"
    benchmod.write(doc, out)
    assert benchmod.read(str(out)) == doc


def test_bench_run_checks_its_options_before_loading_anything(tmp_path, image):
    from edgevlm.errors import UsageError
    from edgevlm.loading import Source

    items = benchmod.load_items([str(image)], ["q"], None)
    missing = [Source(bundle=str(tmp_path / "none"))]  # loading it would be a BundleError
    with pytest.raises(UsageError, match="unknown mode 'dream'"):
        benchmod.run(missing, items, options={"mode": "dream"})
    with pytest.raises(UsageError, match="unknown target 'mars'"):
        benchmod.run(missing, items, target="mars")


def test_bandwidth_is_the_targets_figure_or_a_read_test_here_with_the_runs_threads(monkeypatch):
    from edgevlm import profiler, targets
    from edgevlm.errors import UsageError

    assert targets.bandwidth("jetson-orin-nx") == {"bandwidth_gb_s": 102.4, "bandwidth_source": "jetson-orin-nx"}
    assert targets.ceiling("jetson-orin-nx")(123) == 102.4
    monkeypatch.setenv("EDGEVLM_THREADS", "1")
    for target in (None, "cpu"):  # cpu names this machine: no figure, so it is measured
        measured = targets.bandwidth(target)
        assert measured["bandwidth_source"] == "read test, 1 threads" and measured["bandwidth_gb_s"] > 0
    with pytest.raises(UsageError, match="unknown target 'mars'"):
        targets.bandwidth("mars")
    # a working set that fits a cache is compared with a read of its size, never with the DRAM's rate
    small, dram = profiler.measure_bandwidth(2**20, 1), profiler.measure_bandwidth(profiler.DRAM_PROBE_BYTES, 1)
    assert small > 0 and dram > 0
    assert profiler.measure_bandwidth(3 * 2**20, 1) == profiler.measure_bandwidth(4 * 2**20, 1)  # one probe a size
    # the ceiling reads again at each call: the figure is the fastest read of that size so far, never lower
    again = targets.ceiling(None)(2**20)
    assert again >= small and profiler.measure_bandwidth(2**20, 1) == again


def test_profile_table_has_a_row_per_stage_and_a_total(tiny_bundle, image):
    from edgevlm.profiler import profile_table

    pipe = Pipeline.from_bundle(str(tiny_bundle))
    pipe(str(image), "What is shown?", max_new_tokens=2, think_budget=2)  # the second run hits the caches
    result = pipe(str(image), "What is shown?", max_new_tokens=2, think_budget=2)
    lines = profile_table(result).splitlines()
    assert lines[0].split()[:3] == ["stage", "prompt", "new"]
    assert [line.split()[0] for line in lines[1:-1]] == ["plan", "extract", "think"]
    assert "(cached)" in lines[2]  # the extract stage's vision features came from the cache
    assert lines[-1].startswith(f"total {result.total_ms:.1f} ms") and "peak RSS" in lines[-1]


def test_the_flop_counts_are_those_pytorch_counts_for_the_same_models(tiny_bundle, tiny_dir):
    """The compute roofline's FLOPs (edgevlm.memory) against torch's FlopCounterMode on the HF models the bundle
    was exported from, eager attention (whose full score matrix torch counts; edgevlm counts the causal half)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from edgevlm import memory

    b = bundle_mod.load(tiny_bundle, verify=False)
    spec = b.models["reasoner"]
    lm = AutoModelForCausalLM.from_pretrained(tiny_dir("qwen3"), attn_implementation="eager").eval()
    q = spec.dims.heads * spec.kv.head_dim
    for n in (1, 9):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            lm(torch.ones(1, n, dtype=torch.long), logits_to_keep=1)
        causal_to_full = 4 * spec.kv.layers * q * (n * n - n * (n + 1) / 2)
        assert memory.prefill_flops(spec, n) + causal_to_full == counter.get_total_flops()
    assert memory.prefill_flops(spec, 4, past=5) > memory.prefill_flops(spec, 4)  # attention to the cached ones
    assert memory.prefill_flops(spec, 0) is None

    vlm = AutoModelForImageTextToText.from_pretrained(tiny_dir("llava_onevision"), attn_implementation="eager").eval()
    config = vlm.config.vision_config
    spec = b.models["extractor"]
    assert spec.dims.vision.layers == config.num_hidden_layers
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        vlm.model.vision_tower(torch.zeros(3, 3, config.image_size, config.image_size))
    patch_embedding = 3 * spec.dims.vision.tokens * 2 * 3 * config.patch_size**2 * config.hidden_size
    assert memory.vision_flops(spec, 3) + patch_embedding == counter.get_total_flops()


def test_the_compute_roofline_compares_prefill_and_vision_with_a_gemm_measured_here(tiny_bundle, image):
    from edgevlm.manifest import Manifest
    from edgevlm.profiler import measure_gemm

    for precision in ("fp32", "int8"):
        assert measure_gemm(precision, 1, repeats=1) > 0
    result = Pipeline.from_bundle(str(tiny_bundle), vision_cache_mb=0)(image, "What is shown?", max_new_tokens=4)
    b = bundle_mod.load(tiny_bundle, verify=False)
    extract = benchmod.compute_roofline([result.stages["extract"]], b.models["extractor"])
    assert result.stages["extract"].memory["vision_crops"] > 0
    for part in ("prefill", "vision"):
        assert extract[f"{part}_gflop_s"] > 0 and 0 < extract[f"{part}_fraction"] <= 1
    assert benchmod.compute_roofline([result.stages["think"]], None)["prefill_gflop_s"] is None  # no bundle
    think = benchmod.compute_roofline([result.stages["think"]], b.models["reasoner"])
    assert think["prefill_fraction"] > 0 and think["vision_gflop_s"] is None
    # a bundle written before the vision tower's layer count was recorded has no vision figure, and loads
    raw = b.manifest.to_dict()
    del raw["models"]["extractor"]["dims"]["vision"]["layers"]
    old = Manifest.from_dict(raw).models["extractor"]
    assert old.dims.vision.layers is None
    assert benchmod.compute_roofline([result.stages["extract"]], old)["vision_gflop_s"] is None


def test_a_stage_faster_than_the_gemm_probe_is_at_its_own_ceiling(tiny_bundle, image, monkeypatch):
    result = Pipeline.from_bundle(str(tiny_bundle), vision_cache_mb=0)(image, "What is shown?", max_new_tokens=4)
    b = bundle_mod.load(tiny_bundle, verify=False)
    measured = benchmod.compute_roofline([result.stages["extract"]], b.models["extractor"])
    # the probe is one shape; a model whose layers run faster than it must not read above 100%
    monkeypatch.setattr(benchmod, "measure_gemm", lambda precision: measured["prefill_gflop_s"] / 3)
    capped = benchmod.compute_roofline([result.stages["extract"]], b.models["extractor"])
    assert capped["prefill_fraction"] == 1.0 and capped["prefill_ceiling_is_stage"]
    assert capped["prefill_gflop_s"] == measured["prefill_gflop_s"]
    assert not measured.get("prefill_ceiling_is_stage")


def test_the_shipped_gemm_probes_are_the_ones_the_toolchain_builds():
    import onnx

    from edgevlm.export import probes

    for precision, built in probes.graphs().items():
        shipped = onnx.load(probes.PROBES / f"gemm_{precision}.onnx")
        assert shipped.graph == built.graph and shipped.opset_import == built.opset_import
