"""int8/int4 export: the graphs really are quantized, the bundles run the whole pipeline, the fidelity report
is present and sane, per-component precisions are honoured, and the fidelity gate refuses bad bundles."""

import json
import os
import subprocess
import sys

import onnx
import pytest
from conftest import random_image
from hypothesis import given, settings
from hypothesis import strategies as st

from edgevlm import bundle as bundle_mod
from edgevlm.export.exporter import QuantPlan, export_bundle
from edgevlm.pipeline import Pipeline

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
FIDELITY_KEYS = {"top1_agreement", "mean_kl", "exact_match", "positions", "sequences", "tokens", "role", "size_ratio",
                 "prefill_top1", "prefill_kl", "decisive_top1", "decisive_positions"}


def ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def weight_matmuls(path) -> int:
    """MatMuls whose weight is a constant: what a weight quantizer must have replaced."""
    graph = onnx.load(str(path), load_external_data=False).graph
    consts = {i.name for i in graph.initializer}
    return sum(n.op_type == "MatMul" and n.input[1] in consts for n in graph.node)


@pytest.fixture(scope="session")
def quantized(tiny_dir, tmp_path_factory):
    """int4 (AWQ, head and MLP down projections int8) LLaVA-OV + Qwen3 with the default int8 vision tower,
    and int8 Idefics3 + Llama."""
    root = tmp_path_factory.mktemp("quantized")
    quiet = {"log": lambda m: None, "fidelity_samples": 3, "fidelity_tokens": 8}
    return {
        "int4": export_bundle(root / "int4", extractor=str(tiny_dir("llava_onevision")),
                              reasoner=str(tiny_dir("qwen3")), quant="int4", **quiet),
        "int8": export_bundle(root / "int8", extractor=str(tiny_dir("idefics3")), reasoner=str(tiny_dir("llama")),
                              quant="int8", **quiet),
    }


def test_graphs_are_quantized_as_planned(quantized):
    b = bundle_mod.load(quantized["int4"])
    ex, re = b.models["extractor"].graphs, b.models["reasoner"].graphs
    assert (ex["vision"].quant, ex["embed"].quant, ex["decoder"].quant, re["decoder"].quant) == (
        "int8", "int8", "int4", "int4")  # vision never int4 by default; the token embeddings 8-bit
    for g in (ex["decoder"], re["decoder"]):
        assert "MatMulNBits" in ops(b.file(g.file)) and weight_matmuls(b.file(g.file)) == 0
    # the token tables, the extractor's apart and the reasoner's inside its decoder: 8-bit, and not in a step's reads
    assert "Gather" not in ops(b.file(ex["embed"].file)) and "GatherBlockQuantized" in ops(b.file(ex["embed"].file))
    assert "GatherBlockQuantized" in ops(b.file(re["decoder"].file)) and re["decoder"].lookup_bytes > 0
    assert b.manifest.quantization["embed"] == "int8"
    vision = b.file(ex["vision"].file)  # int8 compute (test_int8_compute.py)
    assert "MatMulIntegerToFloat" in ops(vision) and weight_matmuls(vision) == 0
    b8 = bundle_mod.load(quantized["int8"])
    decoder = b8.file(b8.models["reasoner"].graphs["decoder"].file)
    assert {"MatMulIntegerToFloat", "MatMulNBits"} <= ops(decoder) and weight_matmuls(decoder) == 0
    assert b8.manifest.quantization["extractor"] == "int8" and not (b.path / ".reference").exists()


@pytest.mark.parametrize("name", ["int4", "int8"])
def test_fidelity_report_is_present_and_sane(quantized, name):
    report = bundle_mod.load(quantized[name]).manifest.fidelity
    assert list(report) == ["plan", "extract", "think"]
    for stage, r in report.items():
        assert set(r) == FIDELITY_KEYS | ({"feature_cosine"} if stage == "extract" else set())
        assert 0 <= r["prefill_top1"] <= 1 and r["prefill_kl"] >= 0
        if stage == "extract":
            assert 0.9 < r["feature_cosine"] <= 1.0 + 1e-9  # int8 vision tower vs fp32
        assert 0 <= r["top1_agreement"] <= 1 and 0 <= r["exact_match"] <= 1 and r["mean_kl"] >= 0
        assert r["positions"] == 3 * 8 and r["sequences"] == 3
        assert 0 < r["size_ratio"] < 1
        assert r["role"] == ("extractor" if stage == "extract" else "reasoner")


