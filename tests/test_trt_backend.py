"""The TensorRT backend (edgevlm.backends.tensorrt): its pure decisions (edgevlm.backends.trt_plan) directly; the
backend itself through stand-ins for cuda-python and TensorRT (tests/trt_fake.py) whose engines run the bundle's
graphs on ONNX Runtime, so it must match the ONNX Runtime backend token for token, keep the KV on the "device"
and respect each engine's profiles; the refusals where tensorrt, cuda-python, a GPU or the engines are missing.
Tests marked `cuda` run the real thing where a GPU and TensorRT exist (benchmarks/gpu_check.sh)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trt_fake
from conftest import prefill_each, random_image

from edgevlm import bundle as bundle_mod
from edgevlm import engines, memory
from edgevlm.backends import trt_plan
from edgevlm.backends.onnx import OrtModel, cuda_provider_problem
from edgevlm.engines import EngineError
from edgevlm.errors import DeviceError, ModelError
from edgevlm.kv_cache import KVCache
from edgevlm.manifest import Graph, Tensor

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
DEMO_IMAGE = Path(__file__).resolve().parents[1] / "edgevlm" / "demo" / "example.png"
ITEMS = DEMO_IMAGE.parent / "test" / "items.jsonl"


def _decoder(embeds=False, mask=True, layers=2):
    inputs = [Tensor("inputs_embeds", "float32", ("batch", "sequence", 64)) if embeds
              else Tensor("input_ids", "int64", ("batch", "sequence"))]
    inputs += [Tensor("attention_mask", "int64", ("batch", "total_sequence"))] if mask else []
    inputs += [Tensor("position_ids", "int64", ("batch", "sequence"))]
    outputs = [Tensor("logits", "float32", ("batch", 1, 857))]
    for i in range(layers):
        for kind in ("key", "value"):
            inputs.append(Tensor(f"past.{i}.{kind}", "float32", ("batch", 2, "past_sequence", 16)))
            outputs.append(Tensor(f"present.{i}.{kind}", "float32", ("batch", 2, "present_sequence", 16)))
    return Graph("reasoner/decoder.onnx", "fp16", tuple(inputs), tuple(outputs))


def _has_ort_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def _decode_alike(ref_state, our_state, steps: int, atol: float) -> None:
    """The prefill's logits, then `steps` decode steps teacher-forced on the reference's greedy tokens, each
    within `atol` of the reference's."""
    np.testing.assert_allclose(our_state.logits, ref_state.logits, atol=atol)
    for _ in range(steps):
        token = int(np.argmax(ref_state.logits))
        np.testing.assert_allclose(our_state.step(token), ref_state.step(token), atol=atol)


# ---------------------------------------------------------------- pure decisions
def test_a_tensorrt_bundle_on_cuda_runs_its_engines_and_everything_else_onnxruntime():
    choose = trt_plan.choose_backend
    assert choose("tensorrt", "cuda") == "tensorrt"
    assert choose("tensorrt", "cpu") == choose("onnxruntime", "cuda") == choose("onnxruntime", "cpu") == "onnxruntime"
    assert choose("tensorrt", "cuda", "onnxruntime") == "onnxruntime"  # the same graphs on ORT's CUDA provider
    with pytest.raises(DeviceError, match="runs on a GPU: use --device cuda"):
        choose("tensorrt", "cpu", "tensorrt")
    with pytest.raises(DeviceError, match="export it with --format tensorrt"):
        choose("onnxruntime", "cuda", "tensorrt")
    with pytest.raises(DeviceError, match="unknown backend 'trt'"):
        choose("tensorrt", "cuda", "trt")


def test_what_is_missing_for_tensorrt_is_listed_with_each_fix_in_one_line():
    assert trt_plan.missing_for_tensorrt({"tensorrt": True, "cuda": True, "gpu": True}) == []
    missing = trt_plan.missing_for_tensorrt({"tensorrt": False, "cuda": False, "gpu": True})
    assert len(missing) == 2 and "`tensorrt`" in missing[0] and "pip install 'edgevlm[cuda]'" in missing[1]
    message = trt_plan.missing_message(trt_plan.missing_for_tensorrt({}))
    assert "\n" not in message and message.count("; and ") == 2 and "nvidia-smi" in message


