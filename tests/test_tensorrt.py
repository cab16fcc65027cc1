"""The TensorRT bundle flavour (edgevlm.export.tensorrt): the operator checker refuses what TensorRT's ONNX parser
cannot parse, naming the node; int8/int4 weights are DequantizeLinear in the layout TensorRT reads; exported
bundles pass the checker and run under ONNX Runtime on CPU close to the PyTorch fp32 reference."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import prefill_each, random_image
from onnx import TensorProto, helper, numpy_helper

from edgevlm import bundle as bundle_mod
from edgevlm.backends.onnx import OrtModel
from edgevlm.errors import UsageError
from edgevlm.manifest import Manifest

pytest.importorskip("torch")

from edgevlm.export import tensorrt  # noqa: E402
from edgevlm.export.exporter import QuantPlan, export_bundle  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
FP16_TOL = 5e-3  # fp16 weights on the tiny models' logits (as tests/test_export.py's fp16 bundle)


def _model(nodes, inits=(), opset=21, inputs=None, outputs=None):
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])]
    outputs = outputs or [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _matmul_graph(path, w):
    """x [b, K] @ W: one MatMul with a constant weight, saved at `path`."""
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")], [numpy_helper.from_array(w, "w")],
                   opset=20, inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", w.shape[0]])],
                   outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", w.shape[1]])])
    onnx.save(model, str(path))
    return path


def _exact(path):
    """An ONNX Runtime session that dequantizes exactly (as the backend does for TensorRT bundles)."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _dequantized(path) -> np.ndarray:
    """The weight a single DequantizeLinear of `path` produces, computed by onnx's reference evaluator."""
    from onnx.reference import ReferenceEvaluator

    model = onnx.load(str(path))
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    inits = {i.name: i for i in model.graph.initializer}
    probe = _model([dq], [inits[name] for name in dq.input], inputs=[],
                   outputs=[helper.make_tensor_value_info(dq.output[0], TensorProto.FLOAT, None)])
    return ReferenceEvaluator(probe).run(None, {})[0]


# ---------------------------------------------------------------- the checker
def test_checker_names_each_node_tensorrt_cannot_parse():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])
    cases = {
        "node attn (com.microsoft.GroupQueryAttention): not a standard ONNX operator": helper.make_node(
            "GroupQueryAttention", ["x"], ["y"], name="attn", domain="com.microsoft"),
        "node uniq (Unique): marked unsupported in TensorRT's ONNX operator table": helper.make_node(
            "Unique", ["x"], ["y"], name="uniq"),
        "node norm (SimplifiedLayerNormalization): not listed": helper.make_node(  # ORT's, in the default domain
            "SimplifiedLayerNormalization", ["x"], ["y"], name="norm"),
        "node mean (ReduceMean): input 1 must be a constant": helper.make_node(
            "ReduceMean", ["x", "axes"], ["y"], name="mean"),
    }
    for expected, node in cases.items():
        found = tensorrt.problems(_model([node], inputs=[x, helper.make_tensor_value_info("axes", 7, [1])]))
        assert len(found) == 1 and found[0].startswith(expected), found
    assert tensorrt.problems(_model([helper.make_node("Relu", ["x"], ["y"])], opset=25)) == [
        "opset 25 (TensorRT 10.15 parses opsets 9-24)"]
    # inside an If branch too
    branch = helper.make_graph([helper.make_node("Unique", ["x"], ["z"], name="inner")], "b", [],
                               [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    cond = numpy_helper.from_array(np.array(True), "c")
    found = tensorrt.problems(_model([helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)],
                                     [cond]))
    assert len(found) == 2 and all("node inner (Unique)" in f for f in found)


def test_checker_refuses_zero_points_and_blocked_int8_and_accepts_trt_int4():
    q8 = numpy_helper.from_array(np.ones((64, 8), np.int8), "q")
    scale = numpy_helper.from_array(np.ones((2, 8), np.float32), "s")
    zero = numpy_helper.from_array(np.full((2, 8), 3, np.int8), "z")
    dq = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], name="dq", axis=0, block_size=32)
    found = tensorrt.problems(_model([dq, helper.make_node("MatMul", ["x", "w"], ["y"])], [q8, scale, zero]))
    assert [f.split(":")[1].strip() for f in found] == [
        "a zero point TensorRT rejects (it must be absent or zero)",
        "blocked scales on INT8 weights (TensorRT blocks 4-bit weights only; 8-bit ones are per channel)"]
    q4 = TensorProto(name="q", data_type=TensorProto.INT4, dims=[64, 8], raw_data=tensorrt.pack_int4(
        np.zeros((64, 8), np.int8)))
    dq = helper.make_node("DequantizeLinear", ["q", "s"], ["w"], name="dq", axis=0, block_size=32)
    assert tensorrt.problems(_model([dq, helper.make_node("MatMul", ["x", "w"], ["y"])], [q4, scale])) == []


