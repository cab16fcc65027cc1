"""A bundle is confined and complete: every path it names stays inside it and is listed with its size and
sha256, the folders the runtime reads hold only listed files, and a malformed manifest is refused at load
with one line naming the field. Every case tampers with a copy of a real (tiny) exported bundle."""

import copy
import json
import os
import shutil

import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from edgevlm import bundle as bundle_mod
from edgevlm import manifest as manifest_mod
from edgevlm import schema as schema_mod
from edgevlm.bundle import Bundle, BundleError
from edgevlm.manifest import Manifest

MANIFEST = "manifest.json"


@pytest.fixture
def b(tiny_bundle, tmp_path):
    """A private copy of the tiny bundle, to tamper with."""
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst, symlinks=True)
    return dst


@pytest.fixture(scope="module")
def original(tiny_bundle) -> dict:
    return json.loads((tiny_bundle / MANIFEST).read_text())


def edit(root, change) -> None:
    m = json.loads((root / MANIFEST).read_text())
    change(m)
    (root / MANIFEST).write_text(json.dumps(m))


def list_file(root, rel) -> None:
    """Add root/rel to the file table, with its true size and sha256 (as a forger would)."""
    f = root / rel
    edit(root, lambda m: m["files"].__setitem__(rel, {"sha256": bundle_mod.sha256(f), "bytes": f.stat().st_size}))


