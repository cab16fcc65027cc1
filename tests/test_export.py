"""`edgevlm export` end to end on tiny models: exported graphs and the ONNX Runtime pipeline match the PyTorch
reference; bundles are checksummed, versioned, written atomically and run without torch."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import random_image

from edgevlm import bundle as bundle_mod
from edgevlm.backends.onnx import OrtModel
from edgevlm.backends.torch_ref import TorchModel
from edgevlm.bundle import BundleError
from edgevlm.export.exporter import export_bundle
from edgevlm.families import extractor_family, reasoner_family
from edgevlm.pipeline import Pipeline

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
LOGITS_TOL = 1e-4  # fp32 graphs vs PyTorch, prefill and each decode step
PAIRS = {"llava": ("llava_onevision", "qwen3"), "idefics3": ("idefics3", "llama"),
         "llava_qwen2": ("llava_onevision_qwen2", None)}


@pytest.fixture(scope="session")
def bundles(tiny_dir, tiny_bundle, tmp_path_factory):
    """Three bundles covering every family: LLaVA-OV(Qwen3)+Qwen3, Idefics3+Llama, LLaVA-OV(Qwen2) alone.
    The last goes through the CLI."""
    root = tmp_path_factory.mktemp("bundles")
    out = {"llava": tiny_bundle}
    for name, (ex, re) in PAIRS.items():
        path = root / name
        if name in out:
            continue
        if re is None:
            proc = subprocess.run([sys.executable, "-m", "edgevlm", "export", "--out", path, "--extractor",
                                   tiny_dir(ex), "--no-reasoner"], capture_output=True, env=ENV, timeout=900)
            assert proc.returncode == 0, proc.stderr.decode()
            assert "[1/3] extractor: exporting vision tower" in proc.stderr.decode()  # progress is shown
        else:
            export_bundle(path, extractor=str(tiny_dir(ex)), reasoner=str(tiny_dir(re)), log=lambda m: None)
        out[name] = path
    return out


def _reference(tiny_dir, family):
    d = tiny_dir(family)
    return TorchModel(d, reasoner_family(d) if family in ("qwen3", "llama") else extractor_family(d))


@pytest.mark.parametrize("name, role", [("llava", "extractor"), ("llava", "reasoner"), ("idefics3", "extractor"),
                                        ("idefics3", "reasoner"), ("llava_qwen2", "extractor")])
def test_exported_graph_logits_match_pytorch_on_prefill_and_8_decode_steps(bundles, tiny_dir, name, role):
    b = bundle_mod.load(bundles[name])
    ours = OrtModel(b, role)
    family = PAIRS[name][0 if role == "extractor" else 1]
    ref = _reference(tiny_dir, family)
    image = random_image(61, 83) if role == "extractor" else None
    messages = ref.family.messages("Describe the image.", with_image=image is not None)
    rendered = ref.tokenizer.apply_chat_template(messages)
    states = []
    for model in (ref, ours):
        prepared = model.prepare(rendered, image)
        model.encode(prepared)
        states.append((prepared.input_ids, model.prefill(prepared)))
    (ref_ids, ref_state), (our_ids, our_state) = states
    assert our_ids == ref_ids
    np.testing.assert_allclose(our_state.logits, ref_state.logits, atol=LOGITS_TOL)
    for _ in range(8):
        token = int(np.argmax(ref_state.logits))
        np.testing.assert_allclose(our_state.step(token), ref_state.step(token), atol=LOGITS_TOL)


@pytest.mark.parametrize("name", ["llava", "idefics3"])
def test_bundle_pipeline_reproduces_the_reference_pipeline(bundles, tiny_dir, name):
    ex, re = PAIRS[name]
    reference = Pipeline(_reference(tiny_dir, ex), _reference(tiny_dir, re))
    exported = Pipeline.from_bundle(bundles[name])
    image = random_image(90, 40, seed=5)
    for mode in ("extract-think", "direct"):
        kw = dict(mode=mode, max_new_tokens=32, think_budget=32, temperature=0)
        a, b = exported(image, "What is shown?", **kw), reference(image, "What is shown?", **kw)
        assert list(a.stages) == list(b.stages)
        for stage in a.stages:
            assert a.stages[stage].token_ids == b.stages[stage].token_ids, (mode, stage)
            assert a.stages[stage].new_tokens >= min(32, b.stages[stage].new_tokens)
        assert a.answer == b.answer


def test_extractor_only_bundle_runs_direct_mode_and_refuses_the_rest(bundles):
    pipe = Pipeline.from_bundle(bundles["llava_qwen2"])
    assert pipe(random_image(), "What is shown?", mode="direct", max_new_tokens=4).stages["direct"].new_tokens == 4
    from edgevlm.errors import UsageError

    with pytest.raises(UsageError, match="needs a reasoner"):
        pipe(random_image(), "What is shown?")


def test_manifest_describes_every_model_and_file(bundles):
    m = bundle_mod.load(bundles["llava"]).manifest.to_dict()
    assert m["format"] == "edgevlm-bundle" and m["format_version"] == bundle_mod.FORMAT_VERSION
    assert m["stages"] == {"plan": "reasoner", "extract": "extractor", "think": "reasoner", "direct": "extractor"}
    ex = m["models"]["extractor"]
    assert set(ex["graphs"]) == {"vision", "embed", "decoder"}
    assert all(g["quant"] == "fp32" for g in ex["graphs"].values())
    names = [i["name"] for i in ex["graphs"]["decoder"]["inputs"]]
    assert names[:3] == ["inputs_embeds", "position_ids", "past.0.key"]  # fused: lengths from the positions
    assert ex["kv"] == {"layers": 2, "kv_heads": 2, "head_dim": 16, "max_sequence": 2048, "dtype": "float32",
                        "layout": "batch,kv_heads,sequence,head_dim", "shared": True}  # fused decoder
    assert ex["preprocess"]["image_token_id"] == 3 and ex["preprocess"]["num_image_tokens"] == 16
    assert ex["source"]["model"].endswith("llava_onevision")
    assert set(m["provenance"]["versions"]) >= {"edgevlm", "torch", "transformers", "onnx", "onnxruntime"}
    parity = m["provenance"]["parity"]  # the fp32 graphs against transformers' model, at export
    assert set(parity) == {"extractor", "reasoner"} and all(p["positions"] == 4 for p in parity.values())
    assert all(p["mean_kl"] < 1e-6 for p in parity.values()) and parity["extractor"]["feature_cosine"] > 0.9999
    files = set(m["files"])
    for entry in m["models"].values():
        for g in entry["graphs"].values():
            assert g["file"] in files and g["file"] + ".data" in files
        assert entry["tokenizer"] + "/tokenizer.json" in files
    for rel, meta in m["files"].items():
        assert bundle_mod.sha256(bundles["llava"] / rel) == meta["sha256"]


def test_every_graph_declares_an_ir_version_older_onnxruntime_builds_read(bundles):
    """ONNX Runtime refuses a graph whose IR version is newer than it knows, and the CUDA and Jetson builds lag the
    pinned CPU wheel: every graph declares IR 10 at most (ONNX Runtime 1.17+), and no less than its opsets need."""
    import onnx

    for path in bundles.values():
        b = bundle_mod.load(path)
        for entry in b.manifest.models.values():
            for g in entry.graphs.values():
                model = onnx.load(str(b.graph(g.file)), load_external_data=False)
                lowest = onnx.helper.find_min_ir_version_for(model.opset_import, ignore_unknown=True)
                assert lowest <= model.ir_version <= 10, (g.file, model.ir_version)


def _copy(bundles, tmp_path, name="llava"):
    dst = tmp_path / name
    shutil.copytree(bundles[name], dst)
    return dst


def test_a_changed_byte_is_refused(bundles, tmp_path):
    b = _copy(bundles, tmp_path)
    data = b / "reasoner" / "decoder.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="reasoner/decoder.onnx.data does not match its sha256"):
        bundle_mod.load(b)
    bundle_mod.load(b, verify=False)  # sizes still match: only the checksum catches it


def test_a_missing_file_and_a_future_version_are_refused(bundles, tmp_path):
    b = _copy(bundles, tmp_path)
    (b / "extractor" / "image_newline.npy").unlink()
    with pytest.raises(BundleError, match="image_newline.npy is missing"):
        bundle_mod.load(b)
    b2 = _copy(bundles, tmp_path, "idefics3")
    manifest = json.loads((b2 / "manifest.json").read_text())
    manifest["format_version"] = 99
    (b2 / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format version 99"):
        bundle_mod.load(b2)
    with pytest.raises(BundleError, match="not an edgevlm bundle"):
        bundle_mod.load(tmp_path)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edgevlm", *map(str, args)], capture_output=True, env=ENV,
                          timeout=300)


def test_cli_refuses_bad_bundles_in_one_line(bundles, tmp_path):
    b = _copy(bundles, tmp_path)
    (b / "reasoner" / "tokenizer.json").write_text("{}")
    image = tmp_path / "x.png"
    random_image().save(image)
    for args in (["run", image, "q", "--bundle", b], ["info", b], ["run", image, "q", "--bundle", tmp_path / "none"]):
        proc = _cli(*args)
        err = proc.stderr.decode().strip()
        assert proc.returncode == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert err.startswith("edgevlm: error: ")


def test_info_shows_models_graphs_sizes_and_json(bundles):
    proc = _cli("info", bundles["llava"])
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode()
    for needle in (f"format {bundle_mod.FORMAT_VERSION}", "extractor:", "reasoner:", "vision", "decoder", "fp32", "MB",
                   "KV 2 layers"):
        assert needle in out
    proc = _cli("info", bundles["llava"], "--json")
    assert json.loads(proc.stdout)["models"]["reasoner"]["family"] == "causal_lm"


def test_bundle_runs_without_importing_torch_or_transformers(bundles, tmp_path):
    image = tmp_path / "x.png"
    random_image().save(image)
    code = f"""