def test_the_onnxruntime_flavours_fused_decoder_is_refused_by_name(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from edgevlm.export import fused

    model = AutoModelForCausalLM.from_pretrained(tiny_dir("qwen3"))
    path = fused.build_decoder(model.model, model.lm_head, model.config, tmp_path / "decoder.onnx", embeds=False)
    with pytest.raises(tensorrt.TensorRTError) as e:
        tensorrt.check(path)
    message = str(e.value)
    assert "\n" not in message and message.startswith("decoder.onnx: node ") and "TensorRT" in message
    assert any(f"({op})" in message or f".{op})" in message
               for op in ("SimplifiedLayerNormalization", "GroupQueryAttention", "SkipSimplifiedLayerNormalization"))
    assert "more)" in message  # every contrib node counted, the first named


# ---------------------------------------------------------------- weights as TensorRT reads them
def test_int4_packing_is_onnx_int4_two_a_byte_low_nibble_first():
    assert tensorrt.pack_int4(np.array([1, -2, 7, -8], np.int8)) == bytes([0xE1, 0x87])
    q = np.random.default_rng(0).integers(-8, 8, (6, 5)).astype(np.int8)  # odd count: the last byte is half used
    tensor = TensorProto(name="q", data_type=TensorProto.INT4, dims=[6, 5], raw_data=tensorrt.pack_int4(q))
    np.testing.assert_array_equal(numpy_helper.to_array(tensor), q)  # onnx's own reading of the INT4 type
    np.testing.assert_array_equal(tensorrt.unpack_int4(tensorrt.pack_int4(q), q.shape), q)


def test_int4_weights_are_blocked_symmetric_dequantize_linear_equal_to_round_to_nearest(tmp_path):
    from edgevlm.export.quantize import _rtn_int4

    rng = np.random.default_rng(1)
    w = rng.standard_normal((128, 48)).astype(np.float32)
    src = _matmul_graph(tmp_path / "fp32.onnx", w)
    dst = tmp_path / "int4.onnx"
    tensorrt.int4_weight_only(src, dst, method="rtn", block_size=32)
    model = onnx.load(str(dst))
    (dq,) = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    inits = {i.name: i for i in model.graph.initializer}
    assert {a.name: a.i for a in dq.attribute} == {"axis": 0, "block_size": 32} and len(dq.input) == 2
    assert inits[dq.input[0]].data_type == TensorProto.INT4 and list(inits[dq.input[0]].dims) == [128, 48]
    assert list(inits[dq.input[1]].dims) == [4, 48]  # one scale per block of 32 along K, per column
    assert model.opset_import[0].version == 21 and {o.domain for o in model.opset_import} == {""}
    assert tensorrt.problems(model) == []
    expected = _rtn_int4(w, 32)  # what ONNX Runtime's symmetric quantizer computes
    np.testing.assert_allclose(_dequantized(dst), expected, rtol=1e-6, atol=1e-7)
    x = rng.standard_normal((3, 128)).astype(np.float32)
    np.testing.assert_allclose(_exact(dst).run(None, {"x": x})[0], x @ expected, rtol=1e-4, atol=1e-4)


def test_int8_weights_are_per_channel_dequantize_linear(tmp_path):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((64, 40)).astype(np.float32)
    src = _matmul_graph(tmp_path / "fp32.onnx", w)
    dst = tmp_path / "int8.onnx"
    assert tensorrt.int8_weight_only(src, dst) == 1
    model = onnx.load(str(dst))
    (dq,) = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    inits = {i.name: i for i in model.graph.initializer}
    assert {a.name: a.i for a in dq.attribute} == {"axis": 1} and len(dq.input) == 2
    assert inits[dq.input[0]].data_type == TensorProto.INT8 and list(inits[dq.input[1]].dims) == [40]
    assert "w" not in inits and tensorrt.problems(model) == []  # the fp32 weight is gone
    scale = np.abs(w).max(axis=0) / 127
    deq = _dequantized(dst)
    assert np.all(np.abs(deq - w) <= scale / 2 + 1e-7)  # round to nearest, per column
    x = rng.standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_allclose(_exact(dst).run(None, {"x": x})[0], x @ deq, rtol=1e-4, atol=1e-4)
    # a weight two MatMuls share is quantized once, and both read it
    shared = _model([helper.make_node("MatMul", ["x", "w"], ["a"], name="m1"),
                     helper.make_node("MatMul", ["x", "w"], ["b"], name="m2"),
                     helper.make_node("Add", ["a", "b"], ["y"])], [numpy_helper.from_array(w, "w")], opset=20,
                    outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 40])])
    onnx.save(shared, str(tmp_path / "shared.onnx"))
    assert tensorrt.int8_weight_only(tmp_path / "shared.onnx", tmp_path / "shared8.onnx") == 2
    model = onnx.load(str(tmp_path / "shared8.onnx"))
    assert [n.op_type for n in model.graph.node].count("DequantizeLinear") == 1 and tensorrt.problems(model) == []
    np.testing.assert_allclose(_exact(tmp_path / "shared8.onnx").run(None, {"x": x})[0], 2 * (x @ deq), rtol=1e-4,
                               atol=1e-4)


