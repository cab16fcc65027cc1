"""int8 compute (export/int8_compute.py): the rewritten graph computes what its arithmetic says (per-token int8
activations x per-channel int8 weights, checked against a numpy model of it), smoothing is folded exactly into
the norm before, outliers that break plain int8 are handled, and the exporter keeps only what passes its check."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from edgevlm.export import int8_compute
from edgevlm.export.quantize import FeedReader

K, N = 64, 48


def _graph(path, rng, outlier: float):
    """x -> LayerNorm -> two MatMuls that share it (like q/k or gate/up) -> sum -> Relu -> MatMul (like the MLP
    down projection). The norm's weight gives channel 3 a large scale: an activation outlier channel."""
    gamma = np.ones(K, np.float32)
    gamma[3] = outlier
    w1, w2 = (rng.standard_normal((K, N)).astype(np.float32) / 8 for _ in range(2))
    w3 = rng.standard_normal((N, K)).astype(np.float32) / 7
    inits = [numpy_helper.from_array(a, n) for a, n in ((gamma, "gamma"), (np.zeros(K, np.float32), "beta"),
                                                         (w1, "w1"), (w2, "w2"), (w3, "w3"))]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1, name="norm"),
             helper.make_node("MatMul", ["h", "w1"], ["a"], name="mm1"),
             helper.make_node("MatMul", ["h", "w2"], ["b"], name="mm2"),
             helper.make_node("Add", ["a", "b"], ["ab"]), helper.make_node("Relu", ["ab"], ["r"]),
             helper.make_node("MatMul", ["r", "w3"], ["y"], name="mm3")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "T", K])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _layer_norm(x, gamma):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * gamma


def _feeds(rng, count=6, tokens=24):
    return [{"x": rng.standard_normal((1, tokens, K)).astype(np.float32)} for _ in range(count)]


@pytest.mark.parametrize("weights", list(int8_compute.LEVELS))
def test_the_graph_computes_per_token_int8_times_per_channel_int8(tmp_path, weights):
    """No smoothing: each MatMul is exactly round(x / a * 127) (q_rows) times round(W / s) (q_cols, at the weight
    format's levels), rescaled."""
    rng = np.random.default_rng(0)
    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    _graph(src, rng, outlier=1.0)
    assert int8_compute.rewrite(src, dst, FeedReader(_feeds(rng)), smooth=False, weights=weights) == 3
    graph = onnx.load(str(dst)).graph
    ops = {n.op_type for n in graph.node}
    assert "MatMulIntegerToFloat" in ops and "MatMul" not in ops
    stored = [numpy_helper.to_array(i) for i in graph.initializer if i.name.endswith(".int8_weight")]
    assert len(stored) == 3 and all(q.dtype == (np.uint8 if weights == "uint8" else np.int8) for q in stored)
    levels = int8_compute.LEVELS[weights]
    centred = [q.astype(np.int32) - (128 if weights == "uint8" else 0) for q in stored]
    assert max(np.abs(c).max() for c in centred) == levels
    model = onnx.load(str(src))
    w = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    x = rng.standard_normal((1, 5, K)).astype(np.float32)
    h = _layer_norm(x, w["gamma"])
    r = np.maximum(int8_compute._q_rows(h) @ int8_compute._q_cols(w["w1"], levels)
                   + int8_compute._q_rows(h) @ int8_compute._q_cols(w["w2"], levels), 0)
    expected = int8_compute._q_rows(r) @ int8_compute._q_cols(w["w3"], levels)
    np.testing.assert_allclose(_run(dst, x), expected, rtol=1e-3, atol=1e-3)
    # and int8 really is close to the fp32 function: within 2% of its scale
    fp32 = _run(src, x)
    assert np.abs(_run(dst, x) - fp32).max() < 0.02 * np.abs(fp32).max()


