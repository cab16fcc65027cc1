"""A visual-token budget (--max-image-tokens): every image of any size stays within it (AnyRes grids dropped,
Idefics3's resized edge shortened), a budget below one crop is a one-line error, the memory plan counts it, and a
bundle exported with one keeps it."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from edgevlm import bundle as bundle_mod
from edgevlm import memory
from edgevlm.errors import UsageError
from edgevlm.families import extractor_family, family_module
from edgevlm.pipeline import Pipeline
from edgevlm.tokenizer import Tokenizer


def image_positions(name: str, cfg: dict, tokenizer: Tokenizer, size: tuple[int, int]) -> int:
    """The prompt positions one image of `size` (height, width) takes, as the family's preprocessing lays it out."""
    module = family_module(name)
    image = Image.new("RGB", (size[1], size[0]))
    if name == "llava_onevision":
        return module.num_image_tokens(size, cfg)
    _, rows, cols = module.preprocess(image, cfg)
    return len(tokenizer.encode_prompt(tokenizer.markers(module.image_text(rows, cols, cfg))))


@pytest.fixture(scope="module")
def families(tiny_dir):
    """name -> (preprocess config, tokens per crop, tokenizer) of the tiny VLMs."""
    out = {}
    for name in ("llava_onevision", "idefics3"):
        d = tiny_dir(name)
        cfg = family_module(name).preprocess_config(d)
        per_crop = cfg["num_image_tokens"] if name == "llava_onevision" else cfg["image_seq_len"]
        out[name] = cfg, per_crop, Tokenizer(d)
    return out


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(["llava_onevision", "idefics3"]), budget=st.integers(1, 400),
       size=st.tuples(st.integers(1, 300), st.integers(1, 300)))
def test_every_image_stays_within_the_budget_or_the_budget_is_refused(families, name, budget, size):
    cfg, per_crop, tokenizer = families[name]
    module = family_module(name)
    try:
        cut = module.within(cfg, budget, per_crop)
    except UsageError as e:
        assert "\n" not in str(e) and "at least" in str(e)
        assert module.max_image_tokens(cfg, per_crop) > budget
        return
    assert image_positions(name, cut, tokenizer, size) <= module.max_image_tokens(cut, per_crop) <= budget
    # the unbounded config's bound holds too (the memory planner relies on it)
    assert image_positions(name, cfg, tokenizer, size) <= module.max_image_tokens(cfg, per_crop)


def test_a_budget_keeps_the_largest_layout_that_fits(families):
    cfg, per_crop, _ = families["llava_onevision"]
    module = family_module("llava_onevision")
    full = module.max_image_tokens(cfg, per_crop)
    assert module.within(cfg, full, per_crop) == cfg  # a budget the model meets already changes nothing
    cut = module.within(cfg, full - 1, per_crop)
    assert 0 < len(cut["image_grid_pinpoints"]) < len(cfg["image_grid_pinpoints"])
    assert module.max_crops(cut) < module.max_crops(cfg)
    cfg, per_crop, _ = families["idefics3"]
    module = family_module("idefics3")
    one = module.within(cfg, module.max_image_tokens(cfg, per_crop) - 1, per_crop)
    assert one["longest_edge"] < cfg["longest_edge"] and module.max_crops(one) < module.max_crops(cfg)


def test_run_and_export_keep_images_within_the_budget(tiny_bundle, tiny_dir, tmp_path):
    from edgevlm.export.exporter import export_bundle

    spec = bundle_mod.load(tiny_bundle, verify=False).models["extractor"]
    module, per_crop = family_module(spec.family), spec.preprocess["num_image_tokens"]
    budget = min(module.max_image_tokens({**spec.preprocess, "image_grid_pinpoints": [p]}, per_crop)
                 for p in spec.preprocess["image_grid_pinpoints"])  # the tightest: the smallest grid alone
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 40, 3), dtype=np.uint8))
    options = dict(max_new_tokens=2, think_budget=2, instruction="the shapes")
    free = Pipeline.from_bundle(str(tiny_bundle))(image, "What?", **options)
    pipe = Pipeline.from_bundle(str(tiny_bundle), max_image_tokens=budget)
    cut = pipe(image, "What?", **options)
    assert cut.stages["extract"].prompt_tokens < free.stages["extract"].prompt_tokens
    assert memory.image_tokens(pipe.extractor.spec) <= budget
    assert pipe.extractor.spec.dims.vision.max_crops < spec.dims.vision.max_crops  # the plan's vision activations
    with pytest.raises(UsageError, match="give at least"):
        Pipeline.from_bundle(str(tiny_bundle), max_image_tokens=1)
    # exported with the budget: recorded in the manifest, so every load keeps it
    out = export_bundle(tmp_path / "b", extractor=str(tiny_dir("llava_onevision")), with_reasoner=False,
                        max_image_tokens=budget, log=lambda m: None)
    saved = json.loads((out / "manifest.json").read_text())["models"]["extractor"]
    assert saved["preprocess"] == pipe.extractor.spec.preprocess
    assert saved["dims"]["vision"]["max_crops"] == pipe.extractor.spec.dims.vision.max_crops
    again = Pipeline.from_bundle(str(out))(image, "What?", mode="direct", max_new_tokens=2)
    assert again.stages["direct"].prompt_tokens < Pipeline.from_bundle(str(tiny_bundle))(
        image, "What?", mode="direct", max_new_tokens=2).stages["direct"].prompt_tokens
    assert extractor_family(tiny_dir("llava_onevision")).name == "llava_onevision"