def test_options_the_tensorrt_flavour_cannot_honour_are_refused_before_any_work(tmp_path):
    cases = [({"target": "cpu"}, "--target must be one of cuda, jetson-orin-nano"),
             ({"target": "nonsense"}, "unknown target 'nonsense'"),
             ({"quant": QuantPlan("int4", "int4", int4_method="hqq")}, "zero points"),
             ({"quant": QuantPlan("int4", "int4", embed="int4")}, "fp32 or fp16 token embeddings")]
    for kwargs, message in cases:
        with pytest.raises(UsageError, match=message):
            export_bundle(tmp_path / "out", fmt="tensorrt", extractor="/nonexistent", **{"target": "cuda", **kwargs})
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_bad_target_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edgevlm", "export", "--out", tmp_path / "b", "--preset", "demo",
                           "--format", "tensorrt", "--target", "nonsense"], capture_output=True, env=ENV, timeout=300)
    err = proc.stderr.decode().strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("edgevlm: error: unknown target 'nonsense'")


def test_export_refuses_a_graph_tensorrt_cannot_parse_naming_the_node_and_writes_nothing(tiny_dir, tmp_path,
                                                                                        monkeypatch):
    # a family whose export ignored the flavour and wrote ONNX Runtime's fused decoder: the real writer and
    # the real checker, only the flavour switch is overridden
    from edgevlm.export import graphs

    export_decoder = graphs.export_decoder
    monkeypatch.setattr(graphs, "export_decoder", lambda *a, **kw: export_decoder(*a, **{**kw, "fused": True}))
    with pytest.raises(tensorrt.TensorRTError) as e:
        export_bundle(tmp_path / "out", extractor=str(tiny_dir("llava_onevision")), with_reasoner=False,
                      fmt="tensorrt", quant="fp32", fidelity_samples=0, log=lambda m: None)
    message = str(e.value)
    assert message.startswith("decoder.onnx: node ") and "\n" not in message and "TensorRT" in message
    assert list(tmp_path.iterdir()) == []  # the atomic write left nothing


# ---------------------------------------------------------------- exported bundles
@pytest.fixture(scope="module")
def fp16_bundle(tiny_dir, tmp_path_factory):
    """The default TensorRT export (fp16, target cuda) of the tiny LLaVA-OV(Qwen3) + Qwen3 pair, through the CLI."""
    path = tmp_path_factory.mktemp("trt") / "fp16"
    proc = subprocess.run([sys.executable, "-m", "edgevlm", "export", "--out", path, "--extractor",
                           tiny_dir("llava_onevision"), "--reasoner", tiny_dir("qwen3"), "--format", "tensorrt",
                           "--fidelity-samples", "3", "--fidelity-tokens", "8"], capture_output=True, env=ENV,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()
    return path


def _every_graph_passes_the_checker(b):
    for entry in b.models.values():
        for g in entry.graphs.values():
            model = onnx.load(str(b.file(g.file)), load_external_data=False)
            assert tensorrt.problems(model) == [], g.file
            assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}