def test_the_binding_table_refuses_an_engine_built_from_another_export():
    graph = _decoder()
    io = [trt_plan.IOTensor(t.name, True, t.dtype) for t in graph.inputs]
    io += [trt_plan.IOTensor(t.name, False, t.dtype) for t in graph.outputs]
    table = trt_plan.binding_table(io, graph, "reasoner decoder")
    assert set(table) == {t.name for t in graph.inputs + graph.outputs}
    cases = {
        "has no input attention_mask": [t for t in io if t.name != "attention_mask"],
        "has no output logits": [trt_plan.IOTensor("logits", True, "float32") if t.name == "logits" else t
                                 for t in io],
        "input past.0.key is float16, the graph's is float32": [
            trt_plan.IOTensor(t.name, t.is_input, "float16") if t.name == "past.0.key" else t for t in io],
        "has I/O the graph has not (extra)": [*io, trt_plan.IOTensor("extra", True, "float32")],
    }
    for expected, engine_io in cases.items():
        with pytest.raises(EngineError) as e:
            trt_plan.binding_table(engine_io, graph, "reasoner decoder")
        assert expected in str(e.value) and "rebuild it with `edgevlm build`" in str(e.value), str(e.value)
    past, present = trt_plan.kv_names(graph)
    assert past == ["past.0.key", "past.0.value", "past.1.key", "past.1.value"]
    assert present == [p.replace("past.", "present.") for p in past]