import sys
from edgevlm import Pipeline
from edgevlm.cli import main
r = Pipeline.from_bundle({str(bundles['llava'])!r})({str(image)!r}, "What is shown?", max_new_tokens=4, think_budget=4)
assert r.stages["think"].new_tokens > 0
try:
    main(["run", {str(image)!r}, "What is shown?", "--bundle", {str(bundles['idefics3'])!r}, "--max-new-tokens", "4",
          "--think-budget", "4", "--json"])
except SystemExit as e:
    assert e.code == 0, e.code
print("HEAVY", sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().strip().splitlines()[-1] == "HEAVY []"


def test_a_failed_export_leaves_nothing(tiny_dir, tmp_path, monkeypatch):
    from edgevlm.export import causal_lm

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure while exporting the reasoner")

    monkeypatch.setattr(causal_lm, "export_model", broken)
    with pytest.raises(RuntimeError):
        export_bundle(tmp_path / "out", extractor=str(tiny_dir("llava_onevision")), reasoner=str(tiny_dir("qwen3")),
                      log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


def test_a_killed_export_leaves_no_bundle_that_loads(tiny_dir, tmp_path):
    out = tmp_path / "bundle"
    proc = subprocess.Popen([sys.executable, "-m", "edgevlm", "export", "--out", str(out), "--extractor",
                             str(tiny_dir("idefics3")), "--reasoner", str(tiny_dir("llama"))],
                            stderr=subprocess.PIPE, env=ENV)
    deadline = time.time() + 300
    line = b""
    while b"done in" not in line and time.time() < deadline:  # kill it after the first graph is written
        line = proc.stderr.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".bundle.partial-")]
    assert partial, "the export should have been interrupted mid-way"
    with pytest.raises(BundleError):
        bundle_mod.load(partial[0])
    live = tmp_path / f".bundle.partial-{os.getpid()}-x"  # a writer that still runs (this process)
    live.mkdir()
    # a later export to the same place succeeds, and removes the dead writer's gigabytes, not the live one's
    export_bundle(out, extractor=str(tiny_dir("idefics3")), with_reasoner=False, log=lambda m: None)
    bundle_mod.load(out)
    assert not partial[0].exists() and live.exists()