def _compare_with_pytorch(b, torch_models, tol, steps=4):
    for role, family in (("extractor", "llava_onevision"), ("reasoner", "qwen3")):
        ours, ref = OrtModel(b, role), torch_models(family)
        image = random_image(61, 83) if role == "extractor" else None
        rendered = ref.tokenizer.apply_chat_template(ref.family.messages("Describe the image.",
                                                                         with_image=image is not None))
        ref_state, our_state = prefill_each((ref, ours), rendered, image)
        np.testing.assert_allclose(our_state.logits, ref_state.logits, atol=tol)
        for _ in range(steps):
            token = int(np.argmax(ref_state.logits))
            np.testing.assert_allclose(our_state.step(token), ref_state.step(token), atol=tol)


def test_tensorrt_bundle_is_fp16_standard_operators_and_matches_pytorch_on_cpu(fp16_bundle, torch_models):
    b = bundle_mod.load(fp16_bundle)
    assert b.manifest.flavour == "tensorrt" and b.manifest.target == "cuda"
    assert json.loads((fp16_bundle / "manifest.json").read_text())["flavour"] == "tensorrt"
    assert {g.quant for m in b.models.values() for g in m.graphs.values()} == {"fp16"}
    assert not b.models["reasoner"].kv.shared  # traced decoders: past in, present out
    _every_graph_passes_the_checker(b)
    _compare_with_pytorch(b, torch_models, FP16_TOL)
    for stage, r in b.manifest.fidelity.items():  # the same report as ONNX Runtime bundles
        assert {"top1_agreement", "mean_kl", "exact_match"} <= set(r) and r["top1_agreement"] >= 0.95, stage


def test_a_manifest_names_only_known_flavours_and_info_shows_it(fp16_bundle):
    proc = subprocess.run([sys.executable, "-m", "edgevlm", "info", fp16_bundle], capture_output=True, env=ENV,
                          timeout=120)
    assert proc.returncode == 0 and ", tensorrt graphs, " in proc.stdout.decode().splitlines()[0]
    manifest = json.loads((fp16_bundle / "manifest.json").read_text())
    manifest["flavour"] = "openvino"
    with pytest.raises(ValueError, match="flavour"):
        Manifest.from_dict(manifest)
    del manifest["flavour"]  # bundles written before the field: ONNX Runtime's
    assert Manifest.from_dict(manifest).flavour == "onnxruntime"