@pytest.mark.parametrize("context", [100, 600, 1500])
def test_every_run_the_backend_makes_fits_the_profile_it_picks(context):
    """Prefill chunks and decode steps up to the context: shapes within the profile edgevlm build planned."""
    for graph in (_decoder(), _decoder(embeds=True, mask=False)):
        profiles = engines.profiles(graph, "decoder", context)
        names = tuple(p.name for p in profiles)
        kv = trt_plan.KVPlan(4, 2, 16, context)
        runs = trt_plan.chunks(0, context - 3) + [(p, 1) for p in range(context - 3, context)]
        for prompt in (1, 513, context // 2):  # and from a prefix-cache hit part way
            runs += trt_plan.chunks(min(prompt, context - 1) // 2, min(prompt, context - 1))
        for past, seq in runs:
            index = trt_plan.profile_for(past, seq, context, names)
            assert names[index] == ("decode" if seq == 1 and past else "prefill")
            lo, _, hi = zip(*profiles[index].shapes.values(), strict=True)
            shapes = trt_plan.run_shapes(graph, kv, past, seq)
            for name, low, high in zip(profiles[index].shapes, lo, hi, strict=True):
                assert all(a <= s <= b for a, s, b in zip(low, shapes[name], high, strict=True)), (name, past, seq)
            assert shapes["present.1.value"] == (1, 2, past + seq, 16) and shapes["logits"] == (1, 1, 857)
        assert sum(seq for _, seq in trt_plan.chunks(0, context)) == context


def test_runs_past_the_context_or_without_their_profile_are_refused():
    with pytest.raises(EngineError, match="does not fit the engine's context of 100"):
        trt_plan.profile_for(99, 2, 100, ("prefill", "decode"))
    with pytest.raises(EngineError, match="longer than a prefill chunk"):
        trt_plan.profile_for(0, 513, 4096, ("prefill", "decode"))
    with pytest.raises(EngineError, match="no prefill profile"):
        trt_plan.profile_for(0, 5, 100, ("decode",))
    assert trt_plan.profile_for(5, 1, 100, ("prefill",)) == 0  # one profile serves steps too


def test_the_kv_ping_pongs_between_two_sets_and_counts_what_the_memory_plan_counts():
    kv = trt_plan.KVPlan(tensors=56, kv_heads=8, head_dim=128, context=4096)  # Qwen3-1.7B at 4096
    assert kv.buffer_bytes == 8 * 128 * 4 * 4096
    assert kv.allocated_bytes() == 2 * 56 * kv.buffer_bytes and kv.used_bytes(10) == 56 * 8 * 128 * 4 * 10
    spec_kv = type("KV", (), {"layers": 28, "kv_heads": 8, "head_dim": 128,
                              "bytes_per_position": lambda self: 2 * 28 * 8 * 128 * 4})()
    # edgevlm.memory.costs: two buffers for traced (not shared) decoders, per position, times the context
    assert kv.allocated_bytes() == 2 * spec_kv.bytes_per_position() * 4096
    pp = trt_plan.PingPong()
    seen = []
    for new in (512, 100, 1, 1):
        seen.append((pp.read, pp.write))
        pp.advance(new)
    assert seen == [(0, 1), (1, 0), (0, 1), (1, 0)] and pp.length == 614


def test_prefix_snapshots_share_the_onnxruntime_caches_layout():
    rng = np.random.default_rng(0)
    kv = trt_plan.KVPlan(tensors=4, kv_heads=2, head_dim=3, context=32)
    cache = KVCache(4, 2, 3, 16)
    rows = rng.standard_normal((4, 2, 7, 3)).astype(np.float32)
    cache.reserve(7)
    cache._fill(rows)
    ours = trt_plan.snapshot_rows([r[None].copy() for r in rows], kv, 7, 5)
    theirs = cache.snapshot(5)
    assert ours[1] == theirs[1] == 5 and np.array_equal(ours[0], theirs[0])
    np.testing.assert_array_equal(trt_plan.restore_rows(theirs, kv, 4), rows[:, :, :4])


def test_device_cuda_on_onnxruntime_names_the_wheel_installed_and_the_fix():
    cpu_only = cuda_provider_problem({"onnxruntime": "1.32.0"}, ["CPUExecutionProvider"])
    assert "onnxruntime 1.32.0 does not have" in cpu_only and "onnxruntime-gpu" in cpu_only and "\n" not in cpu_only
    both = cuda_provider_problem({"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"}, ["CPUExecutionProvider"])
    assert "onnxruntime 1.32.0, onnxruntime-gpu 1.31.1 are all installed" in both and "uninstall them all" in both
    assert cuda_provider_problem({"onnxruntime-gpu": "1.31.1"}, ["CUDAExecutionProvider", "CPUExecutionProvider"]) \
        is None


# ---------------------------------------------------------------- the backend, on the stand-ins
@pytest.fixture(scope="module")
def trt_bundle(tiny_dir, tmp_path_factory):
    """An fp32 TensorRT-flavour export of the tiny LLaVA-OV(Qwen3) + Qwen3 pair (fp32: the ONNX Runtime backend on
    the same graphs is then the exact reference). EDGEVLM_TEST_TRT_BUNDLE names one exported elsewhere, for a GPU
    host whose torch is not the pinned one (an H200's torch 2.11 / transformers 5.17 export held the new positions
    alone in present; export now refuses that: export.graphs.check_explicit_cache)."""
    if os.environ.get("EDGEVLM_TEST_TRT_BUNDLE"):
        return Path(os.environ["EDGEVLM_TEST_TRT_BUNDLE"])
    pytest.importorskip("torch")
    from edgevlm.export.exporter import export_bundle

    path = tmp_path_factory.mktemp("trtb") / "b"
    return export_bundle(path, extractor=str(tiny_dir("llava_onevision")), reasoner=str(tiny_dir("qwen3")),
                         fmt="tensorrt", quant="fp32", fidelity_samples=1, fidelity_tokens=2, log=lambda m: None)


@pytest.fixture
def fake(trt_bundle, monkeypatch, tmp_path):
    """The bundle, copied, with fake engines built for the fake GPU; (path, tensorrt, cuda runtime)."""
    import shutil

    path = tmp_path / "b"
    shutil.copytree(trt_bundle, path)
    trt, rt = trt_fake.install(monkeypatch)
    trt_fake.build(path)
    return path, trt, rt


def _load(path, **kw):
    from edgevlm.backends import tensorrt

    return tensorrt.load(str(path), **kw)


def test_the_backend_matches_onnxruntime_token_for_token_with_the_kv_on_the_device(fake):
    path, trt, rt = fake
    ex, rs, _ = _load(path)
    b = bundle_mod.load(path)
    long_text = "Count the words: " + "one two three " * 200  # > 512 positions: prefill in chunks
    costs = {c.role: c for c in memory.costs(b)}
    for role, ours, image, text in (("extractor", ex, random_image(61, 83), "Describe the image."),
                                    ("reasoner", rs, None, long_text)):
        ref = OrtModel(b, role)
        assert (ours.backend, ours.device, ours.concurrent) == ("tensorrt", "cuda", False)
        rendered = ref.tokenizer.apply_chat_template(ref.family.messages(text, with_image=image is not None))
        ref_state, our_state = prefill_each((ref, ours), rendered, image)
        assert our_state.prompt_len == ref_state.prompt_len == len(ref.prepare(rendered, image).input_ids)
        if image is None:
            assert our_state.prompt_len > 512
        engine = ours._engine.engine  # the fake's
        runs_before, copied = len(engine.runs), dict(rt.copies)
        _decode_alike(ref_state, our_state, 5, atol=1e-5)
        steps = engine.runs[runs_before:]
        assert all(r["profile"] == 1 for r in steps)  # the decode profile
        assert [r["position_ids"] for r in steps] == [(1, 1)] * 5
        # per token: 16 bytes in (the id, its position), the logits out; never the KV
        assert rt.copies[1] - copied[1] == 5 * 16
        assert rt.copies[2] - copied[2] == 5 * ours.logits.nbytes
        allocated, used = our_state.kv_bytes()
        assert used == ours.kv.used_bytes(our_state.prompt_len + 5)
        assert allocated == ours.kv.allocated_bytes() == costs[role].kv_per_token * ours.max_context
        newer = ours.prepare(rendered, image)
        ours.encode(newer)
        ours.prefill(newer)
        with pytest.raises(ModelError, match="taken by a newer generation"):
            our_state.step(1)


def test_the_pipeline_runs_extract_think_on_the_engines_with_caches_and_gpu_memory(fake):
    from edgevlm.pipeline import Pipeline
    from edgevlm.profiler import profile_table

    path, _, _ = fake
    ref = Pipeline.from_bundle(str(path), device="cpu")
    pipe = Pipeline.from_bundle(str(path), device="cuda")
    assert pipe.extractor.backend == pipe.reasoner.backend == "tensorrt"
    assert not pipe.overlap and not pipe.pipelined
    kw = dict(max_new_tokens=8, seed=0)
    image = random_image(40, 60)
    want, got = ref(image, "What is in the image?", **kw), pipe(image, "What is in the image?", **kw)
    assert (got.instruction, got.extraction, got.answer) == (want.instruction, want.extraction, want.answer)
    assert got.peak_gpu_bytes >= sum(m.kv.allocated_bytes() for m in (pipe.extractor, pipe.reasoner))
    assert ref.gpu_bytes() is None and "peak GPU" in profile_table(got) and "peak GPU" not in profile_table(want)
    assert got.stages["think"].memory["backend"] == "tensorrt"
    assert got.to_dict()["memory"]["peak_gpu_mb"] == round(got.peak_gpu_bytes / 1e6, 1)
    again = pipe(image, "What is in the image now?", **kw)  # the planner's few-shot block: from the prefix cache
    assert again.stages["plan"].memory["prefix_tokens"] > 0
    assert again.stages["extract"].memory.get("vision_cache") == "hit"
    assert again.instruction == ref(image, "What is in the image now?", **kw).instruction
    stay = Pipeline.from_bundle(str(path), device="cpu", backend="onnxruntime")
    assert stay.reasoner.backend == "onnxruntime"


def test_engines_missing_stale_or_for_another_gpu_are_refused_in_one_line(fake):
    import json

    from edgevlm.engine_build import RECORD

    path, _, _ = fake
    record_path = path / "engines" / RECORD
    record = json.loads(record_path.read_text())
    (path / "engines" / "reasoner.decoder.plan").write_text('{"onnx": "x", "profiles": []}')
    with pytest.raises(EngineError, match=r"reasoner.decoder.plan changed since it was built: run `edgevlm build"):
        _load(path)
    record["built_for"]["gpu"] = "Orin (nvgpu)"
    record_path.write_text(json.dumps(record))
    with pytest.raises(EngineError, match="built with TensorRT 10.99.0 on Orin .* but this is TensorRT 10.99.0 on "
                                          "NVIDIA Fake"):
        _load(path)
    record_path.unlink()
    with pytest.raises(EngineError, match="has no engines yet: run `edgevlm build"):
        _load(path)


def test_without_tensorrt_cuda_or_a_gpu_cuda_is_refused_naming_each_fix(trt_bundle, tmp_path):
    """On this machine, for real: nothing of TensorRT's is installed."""
    from edgevlm.backends import trt_device
    from edgevlm.pipeline import Pipeline

    found = trt_device.available()
    if all(found.values()):
        pytest.skip("TensorRT, cuda-python and a GPU are all here")
    with pytest.raises(DeviceError) as e:
        Pipeline.from_bundle(str(trt_bundle), device="cuda")
    message = str(e.value)
    assert "\n" not in message and message.startswith("--device cuda runs this TensorRT bundle's engines")
    for what, fix in (("tensorrt", "tensorrt-cu1"), ("cuda", "edgevlm[cuda]"), ("gpu", "nvidia-smi")):
        assert (fix in message) == (not found[what]), (what, message)
    proc = subprocess.run([sys.executable, "-m", "edgevlm", "run", str(DEMO_IMAGE), "What is this?", "--bundle",
                           str(trt_bundle), "--device", "cuda"], capture_output=True, env=ENV, timeout=300)
    err = proc.stderr.decode().strip()
    assert proc.returncode == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "--device cuda runs this TensorRT bundle's engines" in err
    assert err.endswith("(or --backend onnxruntime: its graphs on ONNX Runtime's CUDA provider)")


@pytest.mark.skipif(_has_ort_cuda(), reason="onnxruntime-gpu is here: --backend onnxruntime would run")
def test_backend_from_the_cli_picks_what_runs_a_bundle_and_refuses_what_cannot(trt_bundle, tiny_bundle):
    """`--backend onnxruntime` takes a TensorRT bundle to ONNX Runtime (here: its CUDA provider is missing, and
    that is what the one-line error names, not TensorRT); `--backend tensorrt` on cpu or on ONNX Runtime graphs,
    and --backend without a bundle, are refused in one line before anything loads. On run, bench and eval."""
    def cli(*args):
        proc = subprocess.run([sys.executable, "-m", "edgevlm", *args], capture_output=True, env=ENV, timeout=300)
        err = proc.stderr.decode().strip()
        assert "Traceback" not in err and err.splitlines()[-1].startswith("edgevlm: error: "), err
        return proc.returncode, err.splitlines()[-1]  # after progress lines (bench, eval), the error

    ask = (str(DEMO_IMAGE), "What is this?")
    code, err = cli("run", *ask, "--bundle", str(trt_bundle), "--device", "cuda", "--backend", "onnxruntime")
    assert code == 1 and "needs ONNX Runtime's CUDA provider" in err and "tensorrt" not in err
    code, err = cli("run", *ask, "--bundle", str(trt_bundle), "--backend", "tensorrt")
    assert code == 1 and "the TensorRT backend runs on a GPU: use --device cuda" in err
    code, err = cli("bench", "--bundle", str(tiny_bundle), "--image", str(DEMO_IMAGE), "--question", "Why?",
                    "--device", "cuda", "--backend", "tensorrt")
    assert code == 1 and "holds ONNX Runtime graphs, which TensorRT cannot parse" in err
    code, err = cli("eval", "--bundle", str(trt_bundle), "--data", str(ITEMS), "--backend", "tensorrt", "--limit", "1")
    assert code == 1 and "the TensorRT backend runs on a GPU" in err
    code, err = cli("run", *ask, "--extractor", "x", "--backend", "onnxruntime")
    assert code == 2 and "--backend picks what runs an exported bundle (--bundle)" in err
    code, err = cli("run", *ask, "--bundle", str(trt_bundle), "--backend", "onnx")
    assert code == 2 and "'onnx' is not one of 'onnxruntime', 'tensorrt'" in err


# ---------------------------------------------------------------- on a GPU
def _has_gpu_stack() -> bool:
    from edgevlm.backends import trt_device

    return all(trt_device.available().values())


@pytest.mark.cuda
@pytest.mark.skipif(not _has_gpu_stack(), reason="needs TensorRT, cuda-python and an NVIDIA GPU")
def test_real_engines_match_onnxruntime_on_cpu(trt_bundle, tmp_path):
    import shutil

    from edgevlm import engine_build

    path = tmp_path / "b"
    shutil.copytree(trt_bundle, path)
    engine_build.build(path, timing_cache=tmp_path / "timing.cache", log=lambda m: None)
    ex, rs, _ = _load(path)
    b = bundle_mod.load(path)
    for ours, ref, image in ((ex, OrtModel(b, "extractor"), random_image(61, 83)), (rs, OrtModel(b, "reasoner"), None)):
        rendered = ref.tokenizer.apply_chat_template(ref.family.messages("Describe it.", with_image=image is not None))
        ref_state, our_state = prefill_each((ref, ours), rendered, image)
        agree = int(np.argmax(our_state.logits) == np.argmax(ref_state.logits))
        for _ in range(8):
            token = int(np.argmax(ref_state.logits))
            agree += int(np.argmax(our_state.step(token)) == np.argmax(ref_state.step(token)))
        assert agree >= 8, agree  # TensorRT's kernels (TF32 where it picks them) on fp32 graphs: top-1 nearly always


def _has_cuda() -> bool:
    from edgevlm.backends import trt_device

    found = trt_device.available()
    return found["cuda"] and found["gpu"]


@pytest.mark.cuda
@pytest.mark.skipif(not _has_cuda(), reason="needs cuda-python and an NVIDIA GPU")
def test_device_memory_round_trips_and_is_counted_on_a_real_gpu():
    """The backend's CUDA layer alone (no TensorRT): host -> device -> host in stream order, on arrays of the KV's,
    the logits' and the ids' dtypes (and an empty one), with the bytes held and their peak counted for the profile."""
    from edgevlm.backends.trt_device import Cuda

    cuda = Cuda()
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((1, 2, 37, 16)).astype(np.float16),
              rng.standard_normal((1, 1, 857)).astype(np.float32),
              rng.integers(0, 50_000, (1, 300)).astype(np.int64), np.zeros((0,), np.float32)]
    ptrs = [cuda.malloc(a.nbytes) for a in arrays]
    assert cuda.held == cuda.peak == sum(a.nbytes for a in arrays)
    for ptr, a in zip(ptrs, arrays, strict=True):
        cuda.to_device(ptr, a)
    backs = [np.full_like(a, 7) for a in arrays]
    for ptr, back in zip(ptrs, backs, strict=True):
        cuda.to_host(back, ptr)
    cuda.sync()
    for a, back in zip(arrays, backs, strict=True):
        np.testing.assert_array_equal(back, a)
    cuda.free(ptrs[0])
    assert cuda.held == sum(a.nbytes for a in arrays[1:]) and cuda.peak == sum(a.nbytes for a in arrays)
    cuda.close()
    assert cuda.held == 0


@pytest.mark.cuda
@pytest.mark.skipif(not _has_ort_cuda(), reason="needs onnxruntime-gpu and an NVIDIA GPU")
def test_onnxruntime_on_cuda_decodes_what_it_does_on_cpu(tiny_bundle):
    """ONNX Runtime's CUDA provider on a fused fp32 bundle (the KV written in place, one-token steps fed by id)
    against CPU, prefill and 8 decode steps of each model. Tolerance: CUDA's fp32 GEMMs may use TF32 (10-bit
    mantissa); a stale input (the step's token not reaching the device) moves logits by whole units."""
    b = bundle_mod.load(tiny_bundle)
    for role, image in (("extractor", random_image(61, 83)), ("reasoner", None)):
        cpu, gpu = OrtModel(b, role), OrtModel(b, role, device="cuda")
        rendered = cpu.tokenizer.apply_chat_template(cpu.family.messages("Describe it.", with_image=image is not None))
        _decode_alike(*prefill_each((cpu, gpu), rendered, image), 8, atol=2e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not (_has_cuda() and _has_ort_cuda()), reason="needs cuda-python, onnxruntime-gpu and a GPU")
def test_the_backend_on_a_real_gpu_matches_onnxruntime_on_cpu(trt_bundle, monkeypatch, tmp_path):
    """Everything of the TensorRT backend but TensorRT's own calls, on a GPU: its CUDA memory and stream, the KV in
    two device sets used in turn, prompt chunks, token ids and positions copied in, logits out, prefix-cache rows
    restored to the device. The engines are tests/trt_fake.py's, run by ONNX Runtime's CUDA provider from and to
    the device addresses the backend gives them (`install_on_gpu`). Tolerance: TF32 GEMMs, as above."""
    import shutil

    from edgevlm import engine_build

    path = tmp_path / "b"
    shutil.copytree(trt_bundle, path)
    trt_fake.install_on_gpu(monkeypatch)
    trt_fake.build(path, built_for=engine_build.device())
    ex, rs, _ = _load(path)
    b = bundle_mod.load(path)
    long_text = "Count the words: " + "one two three " * 200  # > 512 positions: prefill in chunks
    for role, ours, image, text in (("extractor", ex, random_image(61, 83), "Describe the image."),
                                    ("reasoner", rs, None, long_text)):
        ref = OrtModel(b, role)
        rendered = ref.tokenizer.apply_chat_template(ref.family.messages(text, with_image=image is not None))
        ref_state, our_state = prefill_each((ref, ours), rendered, image)
        assert our_state.prompt_len == ref_state.prompt_len
        _decode_alike(ref_state, our_state, 5, atol=2e-2)
        assert ours.cuda.peak >= ours.kv.allocated_bytes() > 0
    from edgevlm.cache import PrefixCache

    rs.prefix_cache = PrefixCache(64_000_000)  # as the pipeline gives it
    rendered = rs.tokenizer.apply_chat_template(rs.family.messages(long_text))
    first = rs.prefill(rs.prepare(rendered)).logits.copy()
    again = rs.prefill(rs.prepare(rendered))  # the prompt's rows but its last, from the prefix cache
    assert again.reused > 512
    np.testing.assert_allclose(again.logits, first, atol=2e-2)


def test_the_gpu_check_fails_fast_listing_what_this_machine_lacks(tmp_path):
    """benchmarks/gpu_check.sh, for real on this machine (no GPU): exit 2 before any work, one line per thing
    missing, each naming its fix; --without-tensorrt drops TensorRT from the list and nothing else."""
    from edgevlm.backends import trt_device

    if all(trt_device.available().values()) and _has_ort_cuda():
        pytest.skip("everything the GPU check needs is here")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    env = {**ENV, "PYTHON": sys.executable}
    runs = {flag: subprocess.run(["bash", str(script), *([flag] if flag else []), str(tmp_path / "w")],
                                 capture_output=True, env=env, timeout=120) for flag in ("", "--without-tensorrt")}
    listed = {}
    for flag, proc in runs.items():
        err = proc.stderr.decode().splitlines()
        assert proc.returncode == 2 and err[0] == "gpu_check: cannot run here; missing:", err
        listed[flag] = [line.split(":")[0].strip("- ") for line in err[1:] if line.startswith("  - ")]
        assert not (tmp_path / "w").exists()  # nothing exported, nothing written
    found = trt_device.available()
    assert ("tensorrt" in listed[""]) == (not found["tensorrt"])
    assert ("onnxruntime-gpu" in listed[""]) == (not _has_ort_cuda())
    assert listed["--without-tensorrt"] == [m for m in listed[""] if m != "tensorrt"]