@pytest.mark.parametrize("name", ["int4", "int8"])
def test_quantized_bundles_run_the_whole_pipeline(quantized, name):
    result = Pipeline.from_bundle(quantized[name])(random_image(), "What is shown?", max_new_tokens=6,
                                                   think_budget=6)
    assert list(result.stages) == ["plan", "extract", "think"]
    assert all(s.new_tokens > 0 for s in result.stages.values())


def test_info_prints_the_fidelity_report(quantized):
    proc = subprocess.run([sys.executable, "-m", "edgevlm", "info", quantized["int4"]], capture_output=True,
                          env=ENV, timeout=120)
    out = proc.stdout.decode()
    assert proc.returncode == 0 and "fidelity vs fp32:" in out and "top-1 agree" in out and "features cos" in out
    proc = subprocess.run([sys.executable, "-m", "edgevlm", "info", quantized["int4"], "--json"],
                          capture_output=True, env=ENV, timeout=120)
    fidelity = json.loads(proc.stdout)["fidelity"]
    for stage in ("plan", "extract", "think"):
        assert {"top1_agreement", "mean_kl", "exact_match"} <= set(fidelity[stage])


def test_per_component_precision_and_gptq(tiny_dir, tmp_path):
    plan = QuantPlan(extractor="int4", reasoner="fp16", vision="int4", embed="int4", int4_method="gptq",
                     block_size=16, keep_int8=())
    path = export_bundle(tmp_path / "mixed", extractor=str(tiny_dir("llava_onevision")),
                         reasoner=str(tiny_dir("qwen3")), quant=plan, log=lambda m: None, fidelity_samples=2,
                         fidelity_tokens=4)
    b = bundle_mod.load(path)
    graphs = b.models["extractor"].graphs
    assert {k: g.quant for k, g in graphs.items()} == {"vision": "int4", "embed": "int4", "decoder": "int4"}
    assert "GatherBlockQuantized" in ops(b.file(graphs["embed"].file))
    assert b.models["reasoner"].graphs["decoder"].quant == "fp16"
    assert b.manifest.quantization["int4_method"] == "gptq"
    assert Pipeline.from_bundle(path)(random_image(), "q", mode="direct", max_new_tokens=3).stages["direct"]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_token_embeddings_quantize_to_block_gathers_within_half_a_step(tmp_path, bits, dtype):
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgevlm.export.quantize import quantize_embeddings

    rng = np.random.default_rng(bits)
    table = (rng.standard_normal((50, 96)) * rng.uniform(0.01, 3, (50, 1))).astype(dtype)  # 3 blocks: odd
    table[7] = 0  # an all-zero row
    other = numpy_helper.from_array(np.arange(50, dtype=np.int64), "other")  # a constant Gather: not an embedding
    elem = TensorProto.FLOAT if dtype == "float32" else TensorProto.FLOAT16
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["y"], name="embed"),
         helper.make_node("Gather", ["other", "input_ids"], ["z"], name="lookup")], "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "n"])],
        [helper.make_tensor_value_info("y", elem, None), helper.make_tensor_value_info("z", TensorProto.INT64, None)],
        [numpy_helper.from_array(table, "table"), other])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, tmp_path / "a.onnx")
    assert quantize_embeddings(tmp_path / "a.onnx", tmp_path / "b.onnx", bits) == ["embed"]
    assert ops(tmp_path / "b.onnx") == {"GatherBlockQuantized", "Gather"}
    ids = np.array([[0, 7, 49, 3]])
    y, z = ort.InferenceSession(tmp_path / "b.onnx", providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})
    assert y.dtype == table.dtype and (z == ids).all()
    ref = table[ids[0]].astype(np.float32).reshape(4, 3, 32)
    step = np.abs(ref).max(axis=2, keepdims=True) / (127 if bits == 8 else 7)
    err = np.abs(y.astype(np.float32).reshape(4, 3, 32) - ref)
    assert (err <= step / 2 * 1.01 + 1e-3 * (dtype == "float16")).all() and (y[0, 1] == 0).all()