def refused(root, *needles, verify=True) -> str:
    with pytest.raises(BundleError) as e:
        bundle_mod.load(root, verify=verify)
    message = str(e.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


# ---------------------------------------------------------------- the manifest against its schema
def test_an_exported_manifest_is_sound_and_its_schema_is_valid_json_schema(tiny_bundle, original):
    jsonschema.Draft202012Validator.check_schema(manifest_mod.schema())
    assert manifest_mod.problem(original) is None
    assert manifest_mod.schema()["properties"]["format_version"]["const"] == bundle_mod.FORMAT_VERSION
    bundle_mod.load(tiny_bundle)


def _set(*path, value):
    def change(m):
        node = m
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return change


def _delete(*path):
    def change(m):
        node = m
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return change


EX, RE = ("models", "extractor"), ("models", "reasoner")
MALFORMED = {
    "kv head_dim 0": (_set(*EX, "kv", "head_dim", value=0), "models.extractor.kv.head_dim: expected an integer > 0"),
    "kv heads a string": (_set(*RE, "kv", "kv_heads", value="2"), "models.reasoner.kv.kv_heads: expected an integer"),
    "kv layers 2.0": (_set(*RE, "kv", "layers", value=2.0), "models.reasoner.kv.layers: expected an integer"),
    "kv missing": (_delete(*RE, "kv"), "models.reasoner.kv: required, but missing"),
    "kv a list": (_set(*EX, "kv", value=[2, 2]), "models.extractor.kv: expected an object"),
    "kv unknown layout": (_set(*EX, "kv", "layout", value="sequence,batch"), "models.extractor.kv.layout: expected"),
    "max_context negative": (_set(*EX, "max_context", value=-5),
                             "models.extractor.max_context: expected an integer > 0"),
    "unknown stage": (_set("stages", "reflect", value="reasoner"), "stages.reflect: unknown field"),
    "unknown stage role": (_set("stages", "plan", value="planner"), "stages.plan: expected one of"),
    "no extract stage": (_delete("stages", "extract"), "stages.extract: required, but missing"),
    "stage names a missing model": (_delete(*RE), "stages.plan: names the model \"reasoner\""),
    "unknown model role": (_set("models", "planner", value={}), "models.planner: unknown field"),
    "unknown family": (_set(*EX, "family", value="llava_next"), "models.extractor.family: expected one of"),
    "reasoner family a VLM": (_set(*RE, "family", value="llava_onevision"), "models.reasoner.family"),
    "bad quant": (_set(*EX, "graphs", "decoder", "quant", value="int3"), "models.extractor.graphs.decoder.quant"),
    "no decoder": (_delete(*RE, "graphs", "decoder"), "models.reasoner.graphs.decoder: required"),
    "vision graph missing": (_delete(*EX, "graphs", "vision"), "models.extractor.graphs.vision: required"),
    "crop size 0": (_set(*EX, "preprocess", "crop_size", value=[0, 32]),
                    "models.extractor.preprocess.crop_size[0]: expected an integer > 0, got 0"),
    "crop size one number": (_set(*EX, "preprocess", "crop_size", value=[32]),
                             "models.extractor.preprocess.crop_size: expected at least 2 items"),
    "crop size a string": (_set(*EX, "preprocess", "crop_size", value="32x32"), "crop_size: expected an array"),
    "image_std 0": (_set(*EX, "preprocess", "image_std", value=[0.5, 0, 0.5]), "preprocess.image_std[1]"),
    "image_mean short": (_set(*EX, "preprocess", "image_mean", value=[0.5]),
                         "preprocess.image_mean: expected at least 3"),
    "resample unknown": (_set(*EX, "preprocess", "resample", value=9), "models.extractor.preprocess.resample"),
    "aspect ratio": (_set(*EX, "preprocess", "vision_aspect_ratio", value="anyres"), "preprocess.vision_aspect_ratio"),
    "pinpoints empty": (_set(*EX, "preprocess", "image_grid_pinpoints", value=[]), "image_grid_pinpoints"),
    "preprocess missing": (_delete(*EX, "preprocess"), "models.extractor.preprocess: required"),
    "image_newline missing": (_delete(*EX, "arrays", "image_newline"), "models.extractor.arrays.image_newline"),
    "dims vision tokens 0": (_set(*EX, "dims", "vision", "tokens", value=0), "models.extractor.dims.vision.tokens"),
    "vision output 2-D": (_set(*EX, "graphs", "vision", "outputs", 0, "shape", value=["crops", 9]),
                          "models.extractor.graphs.vision.outputs[0].shape: expected at least 3 items"),
    "file bytes negative": (lambda m: m["files"]["extractor/decoder.onnx"].__setitem__("bytes", -1),
                            'files["extractor/decoder.onnx"].bytes: expected an integer >= 0'),
    "file sha256 short": (lambda m: m["files"]["extractor/decoder.onnx"].__setitem__("sha256", "abc"),
                          'files["extractor/decoder.onnx"].sha256: expected 64 lowercase hex digits'),
    "int8 checks a list": (_set("quantization", value={"int8_compute_checks": [1, 2]}),
                           "quantization.int8_compute_checks: expected an object, got an array of 2"),
    "int8 check a string": (_set("quantization", value={"int8_compute_checks": {"extractor": {"vision": "x"}}}),
                            "quantization.int8_compute_checks.extractor.vision: expected an object"),
    "int8 weights unknown": (_set("quantization", value={"int8_compute_checks": {"reasoner": {"decoder": {
        "compute": True, "weights": "int3"}}}}), "quantization.int8_compute_checks.reasoner.decoder.weights"),
    "offsets a number": (_set("quantization", value={"offsets": {"reasoner": 90}}),
                         "quantization.offsets.reasoner: expected an array"),
    "int4_offsets a string": (_set("quantization", value={"int4_offsets": "yes"}),
                              "quantization.int4_offsets: expected true or false"),
    "models a list": (_set("models", value=[]), "models: expected an object, got an array of 0"),
    "files missing": (_delete("files"), "files: required, but missing"),
    "unknown top-level field": (_set("plugins", value=["evil.so"]), "plugins: unknown field"),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_a_malformed_manifest_is_refused_in_one_line_naming_the_field(b, name):
    change, needle = MALFORMED[name]
    edit(b, change)
    message = refused(b, needle, MANIFEST, "re-export")
    assert message.count(":") >= 2, message  # where, the field, what was expected


# ---------------------------------------------------------------- paths the manifest names
TRAVERSAL = {
    "graph ../": (_set(*EX, "graphs", "decoder", "file", value="../outside.onnx"),
                  "models.extractor.graphs.decoder.file"),
    "graph absolute": (_set(*RE, "graphs", "decoder", "file", value="/etc/passwd"),
                       "models.reasoner.graphs.decoder.file"),
    "graph inner ..": (_set(*RE, "graphs", "decoder", "file", value="reasoner/../extractor/decoder.onnx"),
                       "models.reasoner.graphs.decoder.file"),
    "tokenizer ..": (_set(*RE, "tokenizer", value=".."), "models.reasoner.tokenizer"),
    "tokenizer .": (_set(*RE, "tokenizer", value="."), "models.reasoner.tokenizer"),
    "array absolute": (_set(*EX, "arrays", "image_newline", value="/dev/zero"),
                       "models.extractor.arrays.image_newline"),
    "nul byte": (_set(*EX, "arrays", "image_newline", value="extractor/a\x00b.npy"), "image_newline"),
    "backslash": (_set(*EX, "arrays", "image_newline", value="..\\..\\x.npy"), "image_newline"),
    "trailing newline": (_set(*EX, "tokenizer", value="extractor\n"), "models.extractor.tokenizer"),
    "table key ../": (lambda m: m["files"].__setitem__("../outside.bin", {"sha256": "0" * 64, "bytes": 1}),
                      'files["../outside.bin"]'),
    "table key absolute": (lambda m: m["files"].__setitem__("/etc/passwd", {"sha256": "0" * 64, "bytes": 1}),
                           'files["/etc/passwd"]'),
}


@pytest.mark.parametrize("name", TRAVERSAL)
def test_a_path_leaving_the_bundle_is_refused(b, name):
    change, field = TRAVERSAL[name]
    edit(b, change)
    refused(b, field, "a relative path inside the bundle", verify=False)


@pytest.fixture
def outside(tmp_path):
    """A file and a folder beside the bundle (where a tampered bundle could point)."""
    (tmp_path / "outside").mkdir()
    return tmp_path / "outside"


def test_a_listed_file_that_is_a_symlink_out_of_the_bundle_is_refused_even_with_the_same_bytes(b, outside):
    f = b / "extractor" / "image_newline.npy"
    shutil.copy(f, outside / "x.npy")
    f.unlink()
    f.symlink_to(outside / "x.npy")  # same size, same sha256: only where it leads gives it away
    refused(b, "extractor/image_newline.npy", "leads outside the bundle", verify=False)


def test_a_symlink_inside_the_bundle_to_a_listed_file_is_accepted(b):
    f = b / "extractor" / "image_newline.npy"
    os.replace(f, b / "extractor" / "newline.npy")
    f.symlink_to("newline.npy")
    list_file(b, "extractor/newline.npy")
    bundle_mod.load(b)


def test_a_tokenizer_folder_that_is_a_symlink_out_of_the_bundle_is_refused(b, outside):
    shutil.copytree(b / "reasoner", outside / "tok")
    (b / "tok").symlink_to(outside / "tok")
    edit(b, _set(*RE, "tokenizer", value="tok"))
    refused(b, "tok (models.reasoner.tokenizer) leads outside the bundle")


def test_a_listed_key_that_is_a_symlink_out_of_the_bundle_is_refused(b, outside):
    (outside / "secret").write_text("a key")
    (b / "extractor" / "extra.bin").symlink_to(outside / "secret")
    list_file(b, "extractor/extra.bin")
    refused(b, "extractor/extra.bin leads outside the bundle")


def test_a_fifo_in_place_of_a_listed_file_is_refused_without_opening_it(b):
    f = b / "extractor" / "chat_template.jinja"
    f.unlink()
    os.mkfifo(f)  # reading it would block forever
    refused(b, "extractor/chat_template.jinja", "is a FIFO, where a regular file is expected")


def test_a_manifest_that_is_a_fifo_is_refused_without_opening_it(b):
    (b / MANIFEST).unlink()
    os.mkfifo(b / MANIFEST)
    refused(b, "manifest.json is a FIFO")


def test_a_folder_where_a_file_is_expected_and_a_file_where_a_folder_is_are_refused(b):
    (b / "extractor" / "sub").mkdir()
    edit(b, lambda m: m["files"].__setitem__("extractor/sub", {"sha256": "0" * 64, "bytes": 0}))
    refused(b, "extractor/sub is a folder, where a regular file is expected")
    edit(b, lambda m: m["files"].pop("extractor/sub"))
    (b / "extractor" / "sub").rmdir()
    edit(b, _set(*RE, "tokenizer", value="reasoner/tokenizer.json"))
    refused(b, "(models.reasoner.tokenizer) is a file, where a folder is expected")


def test_a_model_path_to_a_file_the_table_does_not_list_is_refused(b):
    np.save(b / "newline.npy", np.zeros(4, np.float32))  # beside the manifest: not in a folder the runtime reads
    edit(b, _set(*EX, "arrays", "image_newline", value="newline.npy"))
    refused(b, "newline.npy (models.extractor.arrays.image_newline) is not in the manifest's file table")


@pytest.mark.parametrize("rel", ["extractor/special_tokens_map.json", "reasoner/notes/extra.txt",
                                 "extractor/.hidden"])
def test_an_unlisted_file_in_a_folder_the_runtime_reads_is_refused(b, rel):
    # The tokenizer may open any file of its folder, ONNX Runtime any file under a graph's folder.
    (b / rel).parent.mkdir(exist_ok=True)
    (b / rel).write_text("{}")
    refused(b, rel, "not in the manifest's file table", verify=False)


def test_an_unlisted_fifo_beside_the_graphs_is_refused(b):
    os.mkfifo(b / "reasoner" / "weights.bin")  # what a graph's external data could name, to hang the load
    refused(b, "reasoner/weights.bin is in reasoner/", "not in the manifest's file table", verify=False)


def test_a_note_beside_the_manifest_is_allowed(b):
    (b / "README.txt").write_text("not read by the runtime")
    bundle_mod.load(b)


def test_onnxruntime_refuses_external_data_outside_the_graph_folder(tmp_path, outside):
    """The runtime relies on it: external data can only come from the graph's folder, which load checks."""
    onnx = pytest.importorskip("onnx")
    import onnxruntime as ort
    from onnx import TensorProto, helper

    (outside / "w.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "link.bin").symlink_to(outside / "w.bin")

    def graph(location: str):
        w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
        for key, value in (("location", location), ("offset", "0"), ("length", "16")):
            w.external_data.add(key=key, value=value)
        io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4]) for n in "xy"]
        model = helper.make_model(helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", io[:1],
                                                    io[1:], [w]), opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 9
        path = tmp_path / "m" / "g.onnx"
        onnx.save(model, str(path))
        return str(path)

    for location in ("../outside/w.bin", str(outside / "w.bin"), "link.bin"):
        with pytest.raises(Exception, match="External data path validation failed"):
            ort.InferenceSession(graph(location), providers=["CPUExecutionProvider"])
    shutil.copy(outside / "w.bin", tmp_path / "m" / "w.bin")
    ort.InferenceSession(graph("w.bin"), providers=["CPUExecutionProvider"])  # inside its folder: read