@pytest.mark.slow
@pytest.mark.parametrize("quant, agreement", [("int8", 0.95), ("int4", 0.8)])
def test_quantized_tensorrt_bundles_pass_the_checker_and_keep_fidelity(tiny_dir, torch_models, tmp_path, quant,
                                                                        agreement):
    # agreement: the tiny random models' logits are nearly flat (mean KL ~1e-4), so one flipped top-1 is cheap;
    # ONNX Runtime's int4 bundle of the same pair measured 0.89-0.91, this flavour 0.87-0.92
    path = export_bundle(tmp_path / quant, extractor=str(tiny_dir("llava_onevision")), reasoner=str(tiny_dir("qwen3")),
                         fmt="tensorrt", quant=quant, target="jetson-orin-nano", log=lambda m: None)
    b = bundle_mod.load(path)
    _every_graph_passes_the_checker(b)
    graphs = b.models["extractor"].graphs
    assert (graphs["vision"].quant, graphs["embed"].quant, graphs["decoder"].quant) == ("int8", "fp32", quant)
    decoder = onnx.load(str(b.file(b.models["reasoner"].graphs["decoder"].file)), load_external_data=False)
    consts = {i.name for i in decoder.graph.initializer}
    assert not any(n.op_type == "MatMul" and n.input[1] in consts for n in decoder.graph.node)  # all dequantized
    blocked = [n for n in decoder.graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" for a in n.attribute)]
    assert bool(blocked) == (quant == "int4")
    if quant == "int8":
        _compare_with_pytorch(b, torch_models, 0.05)
    for stage, r in b.manifest.fidelity.items():
        assert r["top1_agreement"] >= agreement and r["mean_kl"] < 1e-3, (stage, r)


# ---------------------------------------------------------------- engine-build planning (edgevlm.engines)
def _has_tensorrt() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def test_decoder_profiles_cover_prefill_chunks_and_decode_steps_up_to_the_planned_context():
    from edgevlm import engines
    from edgevlm.manifest import Graph, Tensor

    g = Graph("reasoner/decoder.onnx", "fp16", (
        Tensor("input_ids", "int64", ("s0", "s1")), Tensor("attention_mask", "int64", ("s2", "s3")),
        Tensor("position_ids", "int64", ("s0", "s1")), Tensor("past.0.key", "float32", ("s0", 2, "s4", 16))), ())
    prefill, decode = engines.profiles(g, "decoder", context=3000)
    assert (prefill.name, decode.name) == ("prefill", "decode")
    assert prefill.shapes["input_ids"] == ((1, 1), (1, 512), (1, 512))  # chunks of PREFILL_CHUNK
    assert prefill.shapes["past.0.key"] == ((1, 2, 0, 16), (1, 2, 0, 16), (1, 2, 2999, 16))
    assert prefill.shapes["attention_mask"] == ((1, 1), (1, 512), (1, 3000))
    assert decode.shapes["input_ids"] == ((1, 1),) * 3  # one token after 1 .. context - 1 cached ones
    assert decode.shapes["past.0.key"] == ((1, 2, 1, 16), (1, 2, 1500, 16), (1, 2, 2999, 16))
    assert decode.shapes["attention_mask"] == ((1, 2), (1, 1501), (1, 3000))
    for prof in (prefill, decode):
        for lo, opt, hi in prof.shapes.values():
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True))
    short = engines.profiles(g, "decoder", context=100)[0]  # a context below one chunk bounds the chunk
    assert short.shapes["input_ids"][2] == (1, 100)
    vision = Graph("extractor/vision.onnx", "int8", (Tensor("pixel_values", "float32", ("s9", 3, 384, 384)),), ())
    (only,) = engines.profiles(vision, "vision", context=4096, max_crops=37)
    assert only.shapes["pixel_values"] == ((1, 3, 384, 384), (4, 3, 384, 384), (4, 3, 384, 384))  # VISION_BATCH
    odd = Graph("x.onnx", "fp16", (Tensor("input_ids", "int64", ("s0", "s1", "s2")),), ())
    with pytest.raises(engines.EngineError, match="input_ids: no range planned for its axis 2"):
        engines.profiles(odd, "embed", context=10)


def test_builder_workspace_fits_an_8gb_orin_or_says_what_would():
    from edgevlm import engines, memory
    from edgevlm.targets import get_target

    nano = int(get_target("jetson-orin-nano").budget_gb * 1e9)
    assert engines.workspace_bytes(None, 10**9) == engines.WORKSPACE_CAP
    assert engines.workspace_bytes(nano, 1_200_000_000) == engines.WORKSPACE_CAP  # Qwen3-1.7B int4 decoder
    tight = engines.workspace_bytes(nano, 2_400_000_000)  # 5.5 GB - 2 x 2.4 GB - runtime: what is left
    assert tight == (nano - 4_800_000_000 - memory.RUNTIME_BYTES) // 2**20 * 2**20 and tight % 2**20 == 0
    with pytest.raises(engines.EngineError) as e:  # Qwen3-1.7B fp16 (3.4 GB) cannot be built in 8 GB
        engines.workspace_bytes(nano, 3_400_000_000, "reasoner decoder")
    message = str(e.value)
    assert "\n" not in message and message.startswith("building the reasoner decoder engine needs about 7.22 GB")
    assert "export it int4 or int8" in message