def test_the_default_kl_target_warns_and_keeps_all_in_8_bits_where_it_is_out_of_reach(tiny_dir, tmp_path):
    """The default target (resolved for GPTQ int4, not asked for) never fails an export: out of reach, every
    MatMul goes to 8 bits with a warning. An explicit --fidelity-kl 0 turns it off."""
    from dataclasses import replace

    plan = QuantPlan(extractor="int4", reasoner="int4").resolved()
    assert (plan.fidelity_kl, plan.targets_given, plan.embed) == (0.01, False, "int8")
    assert QuantPlan(extractor="int4", reasoner="int4", fidelity_kl=0).resolved().fidelity_kl == 0
    assert QuantPlan(extractor="int4", reasoner="int4", int4_method="awq").resolved().fidelity_kl is None
    lines = []
    path = export_bundle(tmp_path / "b", extractor=str(tiny_dir("llava_onevision")), with_reasoner=False,
                         quant=replace(plan, fidelity_kl=1e-12), log=lines.append, fidelity_samples=1,
                         fidelity_tokens=4)
    assert any("warning: the default fidelity target (KL 1e-12) is out of reach" in line for line in lines), lines
    b = bundle_mod.load(path)
    graph = onnx.load(str(b.file(b.models["extractor"].graphs["decoder"].file)), load_external_data=False).graph
    bits = [next(a.i for a in n.attribute if a.name == "bits") for n in graph.node if n.op_type == "MatMulNBits"]
    assert bits and set(bits) == {8} and b.manifest.quantization["kept_int8"]["extractor"]


def test_a_bundle_below_the_fidelity_gate_is_not_written(tiny_dir, tmp_path):
    out = tmp_path / "gated"
    proc = subprocess.run([sys.executable, "-m", "edgevlm", "export", "--out", out, "--extractor",
                           tiny_dir("llava_onevision"), "--no-reasoner", "--quant", "int4", "--min-agreement", "1.0",
                           "--fidelity-samples", "2", "--fidelity-tokens", "8"], capture_output=True, env=ENV,
                          timeout=600)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert err.strip().splitlines()[-1].startswith("edgevlm: error: fidelity gate failed: extract top-1 agreement")
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor a partial one


@pytest.mark.parametrize("args, needle", [
    (["--quant", "int3"], "unknown precision 'int3'"),
    (["--quant", "int4", "--int4-method", "squeezellm"], "unknown int4 method"),
    (["--quant", "int4", "--block-size", "24"], "power of two"),
    (["--embed-quant", "int3", "--quant", "int8"], "unknown precision 'int3'"),
    (["--quant", "int4", "--int4-keep-int8", "attention"], "--int4-keep-int8"),
    (["--quant", "int4", "--fidelity-target", "1.5"], "--fidelity-target"),
    (["--quant", "int8", "--fidelity-target", "0.9"], "need --quant int4"),
    (["--quant", "int4", "--int4-method", "rtn", "--fidelity-kl", "0.01"], "need --quant int4"),
    (["--quant", "int4", "--fidelity-kl", "-1"], "--fidelity-kl"),
    (["--quant", "int4", "--int4-offsets", "on"], "--int4-offsets"),
    (["--min-agreement", "0.9"], "need a quantized export"),
    (["--calibration", "/nonexistent"], "calibration set"),
])
def test_bad_quantization_options_are_usage_errors(tiny_dir, tmp_path, args, needle):
    proc = subprocess.run([sys.executable, "-m", "edgevlm", "export", "--out", tmp_path / "x", "--extractor",
                           tiny_dir("llava_onevision"), "--no-reasoner", *args], capture_output=True, env=ENV,
                          timeout=120)
    err = proc.stderr.decode().strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and needle in err, err