@pytest.mark.parametrize("weights", list(int8_compute.LEVELS))
def test_the_worst_case_row_computes_exactly_on_any_cpu(tmp_path, weights):
    """A row at its max everywhere times columns at theirs: on a CPU without VNNI, ONNX Runtime's uint8 x int8
    kernel adds product pairs in int16, which full-range int8 weights overflow (255 * 127 * 2 > 32767) but the
    7-bit int8 weights cannot, and the uint8 weights go to a kernel that widens first. The output must be the
    exact product, whatever this machine has."""
    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    w = np.ones((K, N), np.float32)
    w[:, 1::2] = -1.0  # columns of both signs: saturation would clip them at both ends
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "T", N])],
                              [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    assert int8_compute.rewrite(src, dst, FeedReader(_feeds(np.random.default_rng(3))), smooth=False,
                                weights=weights) == 1
    x = np.full((1, 2, K), 0.5, np.float32)
    x[0, 1] = -2.0
    np.testing.assert_allclose(_run(dst, x), x @ w, rtol=1e-4)


def test_smoothing_is_folded_into_the_norm_and_tames_an_outlier_channel(tmp_path):
    rng = np.random.default_rng(1)
    src, plain, smooth = tmp_path / "f.onnx", tmp_path / "plain.onnx", tmp_path / "smooth.onnx"
    _graph(src, rng, outlier=60.0)
    feeds = _feeds(rng)
    int8_compute.rewrite(src, plain, FeedReader(feeds), smooth=False)
    int8_compute.rewrite(src, smooth, FeedReader(feeds), smooth=True)
    graph = onnx.load(str(smooth)).graph
    muls = [n for n in graph.node if n.op_type == "Mul" and "h" in n.input]
    assert not muls, "the smoothing scales are folded into the norm's weight and bias, not left as a Mul"
    gamma = next(numpy_helper.to_array(i) for i in graph.initializer if i.name == "gamma")
    assert gamma[3] < 60.0  # the outlier channel was scaled down into the weights
    x = rng.standard_normal((1, 16, K)).astype(np.float32)
    fp32 = _run(src, x)
    err = {p.stem: np.abs(_run(p, x) - fp32).mean() for p in (plain, smooth)}
    assert err["smooth"] < 0.7 * err["plain"], err


@settings(max_examples=12, deadline=None)
@given(tokens=st.integers(1, 9), outlier=st.floats(1.0, 200.0), seed=st.integers(0, 2**16))
def test_int8_compute_stays_close_to_fp32_for_any_prompt_length_and_outlier(tmp_path_factory, tokens, outlier, seed):
    """Decode (one token) and prefill (several) alike, whatever the outlier: the smoothed graph's error is within
    4% of the output's scale, never worse than 1.25x the unsmoothed graph's (smoothing is only kept when it wins
    on the calibration rows)."""
    rng = np.random.default_rng(seed)
    d = tmp_path_factory.mktemp("prop")
    src = d / "f.onnx"
    _graph(src, rng, outlier)
    feeds = _feeds(rng, count=3)
    int8_compute.rewrite(src, d / "s.onnx", FeedReader(feeds))
    int8_compute.rewrite(src, d / "p.onnx", FeedReader(feeds), smooth=False)
    # errors averaged over 8 calls (a single row's error is too noisy to rank two graphs by)
    xs = [rng.standard_normal((1, tokens, K)).astype(np.float32) for _ in range(8)]
    fp32 = [_run(src, x) for x in xs]
    smooth, plain = (np.mean([np.abs(_run(d / n, x) - y).mean() for x, y in zip(xs, fp32, strict=True)])
                     for n in ("s.onnx", "p.onnx"))
    scale = np.mean([np.abs(y).mean() for y in fp32])
    assert np.isfinite(smooth) and smooth <= 0.04 * scale + 1e-6
    assert smooth <= 1.25 * plain + 1e-6


def test_agreement_scores_a_decoder_and_a_feature_graph(tmp_path):
    rng = np.random.default_rng(2)
    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    _graph(src, rng, outlier=1.0)
    feeds = _feeds(rng)
    int8_compute.rewrite(src, dst, FeedReader(feeds))
    same = int8_compute.agreement(src, src, feeds)
    assert same == {"cosine": pytest.approx(1.0)}
    assert 0.99 < int8_compute.agreement(src, dst, feeds)["cosine"] < 1.0


@pytest.fixture(scope="module")
def int8_bundles(tiny_dir, tmp_path_factory):
    from edgevlm.export.exporter import export_bundle

    root = tmp_path_factory.mktemp("int8c")
    return export_bundle(root / "b", extractor=str(tiny_dir("llava_onevision")), reasoner=str(tiny_dir("qwen3")),
                         quant="int8", fidelity_samples=2, fidelity_tokens=6, log=lambda m: None)


def test_an_int8_export_computes_on_int8_where_its_check_passes(int8_bundles):
    from edgevlm import bundle as bundle_mod

    b = bundle_mod.load(int8_bundles)
    checks = b.manifest.quantization["int8_compute_checks"]
    assert checks["extractor"]["vision"]["compute"] and checks["extractor"]["vision"]["cosine"] >= 0.995
    assert checks["extractor"]["vision"]["weights"] in int8_compute.LEVELS
    for role in ("extractor", "reasoner"):
        assert checks[role]["decoder"]["compute"] and checks[role]["decoder"]["mean_kl"] <= 0.01
        assert checks[role]["decoder"]["weights"] in int8_compute.LEVELS
        graph = onnx.load(str(b.file(b.models[role].graphs["decoder"].file)), load_external_data=False).graph
        ops = [n.op_type for n in graph.node]
        assert "MatMulIntegerToFloat" in ops and ops.count("MatMulNBits") == 1  # the LM head: weight-only


def test_info_says_how_each_int8_graph_computes_and_flags_full_range_weights(int8_bundles):
    """`edgevlm info` names each graph's weight format and score; a bundle whose checks carry no format (exported
    with full-range int8 weights, before the formats) is told to be re-exported for CPUs without VNNI."""
    import copy
    import dataclasses

    from edgevlm import bundle as bundle_mod

    b = bundle_mod.load(int8_bundles)
    checks = b.manifest.quantization["int8_compute_checks"]
    text = b.describe()
    vision = checks["extractor"]["vision"]
    assert f"int8 compute, {vision['weights']} weights, weight-only: none (cosine {vision['cosine']})" in text
    assert text.count("int8 compute, ") == 3 and "re-export" not in text  # two decoders and the vision tower
    old = copy.deepcopy(dict(b.manifest.quantization))
    del old["int8_compute_checks"]["extractor"]["vision"]["weights"]
    aged = dataclasses.replace(b, manifest=dataclasses.replace(b.manifest, quantization=old))
    line = next(ln for ln in aged.describe().splitlines() if ln.strip().startswith("vision") and "compute" in ln)
    assert "full-range int8 weights" in line and "re-export this bundle" in line


def test_a_graph_that_misses_the_check_falls_back_to_weight_only(tiny_dir, tmp_path, monkeypatch):
    from edgevlm import bundle as bundle_mod
    from edgevlm.export import exporter

    monkeypatch.setitem(exporter.INT8_COMPUTE_CHECKS, "decoder", ("mean_kl", -1.0))  # a bound nothing meets
    tried, quantize = [], int8_compute.quantize

    def spy(src, dst, reader, **kw):  # the real rewrite; records which forms the ladder tries, in order
        tried.append((Path(src).stem, kw["weights"], len(kw["keep"])))
        return quantize(src, dst, reader, **kw)

    monkeypatch.setattr(int8_compute, "quantize", spy)
    out = exporter.export_bundle(tmp_path / "b", extractor=str(tiny_dir("llava_onevision")), with_reasoner=False,
                                 quant="int8", fidelity_samples=0, log=lambda m: None)
    decoder = [(w, k) for stem, w, k in tried if stem == "decoder"]
    assert [w for w, _ in decoder] == ["int7", "uint8", "uint8"] and decoder[0][1] == decoder[1][1] < decoder[2][1]
    assert [w for stem, w, _ in tried if stem == "vision"] == ["int7"]  # passed at once
    b = bundle_mod.load(out)
    assert b.manifest.quantization["int8_compute_checks"]["extractor"]["decoder"]["compute"] is False
    graph = onnx.load(str(b.file(b.models["extractor"].graphs["decoder"].file)), load_external_data=False).graph
    assert "MatMulIntegerToFloat" not in {n.op_type for n in graph.node}


def test_only_x86_without_vnni_sums_int8_pairs_in_int16():
    from edgevlm.backends.onnx import int8_sums_saturate

    assert int8_sums_saturate({"avx2", "fma"}, "x86_64") and int8_sums_saturate({"avx512bw", "avx512f"}, "AMD64")
    assert not int8_sums_saturate({"avx2", "avx512_vnni"}, "x86_64") and not int8_sums_saturate({"avx_vnni"}, "x86_64")
    assert not int8_sums_saturate(set(), "aarch64")


@pytest.mark.parametrize("flags", [{"avx2", "fma"}, {"avx2", "avx512_vnni"}])
def test_running_a_full_range_int8_bundle_without_vnni_warns_in_one_line(int8_bundles, tmp_path, capsys, monkeypatch,
                                                                        flags):
    """A bundle exported with full-range int8 weights (its checks name no weight format) still runs, but on a CPU
    whose int8 kernel saturates (x86 without VNNI) `edgevlm run` says, on one line, that it computes inexactly
    there and should be re-exported; on a VNNI CPU, and for a bundle with the formats, nothing is said."""
    import shutil

    from PIL import Image

    from edgevlm.backends import onnx as onnx_backend
    from edgevlm.cli import main

    monkeypatch.setattr(onnx_backend, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(onnx_backend.platform, "machine", lambda: "x86_64")
    image = tmp_path / "i.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(image)
    aged = tmp_path / "aged"
    shutil.copytree(int8_bundles, aged)
    manifest = json.loads((aged / "manifest.json").read_text())
    checks = manifest["quantization"]["int8_compute_checks"]
    for graphs in checks.values():
        for check in graphs.values():
            check.pop("weights", None)
    (aged / "manifest.json").write_text(json.dumps(manifest))
    for bundle, stale in ((int8_bundles, False), (aged, "avx512_vnni" not in flags)):
        with pytest.raises(SystemExit) as e:
            main(["run", str(image), "How many?", "--bundle", str(bundle), "--max-new-tokens", "2"])
        err = capsys.readouterr().err
        assert e.value.code == 0, err
        warned = [line for line in err.splitlines() if line.startswith("edgevlm: warning: ")]
        if not stale:
            assert not warned, err
            continue
        assert len(warned) == 1 and str(aged) in warned[0] and "re-export the bundle" in warned[0]
        assert "extractor vision" in warned[0] and "reasoner decoder" in warned[0]


def test_smoothing_for_8bit_weight_only_layers_tames_their_int8_activation_blocks(tmp_path):
    """MatMulNBits at accuracy level 4 quantizes its input to int8 per block of channels: an outlier channel
    flattens its block. quantize.smooth_8bit_inputs moves it into the weights (folded into the norm, the fp32
    function unchanged), only for activations that the listed MatMuls alone read, and the 8-bit graph ONNX
    Runtime runs then follows fp32 closer."""
    from edgevlm.export import quantize

    rng = np.random.default_rng(3)
    src, smoothed = tmp_path / "f.onnx", tmp_path / "s.onnx"
    _graph(src, rng, outlier=60.0)
    feeds = _feeds(rng)
    assert quantize.smooth_8bit_inputs(src, tmp_path / "none.onnx", FeedReader(feeds), ["mm1"], block_size=16) == 0
    stats, scales = {}, {}  # as the fidelity target keeps them across its steps: the second call reuses both
    for path in (smoothed, tmp_path / "again.onnx"):
        assert quantize.smooth_8bit_inputs(src, path, FeedReader(feeds), ["mm1", "mm2"], block_size=16,
                                           stats=stats, scales=scales) == 1
    assert len(scales) == 1 and len(stats) == 1
    again = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "again.onnx")).graph.initializer}
    graph = onnx.load(str(smoothed)).graph
    for i in graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(i), again[i.name])
    assert not [n for n in graph.node if n.op_type == "Mul"], "the scales are folded into the norm"
    assert next(numpy_helper.to_array(i) for i in graph.initializer if i.name == "gamma")[3] < 60.0
    x = rng.standard_normal((1, 16, K)).astype(np.float32)
    fp32 = _run(src, x)
    np.testing.assert_allclose(_run(smoothed, x), fp32, rtol=1e-4, atol=1e-4)
    err = {}
    for name, graph_path in (("plain", src), ("smoothed", smoothed)):
        q = tmp_path / f"{name}8.onnx"
        quantize._nbits(graph_path, q, 8, include=["mm1", "mm2"], block_size=16)
        assert "MatMulNBits" in {n.op_type for n in onnx.load(str(q), load_external_data=False).graph.node}
        err[name] = np.abs(_run(q, x) - fp32).mean()
    assert err["smoothed"] < 0.7 * err["plain"], err