def test_engines_built_for_another_tensorrt_or_gpu_are_refused_in_one_line(tmp_path):
    from edgevlm.engines import Compatibility, compatibility_problem, timing_cache_path

    orin = Compatibility("10.3.0", "Orin (nvgpu)", "8.7")
    assert compatibility_problem(orin, Compatibility("10.3.0", "Orin (nvgpu)", "8.7")) is None
    for here in (Compatibility("10.15.1", "Orin (nvgpu)", "8.7"), Compatibility("10.3.0", "NVIDIA H200", "9.0")):
        message = compatibility_problem(orin, here, "/data/b")
        assert message == (f"the engines in /data/b were built with TensorRT 10.3.0 on Orin (nvgpu) (compute "
                           f"capability 8.7), but this is {here.describe()}: rebuild them here with "
                           "`edgevlm build /data/b`")
    assert Compatibility.from_dict(orin.to_dict()) == orin
    assert timing_cache_path(orin, tmp_path) == tmp_path / "trt10.3.0-orin--nvgpu-sm87.timing"


def test_bundle_carries_the_trtexec_commands_edgevlm_build_plans(fp16_bundle):
    from edgevlm import engines

    b = bundle_mod.load(fp16_bundle)
    assert "trtexec.sh" in b.manifest.files  # listed and checksummed like every file
    plans = engines.plan(b, None, default_budget=False)
    assert (fp16_bundle / "trtexec.sh").read_text() == engines.trtexec_script(plans, "cuda")
    assert [(p.role, p.graph) for p in plans] == [("extractor", "vision"), ("extractor", "embed"),
                                                  ("extractor", "decoder"), ("reasoner", "decoder")]
    decoder = plans[-1]
    line = engines.trtexec_command(decoder)
    assert line.startswith("trtexec --onnx=reasoner/decoder.onnx --saveEngine=engines/reasoner.decoder.plan ")
    assert line.count("--minShapes=") == 2 and "--fp16" in line and "--memPoolSize=workspace:2048M" in line
    assert "past.0.key:1x2x0x16" in line and "attention_mask:1x2048" in line  # tiny Qwen3: 2048 positions
    # every input of every graph has a range in every profile, and the context is the memory plan's
    for p in plans:
        inputs = {t.name for t in b.models[p.role].graphs[p.graph].inputs}
        assert all(set(prof.shapes) == inputs for prof in p.profiles)
    small = engines.plan(b, 515_000_000)  # just above what the bundle needs at its minimum context
    from edgevlm import memory

    context = memory.plan(b, 515_000_000).max_context["reasoner"]
    assert context < 2048 and small[-1].profiles[0].shapes["attention_mask"][2] == (1, context)


def test_cli_build_without_tensorrt_or_on_an_onnxruntime_bundle_refuses_in_one_line(fp16_bundle, tmp_path):
    import shutil

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "edgevlm", "build", *map(str, args)], capture_output=True,
                              env=ENV, timeout=120)

    if not _has_tensorrt():
        proc = cli(fp16_bundle)
        err = proc.stderr.decode().strip()
        assert proc.returncode == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert "needs TensorRT's Python package (`tensorrt`), which is not importable here" in err
        assert not (fp16_bundle / "engines").exists()
    proc = cli(fp16_bundle, "--plan")
    assert proc.returncode == 0 and proc.stdout.decode().startswith("#!/bin/sh")
    ort_flavour = tmp_path / "b"
    shutil.copytree(fp16_bundle, ort_flavour)
    manifest = json.loads((ort_flavour / "manifest.json").read_text())
    del manifest["flavour"]
    (ort_flavour / "manifest.json").write_text(json.dumps(manifest))
    proc = cli(ort_flavour, "--plan")
    err = proc.stderr.decode().strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "export it again with --format tensorrt" in err


@pytest.mark.cuda
@pytest.mark.skipif(not _has_tensorrt(), reason="needs TensorRT (tensorrt) and an NVIDIA GPU")
def test_build_makes_one_engine_per_graph_bound_to_this_gpu(fp16_bundle, tmp_path):
    import shutil

    from edgevlm import engine_build

    b = tmp_path / "b"
    shutil.copytree(fp16_bundle, b)
    out = engine_build.build(b, timing_cache=tmp_path / "timing.cache", log=lambda m: None)
    record = engine_build.check_engines(b)
    assert set(record["engines"]) == {"extractor.vision", "extractor.embed", "extractor.decoder", "reasoner.decoder"}
    assert all((out / Path(e["file"]).name).stat().st_size > 0 for e in record["engines"].values())
    assert (tmp_path / "timing.cache").stat().st_size > 0
    bundle_mod.load(b)  # the bundle still verifies