def test_fp16_bundle_runs_close_to_fp32(bundles, tiny_dir, tmp_path):
    path = export_bundle(tmp_path / "fp16", extractor=str(tiny_dir("llava_onevision")), with_reasoner=False,
                         quant="fp16", log=lambda m: None)
    fp16, fp32 = OrtModel(bundle_mod.load(path), "extractor"), OrtModel(bundle_mod.load(bundles["llava"]), "extractor")
    assert {g.quant for g in fp16.entry.graphs.values()} == {"fp16"}

    def weight_bytes(b):
        return sum(m["bytes"] for rel, m in bundle_mod.load(b).manifest.files.items()
                   if rel.startswith("extractor/") and rel.endswith(".onnx.data"))

    assert weight_bytes(path) < 0.55 * weight_bytes(bundles["llava"])  # half the bytes, plus a little
    image = random_image()
    rendered = fp32.tokenizer.apply_chat_template(fp32.family.messages("Describe.", with_image=True))
    # the fp16 conversion puts casts around the attention's cache: it runs with two buffer sets
    assert fp32.entry.kv.shared and not fp16.entry.kv.shared
    states = []
    for model in (fp16, fp32):
        prepared = model.prepare(rendered, image)
        model.encode(prepared)
        states.append(model.prefill(prepared))
    np.testing.assert_allclose(states[0].logits, states[1].logits, atol=5e-3)  # fp16 weights on tiny logits
    for _ in range(4):
        token = int(np.argmax(states[1].logits))
        np.testing.assert_allclose(states[0].step(token), states[1].step(token), atol=5e-3)
    # the fidelity measure, with the reference's side recorded once (as the fidelity target's steps keep it) or
    # run alongside: the same figures
    from edgevlm.calibration.fidelity import measure, reference_run

    inputs = [(rendered, image), (fp32.tokenizer.apply_chat_template(fp32.family.messages("Colour?")), None)]
    recorded = [reference_run(fp32, *x, 6) for x in inputs]
    assert recorded[0][0].shape == (6, len(states[1].logits)) and recorded[1][1] is None
    live, kept = measure(fp32, fp16, inputs, 6), measure(fp32, fp16, inputs, 6, recorded)
    assert live == kept and live.positions == 12 and live.feature_cosine > 0.999 and live.mean_kl > 0