def test_int4_keeps_the_sensitive_layers_in_int8(quantized):
    import onnx

    b = bundle_mod.load(quantized["int4"])
    graph = onnx.load(str(b.file(b.models["reasoner"].graphs["decoder"].file)), load_external_data=False).graph
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits")
            for n in graph.node if n.op_type == "MatMulNBits"}
    # tiny Qwen3, fused decoder: packed QKV, output, packed gate+up and down per layer, + the head;
    # the down projections and the head are 8-bit
    eight = {"lm_head/MatMul_Q8"} | {f"layers.{i}.mlp.down_proj/MatMul_Q8" for i in range(2)}
    assert len(bits) == 4 * 2 + 1 and {name for name, n in bits.items() if n == 8} == eight
    assert set(bits.values()) == {4, 8}
    blocks = {next(a.i for a in n.attribute if a.name == "block_size") for n in graph.node if n.name in eight}
    assert blocks == {b.manifest.quantization["keep_int8_block_size"]} == {64}


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_awq_folds_its_input_scales_into_the_layers_before(tiny_dir, tmp_path, family):
    """AWQ's per-channel input scales go into the RMSNorm weights (QKV, gate/up, LM head), the value
    projection's columns (o_proj) and the up projection's (down): the same function as with the Mul nodes,
    and the graph's nodes those of the fp32 graph it came from."""
    from contextlib import nullcontext

    import numpy as np
    import onnxruntime as ort

    from edgevlm.backends.onnx import OrtModel
    from edgevlm.bundle import Bundle
    from edgevlm.export import causal_lm, quantize
    from edgevlm.export.exporter import decoder_feeds

    entry = causal_lm.export_model(tiny_dir(family), tmp_path / "fp32", tmp_path, step=lambda what: nullcontext())
    model = OrtModel(Bundle.in_progress(tmp_path, {"m": entry}), "m")
    prompts = [(model.tokenizer.apply_chat_template(model.family.messages(q)), None)
               for q in ("Describe a red square.", "How many circles are there?", "Is it raining?")]
    feeds = decoder_feeds(model, prompts)
    src = tmp_path / entry.graphs["decoder"].file
    outputs, muls = {}, {}
    for fold in (False, True):
        dst = tmp_path / f"awq-{fold}.onnx"
        quantize.awq_scale(src, dst, quantize.FeedReader(feeds), fold=fold)
        graph = onnx.load(str(dst), load_external_data=False).graph
        muls[fold] = sum(n.op_type == "Mul" for n in graph.node)
        session = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
        outputs[fold] = [session.run(["logits"], feed)[0] for feed in feeds]
    layers = json.loads((tiny_dir(family) / "config.json").read_text())["num_hidden_layers"]
    source = sum(n.op_type == "Mul" for n in onnx.load(str(src), load_external_data=False).graph.node)
    assert muls[False] - muls[True] == 4 * layers + 1 and muls[True] == source
    for unfolded, folded in zip(outputs[False], outputs[True], strict=True):
        np.testing.assert_allclose(folded, unfolded, rtol=1e-4, atol=1e-4 * np.abs(unfolded).max())