def test_activation_stats_keep_the_rows_a_full_sample_would_and_no_more(tmp_path):
    """The smoothing's statistics sample up to 64 rows a feed and keep the first `rows` of them: feeds of varied
    lengths (some under 64 rows, one a single row), so that the rows kept, the max and the mean are what sampling every
    feed, holding it all and cutting at the end gives (the generator drawn for every feed, as before)."""
    from edgevlm.export.quantize import activation_probe, activation_stats

    rng = np.random.default_rng(5)
    _graph(tmp_path / "g.onnx", rng, 1.0)
    feeds = [{"x": rng.standard_normal((1, t, K)).astype(np.float32)} for t in (100, 30, 1, 90, 70, 64, 200, 5)]
    names = ["h", "r"]
    got = activation_stats(tmp_path / "g.onnx", names, FeedReader(feeds), "test", rows=150)
    with activation_probe(tmp_path / "g.onnx", names, "reference") as session:
        outs = [dict(zip(names, session.run(names, f), strict=True)) for f in feeds]
    draw = np.random.default_rng(0)
    picks = {n: [] for n in names}
    for out in outs:
        for n in names:
            x = out[n].reshape(-1, out[n].shape[-1])
            picks[n].append(x[draw.choice(len(x), size=min(len(x), 64), replace=False)])
    for n in names:
        rows = np.concatenate([o[n].reshape(-1, o[n].shape[-1]) for o in outs])
        np.testing.assert_array_equal(got[n].rows, np.concatenate(picks[n])[:150])
        np.testing.assert_array_equal(got[n].amax, np.abs(rows).max(0))
        np.testing.assert_allclose(got[n].mean_abs, np.abs(rows).mean(0), rtol=1e-5)