def test_a_decoder_that_ignores_its_explicit_cache_is_refused_before_tracing(tiny_dir, monkeypatch, tmp_path):
    """A transformers other than the pinned one can drop the cache the export hands the decoder body (a GPU host's
    torch 2.11 / transformers 5.17 export held the new positions alone in present): its traced graph then exports,
    and fails at the first decode step. The export checks present = past + new on its sample inputs first, and
    names the versions in one line."""
    from transformers import AutoModelForCausalLM

    from edgevlm.errors import ModelError
    from edgevlm.export import graphs

    model = AutoModelForCausalLM.from_pretrained(tiny_dir("qwen3")).eval()
    body = model.model
    original = type(body).forward

    def forgetful(self, *args, cache=None, **kwargs):  # the cache never reaches the attention
        return original(self, *args, **kwargs)

    graphs.export_decoder(body, model.lm_head, model.config, tmp_path / "ok.onnx", embeds=False, fused=False)
    monkeypatch.setattr(type(body), "forward", forgetful)
    with pytest.raises(ModelError, match=r"ignored its explicit KV cache under transformers .* \(present holds 3 "
                                         r"positions after 4 past and 3 new\): export with edgevlm\[export\]'s"):
        graphs.export_decoder(body, model.lm_head, model.config, tmp_path / "bad.onnx", embeds=False, fused=False)
    assert not (tmp_path / "bad.onnx").exists()


@pytest.mark.parametrize("role, family", [("reasoner", "qwen3"), ("extractor", "llava_onevision")])
def test_graphs_that_compute_otherwise_than_transformers_are_refused(bundles, tiny_dir, tmp_path, role, family):
    """The export checks its fp32 graphs against transformers' own model on a calibration prompt: the bundle's
    graphs pass against the model they came from, and are refused in one line, naming the versions, against
    another of the same shape (other weights: what a transformers that reads or traces a model otherwise gives)."""
    from edgevlm.calibration import data
    from edgevlm.errors import ModelError
    from edgevlm.export.exporter import _check_parity
    from edgevlm.train.tiny import make_tiny

    spec, item = bundle_mod.load(bundles["llava"]).manifest.models[role], data.load("scenes")[0]
    fam = reasoner_family if role == "reasoner" else extractor_family
    said = []
    figures = _check_parity(bundles["llava"], role, spec, tiny_dir(family), fam(tiny_dir(family)), item,
                            "onnxruntime", said.append)
    assert figures["mean_kl"] < 1e-6 and said[-1].startswith(f"{role}: the graphs match transformers (mean KL")
    other = make_tiny(family, tmp_path / "other", seed=1)
    with pytest.raises(ModelError, match=rf"^the exported {role} does not compute what transformers' model does "
                                         r"\(mean KL [0-9.e+-]+ over 4 positions.*\) under transformers .* / torch .*: "
                                         r"export with edgevlm\[export\]'s pinned versions$") as refused:
        _check_parity(bundles["llava"], role, spec, other, fam(other), item, "onnxruntime", said.append)
    assert "\n" not in str(refused.value)