def test_quantizing_leaves_the_callers_logging_alone(tmp_path):
    """ORT's quantizer module calls logging.basicConfig(level=INFO) on import: every library's INFO lines
    would print in the caller's process from then on (a second export's ONNX passes, for one)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    code = ("import logging, sys; from pathlib import Path; from edgevlm.export import quantize; "
            "quantize.int8_weight_only(Path(sys.argv[1]), Path(sys.argv[2])); "
            "logging.getLogger('onnx_ir.passes').info('chatter'); "
            "print(len(logging.getLogger().handlers), logging.getLogger().level)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx")],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr[-500:]
    assert "MatMulNBits" in ops(tmp_path / "q.onnx")
    assert proc.stdout.split() == ["0", "30"] and "chatter" not in proc.stderr  # no handler, WARNING


def test_gptq_writes_the_fast_kernel_format_and_errs_less_than_round_to_nearest(tmp_path):
    """Our GPTQ's MatMulNBits (uint4 zero points, blocks of 32) computes x @ dequantized W in ONNX Runtime, and
    on inputs whose channels differ in scale (as activations do) its output error is below round-to-nearest's."""
    from pathlib import Path

    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgevlm.export import gptq, quantize

    rng = np.random.default_rng(0)
    k, n = 96, 40
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = (rng.standard_normal((256, k)) * np.linspace(0.1, 3, k)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", n])],
                              [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    errors = gptq.quantize_graph(Path(tmp_path / "m.onnx"), Path(tmp_path / "q.onnx"),
                                 [{"x": x[:128]}, {"x": x[128:]}], accuracy_level=0)
    model = onnx.load(str(tmp_path / "q.onnx"))
    (node,) = model.graph.node
    attrs = {a.name: a.i for a in node.attribute}
    assert node.op_type == "MatMulNBits" and attrs["bits"] == 4 and attrs["block_size"] == 32
    zero_points = next(i for i in model.graph.initializer if i.name == node.input[3])
    assert zero_points.data_type == TensorProto.UINT8  # not float: the kernel's fast path
    y = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    q, scales, zeros = gptq.gptq(w, x.astype(np.float64).T @ x, 32)
    dequantized = gptq.dequantize(q, scales, zeros, 32)
    np.testing.assert_allclose(y, x @ dequantized, atol=1e-4 * np.abs(y).max())
    gptq_err = np.square(x @ dequantized - x @ w).mean()
    rtn_err = np.square(x @ quantize._rtn_int4(w, 32) - x @ w).mean()
    assert gptq_err < 0.85 * rtn_err, (gptq_err, rtn_err)
    assert errors["mm"] == pytest.approx(gptq_err / np.square(x @ w).mean(), rel=1e-3)


def test_gptq_offsets_reproduce_a_weight_on_a_float_minimum_grid_at_the_fast_format(tmp_path):
    """A weight on GGUF Q4_1's grid (per block of 32: d * q + m, m any float) has no uint4 zero point: GPTQ re-rounds
    it. With offsets the float zero point is split into a uint4 one and a per-block offset, carried as extra blocks
    over x's block sums, all one MatMulNBits (uint4 zero points, accuracy level 4 as exported): ONNX Runtime then
    computes x @ W within its int8 activations' error, against 60x that without. Off any grid, offsets
    never do worse, constant blocks included (they once came out 0.5 off)."""
    from pathlib import Path

    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgevlm.export import gptq

    rng = np.random.default_rng(2)
    k, n = 128, 48
    d = rng.uniform(0.01, 0.05, (k // 32, n)).astype(np.float32)
    m = (-d * rng.uniform(4, 11, d.shape)).astype(np.float32)  # the block's minimum: about a symmetric range
    q = rng.integers(0, 16, (k, n))
    q[0::32], q[1::32] = 0, 15  # each block spans its grid, as Q4_1's quantizer makes it
    on_grid = (np.repeat(d, 32, axis=0) * q + np.repeat(m, 32, axis=0)).astype(np.float32)
    x = rng.standard_normal((256, k)).astype(np.float32)

    def error(w, offsets, accuracy_level):
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", n])],
                                  [numpy_helper.from_array(w, "w")])
        src, dst = Path(tmp_path / "m.onnx"), Path(tmp_path / f"q{offsets}.onnx")
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
        gptq.quantize_graph(src, dst, [{"x": x}], accuracy_level=accuracy_level, offsets=offsets)
        nodes = {nd.op_type: nd for nd in onnx.load(str(dst), load_external_data=False).graph.node}
        assert "MatMul" in nodes if offsets else "MatMul" not in nodes  # the block sums
        zero_points = [i for i in onnx.load(str(dst)).graph.initializer if i.name == nodes["MatMulNBits"].input[3]]
        assert zero_points[0].data_type == TensorProto.UINT8
        y = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        return float(np.square(y - x @ w).mean() / np.square(x @ w).mean())

    exact, plain = error(on_grid, True, 0), error(on_grid, False, 0)
    assert exact < plain / 100, (exact, plain)  # fp32 activations: only the offsets' own rounding is left (1/300)
    assert error(on_grid, True, 4) < plain / 20  # the fast kernel's int8 activations on top (1/60)
    off_grid = rng.standard_normal((k, n)).astype(np.float32)
    off_grid[32:64, :8] = 0.0  # constant blocks (a hand-built head's zeros) stay exact: no range to scale to
    assert error(off_grid, True, 0) <= error(off_grid, False, 0) * 1.02


@pytest.mark.parametrize("store", ["dict", "spilled"])
def test_gptq_cache_redoes_a_matmul_whose_weight_changed(tmp_path, store):
    """The fidelity target re-exports with GPTQ's per-MatMul cache; smoothing a newly kept layer's input can scale
    an int4 layer's columns, so a cached result is reused only for the same weight: scaled columns come out scaled
    (GPTQ is column-wise), an unchanged weight comes out the same. The input's X^T X is computed once (the graph
    runs on the feeds once) and dropped when no int4 MatMul reads that input any more; in memory or on disk
    (gptq.SpilledGrams, what the export keeps)."""
    from pathlib import Path

    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgevlm.export import gptq

    rng = np.random.default_rng(1)
    k, n = 64, 24
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((128, k)).astype(np.float32)
    cache, grams, outputs, runs = {}, {} if store == "dict" else gptq.SpilledGrams(), [], []

    class Feeds:
        def __iter__(self):
            runs.append(1)
            return iter([{"x": x}])

    for i, weight in enumerate((w, w, w * np.linspace(0.5, 4, n, dtype=np.float32))):
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", n])],
                                  [numpy_helper.from_array(weight, "w")])
        src, dst = Path(tmp_path / f"m{i}.onnx"), Path(tmp_path / f"q{i}.onnx")
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
        gptq.quantize_graph(src, dst, Feeds(), accuracy_level=0, cache=cache, grams=grams)
        outputs.append(ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0])
    np.testing.assert_array_equal(outputs[1], outputs[0])
    np.testing.assert_allclose(outputs[2], outputs[0] * np.linspace(0.5, 4, n), rtol=1e-4, atol=1e-4)
    assert len(runs) == 1 and set(grams) == {"x"}
    np.testing.assert_allclose(grams["x"], x.astype(np.float64).T @ x, rtol=1e-9)
    gptq.quantize_graph(src, tmp_path / "none.onnx", Feeds(), exclude=["mm"], cache=cache, grams=grams)
    assert dict(grams) == {} and len(runs) == 1  # nothing left in int4 reads x


def test_spilled_grams_live_on_disk_read_only_and_go_with_their_owner():
    """X^T X kept across the fidelity target's steps sits in files, not memory: each read is a read-only memory map
    of exactly what was stored; a dropped one's file goes, and the directory goes on close() or when the object
    is collected. Names are tensor names, '/' and all."""
    import gc

    import numpy as np

    from edgevlm.export import gptq

    rng = np.random.default_rng(2)
    grams = gptq.SpilledGrams()
    a, b = rng.standard_normal((5, 5)), rng.standard_normal((3, 3)).astype(np.float32)
    grams.update({"/layers.0/input_layernorm/output_0": a, "b": b})
    read = grams["/layers.0/input_layernorm/output_0"]
    assert isinstance(read, np.memmap) and not read.flags.writeable
    np.testing.assert_array_equal(read, a)
    assert grams["b"].dtype == np.float64 and np.array_equal(grams["b"], b.astype(np.float64))
    files = sorted(grams.dir.iterdir())
    assert len(files) == 2 and sorted(grams) == ["/layers.0/input_layernorm/output_0", "b"]
    grams["b"] = b * 2  # replaced: one file per name
    assert len(list(grams.dir.iterdir())) == 2 and np.array_equal(grams["b"], b.astype(np.float64) * 2)
    del grams["b"]
    assert len(grams) == 1 and len(list(grams.dir.iterdir())) == 1
    folder = grams.dir
    del read
    grams.close()
    assert not folder.exists()
    other = gptq.SpilledGrams()
    other["x"] = a
    folder = other.dir
    del other
    gc.collect()
    assert not folder.exists()


def test_a_full_disk_under_spilled_grams_is_a_one_line_error_naming_tmpdir(monkeypatch):
    import numpy as np

    from edgevlm.errors import ModelError
    from edgevlm.export import gptq

    grams = gptq.SpilledGrams()
    grams["a"] = np.ones((4, 4))

    def full(path, array):
        open(path, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    with pytest.raises(ModelError, match=r"X\^T X in .*\(0\.0 GB needed so far\): No space left on device; point "
                                         "TMPDIR at a disk with room"):
        grams["b"] = np.ones((8, 8))
    assert sorted(grams) == ["a"] and len(list(grams.dir.iterdir())) == 1  # the partial file is gone
    def unwritable(prefix):
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(gptq.tempfile, "mkdtemp", unwritable)
    with pytest.raises(ModelError, match="scratch directory under .*: Permission denied; point TMPDIR"):
        gptq.SpilledGrams()


def test_fidelity_target_keeps_the_costliest_matmuls_in_8_bits_or_refuses(tiny_dir, tmp_path):
    """--fidelity-target moves int4 MatMuls to 8 bits, costliest first, until the calibration agreement reaches
    it; export names them and the manifest lists them. A target even all-8-bit misses is a one-line error."""
    args = [sys.executable, "-m", "edgevlm", "export", "--extractor", tiny_dir("llava_onevision"), "--no-reasoner",
            "--quant", "int4", "--fidelity-samples", "2", "--fidelity-tokens", "8"]
    proc = subprocess.run([*args, "--out", tmp_path / "b", "--fidelity-target", "0.9"], capture_output=True,
                          env=ENV, timeout=600)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    b = bundle_mod.load(tmp_path / "b")
    kept = b.manifest.quantization["kept_int8"]["extractor"]
    assert kept and f"kept in 8 bits for the fidelity target: {', '.join(kept)}" in err
    graph = onnx.load(str(b.file(b.models["extractor"].graphs["decoder"].file)), load_external_data=False).graph
    bits = {n.name.rsplit("_Q", 1)[0]: next(a.i for a in n.attribute if a.name == "bits")
            for n in graph.node if n.op_type == "MatMulNBits"}
    assert all(bits[name] == 8 for name in kept) and 4 in bits.values()
    assert b.manifest.quantization["fidelity_target"] == 0.9 and b.manifest.quantization["fidelity_kl"] is None
    info = subprocess.run([sys.executable, "-m", "edgevlm", "info", tmp_path / "b"], capture_output=True, env=ENV,
                          timeout=120).stdout.decode()
    assert f"kept in 8 bits for the fidelity target (top-1 0.9): {', '.join(kept)}" in info
    proc = subprocess.run([*args, "--out", tmp_path / "c", "--fidelity-target", "1"], capture_output=True, env=ENV,
                          timeout=600)
    err = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 1 and err[-1].startswith("edgevlm: error: the fidelity target (top-1 1.0) is out of "
                                                       "reach")
    assert not (tmp_path / "c").exists()


def _on_q4_1_grid(src, dst):
    """A copy of model directory `src` whose language model's linear weights sit on GGUF Q4_1's grid: per block of
    32 input channels d * q + m, q in 0..15 spanning the block, d and m any floats (what a GGUF import gives)."""
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    snapped = 0
    for name, w in weights.items():
        if "language_model" in name and name.endswith("proj.weight") and w.shape[1] % 32 == 0:
            blocks = w.astype(np.float64).reshape(w.shape[0], -1, 32)
            lo, hi = blocks.min(axis=2, keepdims=True), blocks.max(axis=2, keepdims=True)
            d = (hi - lo) / 15
            weights[name] = (np.round((blocks - lo) / d) * d + lo).reshape(w.shape).astype(w.dtype)
            snapped += 1
    assert snapped >= 8
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_int4_reproduces_a_gguf_q4_1_grid_and_adds_nothing_off_it(tiny_dir, tmp_path):
    """Weights on a grid with a float minimum per block (GGUF's Q4_1: SmolLM2's) have no uint4 zero point, so int4
    re-rounds them. By default the export finds such MatMuls and gives them float zero points as extra blocks
    over their input's block sums (gptq.with_offsets): they then compute the model's own weights, and the extract
    stage stays far nearer fp32 than with --int4-offsets off. The manifest lists them and info counts them; a
    model off any grid gets none, so no extra node."""
    model = _on_q4_1_grid(tiny_dir("llava_onevision"), tmp_path / "q4_1")
    args = [sys.executable, "-m", "edgevlm", "export", "--no-reasoner", "--quant", "int4", "--fidelity-samples", "3",
            "--fidelity-tokens", "8", "--fidelity-kl", "0"]
    reports = {}
    for mode, extractor, offsets in [("auto", model, "auto"), ("off", model, "off"),
                                     ("random", tiny_dir("llava_onevision"), "auto")]:
        proc = subprocess.run([*args, "--out", tmp_path / mode, "--extractor", extractor, "--int4-offsets", offsets],
                              capture_output=True, env=ENV, timeout=600)
        assert proc.returncode == 0, proc.stderr.decode()
        b = bundle_mod.load(tmp_path / mode)
        q, reports[mode] = b.manifest.quantization, b.manifest.fidelity["extract"]
        graph = onnx.load(str(b.file(b.models["extractor"].graphs["decoder"].file)), load_external_data=False).graph
        four = {n.name.removesuffix("_Q4"): n.input[0] for n in graph.node if n.op_type == "MatMulNBits"
                and next(a.i for a in n.attribute if a.name == "bits") == 4}
        zero_points = {i.data_type for i in graph.initializer if i.name.endswith("_zero_points")}
        assert four and zero_points == {onnx.TensorProto.UINT8}  # the fast kernel's format either way
        if mode == "auto":  # every int4 MatMul (the head and down projections are 8-bit) reads its block sums
            assert sorted(q["offsets"]["extractor"]) == sorted(four) and q["int4_offsets"] is True
            assert all(x.endswith(".with_blocksums") for x in four.values())
            info = subprocess.run([sys.executable, "-m", "edgevlm", "info", tmp_path / mode], capture_output=True,
                                  env=ENV, timeout=120).stdout.decode()
            assert f"int4 on the weights' own grid (float zero points, block sums): {len(four)} MatMuls" in info
        else:  # asked not to, or random weights: off any grid
            assert q["offsets"] == {} and not any(x.endswith(".with_blocksums") for x in four.values())
    # re-rounding the grid costs the extract stage; reproducing it leaves the int8 activations' error alone
    assert reports["auto"]["mean_kl"] < reports["off"]["mean_kl"] / 3, reports


@given(seed=st.integers(0, 2**32 - 1), blocks=st.integers(1, 6), n=st.integers(1, 600), d=st.floats(1e-4, 1.0))
@settings(max_examples=60, deadline=None)
def test_a_weight_is_on_a_float_grid_only_where_every_block_is_d_q_plus_m(seed, blocks, n, d):
    """on_float_grid, which decides where the export adds block sums: any weight made of Q4_1 blocks (d * q + m per
    block of 32, q in 0..15 spanning it; constant blocks too) is on it; continuous values, the grid with a tenth
    of a step of noise, or Q4_0's symmetric grid (which uint4 zero points hold as it is), are not."""
    import numpy as np

    from edgevlm.export import gptq

    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, (blocks, 32, n))
    q[:, 0], q[:, 1] = 0, 15
    scale = d * rng.uniform(0.5, 2.0, (blocks, 1, n))
    scale[0, 0, : n // 7] = 0.0  # some constant blocks
    m = -scale * (rng.integers(0, 12, scale.shape) + rng.uniform(0.1, 0.9, scale.shape))  # -m / d: no integer
    grid = (q * scale + m).reshape(blocks * 32, n).astype(np.float32)
    assert gptq.on_float_grid(grid, 32)
    noisy = grid + (0.1 * np.repeat(scale.reshape(blocks, n), 32, axis=0) * rng.standard_normal(grid.shape))
    assert not gptq.on_float_grid(noisy.astype(np.float32), 32) or not scale.any()
    assert not gptq.on_float_grid(rng.standard_normal((blocks * 32, n)).astype(np.float32), 32)
    assert not gptq.on_float_grid(grid[:-1], 32)  # not whole blocks: no block sums
    q4_0 = ((q - 8) * scale).reshape(blocks * 32, n).astype(np.float32)  # GGUF's Q4_0: zero point 8 already
    assert not gptq.on_float_grid(q4_0, 32)