def test_verify_false_still_checks_sizes_and_confinement(b, outside):
    data = b / "reasoner" / "decoder.onnx.data"
    with open(data, "ab") as f:
        f.write(b"\0")
    refused(b, "reasoner/decoder.onnx.data has", "bytes, the manifest says", verify=False)


def test_a_bundle_made_in_code_without_a_table_is_still_confined(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.npy").write_bytes(b"x")
    made = Bundle.in_progress(tmp_path, {})
    assert made.file("m/a.npy") == tmp_path / "m" / "a.npy"
    for rel in ("../a.npy", "/etc/passwd", "m/../m/a.npy"):
        with pytest.raises(BundleError, match="not a relative path inside the bundle"):
            made.file(rel)
    (tmp_path / "m" / "out").symlink_to("/etc")
    with pytest.raises(BundleError, match="leads outside the bundle"):
        made.dir("m/out")


def test_writing_a_manifest_refuses_what_load_would(tmp_path, outside):
    (outside / "secret").write_text("x")
    root = tmp_path / "new"
    (root / "m").mkdir(parents=True)
    (root / "m" / "a.bin").symlink_to(outside / "secret")
    with pytest.raises(BundleError, match="leads outside the bundle"):
        bundle_mod.write_manifest(root, Manifest(stages={}, models={}))
    (root / "m" / "a.bin").unlink()
    os.mkfifo(root / "m" / "a.bin")
    with pytest.raises(BundleError, match="is a FIFO"):
        bundle_mod.write_manifest(root, Manifest(stages={}, models={}))
    assert not (root / MANIFEST).exists()


# ---------------------------------------------------------------- the CLI: one line, exit 1
def _cli(capsys, *args) -> tuple[int, str]:
    from edgevlm.cli import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code, capsys.readouterr().err


CLI_CASES = {
    "traversal": lambda root: edit(root, _set(*EX, "graphs", "vision", "file", value="../../etc/passwd")),
    "malformed": lambda root: edit(root, _set(*RE, "kv", "head_dim", value=-1)),
    "symlink out": lambda root: (root / "reasoner" / "tokenizer.json").unlink()
    or (root / "reasoner" / "tokenizer.json").symlink_to("/etc/hostname"),
}


@pytest.mark.parametrize("case", CLI_CASES)
@pytest.mark.parametrize("command", ["info", "run"])
def test_the_cli_refuses_a_tampered_bundle_in_one_line(b, tmp_path, capsys, case, command):
    CLI_CASES[case](b)
    if command == "info":
        code, err = _cli(capsys, "info", b)
    else:
        image = tmp_path / "i.png"
        Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(image)
        code, err = _cli(capsys, "run", image, "What is shown?", "--bundle", b)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("edgevlm: error: "), err
    assert "Traceback" not in err and str(b) in lines[0]
    assert {"traversal": "models.extractor.graphs.vision.file", "malformed": "models.reasoner.kv.head_dim",
            "symlink out": "leads outside the bundle"}[case] in lines[0]


# ---------------------------------------------------------------- any mutation: accepted or one line
def _paths(node, prefix=()):
    """Every (path, value) of a JSON document, the document itself first."""
    yield prefix, node
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield from _paths(value, (*prefix, key))


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                    st.text(max_size=12), st.sampled_from(["..", "../x", "/", "/etc/passwd", "a\x00b", "", ".",
                                                           "extractor", "extractor/../reasoner/decoder.onnx",
                                                           "extractor//decoder.onnx", "manifest.json",
                                                           "reasoner/tokenizer.json", "extractor/decoder.onnx.data"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)


@st.composite
def mutated(draw, manifest: dict):
    m = copy.deepcopy(manifest)
    for _ in range(draw(st.integers(1, 3))):
        # The format fields last: hypothesis favours the first choices, and those two end every load early.
        paths = sorted((p for p, _ in _paths(m) if p), key=lambda p: p[0] in ("format", "format_version"))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = m
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["delete", "replace", "add"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "replace":
            parent[path[-1]] = draw(VALUES)
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(VALUES)
        else:
            parent.append(draw(VALUES))
    return m


@pytest.fixture(scope="module")
def scratch(tiny_bundle, tmp_path_factory):
    dst = tmp_path_factory.mktemp("mutated") / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_mutated_manifest_loads_or_is_refused_in_one_line(scratch, original, data):
    m = data.draw(mutated(original))
    (scratch / MANIFEST).write_text(json.dumps(m))
    try:
        bundle_mod.load(scratch, verify=False)
    except BundleError as e:
        assert "\n" not in str(e) and str(e).strip(), repr(str(e))


# ---------------------------------------------------------------- edgevlm.schema agrees with jsonschema
def _reference_validator():
    """jsonschema, with edgevlm.schema's one deliberate difference: an integer is never 1.0."""
    checker = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _, x: isinstance(x, int) and not isinstance(x, bool))
    cls = jsonschema.validators.extend(jsonschema.Draft202012Validator, type_checker=checker)
    return cls(manifest_mod.schema())


def test_the_schema_uses_only_keywords_the_validator_implements():
    def walk(node):
        if isinstance(node, dict):
            assert node.keys() <= schema_mod.KEYWORDS | schema_mod.ANNOTATIONS, node.keys()
            for key, value in node.items():
                if key in ("properties", "$defs"):
                    for sub in value.values():
                        walk(sub)
                elif key == "allOf":
                    for sub in value:
                        walk(sub)
                elif key in ("additionalProperties", "items", "propertyNames", "if", "then"):
                    walk(value)
    walk(manifest_mod.schema())


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_the_validator_agrees_with_jsonschema_on_mutated_manifests(original, data):
    m = data.draw(mutated(original))
    ours = schema_mod.find(m, manifest_mod.schema())
    errors = list(_reference_validator().iter_errors(m))
    assert (ours is None) == (not errors), (ours, [e.message for e in errors])
    if errors:
        # Ours names the failing field; jsonschema reports a missing or unknown key, or a bad property name,
        # at the object that holds it.
        where = {tuple(e.absolute_path) for e in errors}
        assert ours[0] in where or ours[0][:-1] in where, (ours, where)


# ---------------------------------------------------------------- what a bundle says about itself
def test_label_adds_the_precision_a_folder_name_lacks(tmp_path):
    def label(name, quant):
        return Bundle(tmp_path / name, Manifest(stages={}, models={}, quantization=quant)).label

    assert label("pair", {"extractor": "int8", "reasoner": "int4", "vision": "fp16"}) == "pair (int4/int8)"
    assert label("pair-int8", {"extractor": "int8", "reasoner": "int8"}) == "pair-int8"
    assert label("pair", {}) == "pair"
    assert Bundle(tmp_path / "pair", Manifest(stages={}, models={})).label == "pair"
    assert Bundle(tmp_path, Manifest(stages={}, models={}, target="cpu")).target == "cpu"


def test_describe_names_models_graphs_sizes_and_fidelity(tiny_bundle):
    loaded = bundle_mod.load(tiny_bundle, verify=False)
    text = loaded.describe()
    lines = text.splitlines()
    assert lines[0].startswith(f"bundle {tiny_bundle}  (format {bundle_mod.FORMAT_VERSION}, ")
    assert f"target {loaded.target}" in lines[0]
    assert "stages: " in text and "extract -> extractor" in text and "think -> reasoner" in text
    for role in loaded.models:
        assert any(line.startswith(f"{role}: ") and "KV 2 layers" in line for line in lines)
    decoder = next(line for line in lines if line.strip().startswith("decoder"))
    assert decoder.split()[-2:] == ["MB", "fp32"]
    assert lines[-1].startswith("fidelity: not measured")
