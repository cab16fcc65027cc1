"""The vision-feature cache: keyed by decoded pixels, bounded in bytes, and a hit gives the same answer."""

import numpy as np
import pytest
import torch
from conftest import random_image

from edgevlm.cache import FeatureCache, PrefixCache, image_key, nbytes
from edgevlm.images import load_image
from edgevlm.pipeline import Pipeline


def test_eviction_keeps_the_byte_budget_and_drops_the_least_recently_used():
    rng = np.random.default_rng(0)
    cache = FeatureCache(max_bytes=10_000)
    for _ in range(200):
        key = f"k{rng.integers(0, 30)}"
        value = np.zeros(int(rng.integers(1, 800)), np.float32)
        stored = cache.put(key, value)
        assert stored == (value.nbytes <= cache.max_bytes)
        assert cache.bytes <= cache.max_bytes
        assert cache.bytes == sum(v.nbytes for v, _ in cache._entries.values())
        if rng.random() < 0.3:
            cache.get(f"k{rng.integers(0, 30)}")
    cache = FeatureCache(max_bytes=3 * 400)
    for key in "abc":
        cache.put(key, np.zeros(100, np.float32))
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("d", np.zeros(100, np.float32))
    assert cache.get("b") is None and cache.get("a") is not None and cache.evictions == 1
    assert not cache.put("huge", np.zeros(1000, np.float32)) and cache.get("huge") is None
    assert cache.hits == 2 and cache.misses == 2


def test_nbytes_counts_arrays_tensors_and_model_outputs():
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    out = BaseModelOutputWithPooling(last_hidden_state=torch.zeros(2, 3, dtype=torch.float32),
                                     pooler_output=[torch.zeros(5, dtype=torch.bfloat16)])
    assert nbytes(out) == 2 * 3 * 4 + 5 * 2
    assert nbytes({"a": np.zeros(4, np.float64), "b": (np.zeros(2, np.int8),)}) == 34


def test_the_key_follows_the_pixels_not_the_container(tmp_path):
    pil = random_image(40, 50)
    pil.save(tmp_path / "a.png")
    keys = {image_key(load_image(x)) for x in (pil, str(tmp_path / "a.png"), np.asarray(pil),
                                               (tmp_path / "a.png").read_bytes())}
    assert len(keys) == 1
    changed = np.asarray(pil).copy()
    changed[7, 9, 1] ^= 1
    assert image_key(load_image(changed)) not in keys
    assert image_key(load_image(np.asarray(pil)[:, :49])) not in keys  # another size


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_second_question_on_the_same_image_skips_the_vision_tower(backend, tiny_bundle, torch_models, tmp_path):
    if backend == "onnx":
        pipe, uncached = Pipeline.from_bundle(str(tiny_bundle)), Pipeline.from_bundle(str(tiny_bundle),
                                                                                      vision_cache_mb=0)
    else:
        pipe = Pipeline(torch_models("llava_onevision"), torch_models("qwen3"))
        uncached = Pipeline(torch_models("llava_onevision"), torch_models("qwen3"), vision_cache_mb=0)
    image = random_image(64, 48, seed=3)
    options = dict(max_new_tokens=8, think_budget=8, instruction="the shapes")
    first = pipe(image, "What is shown?", **options)
    second = pipe(np.asarray(image), "How many shapes?", **options)
    reference = uncached(image, "How many shapes?", **options)
    assert first.stages["extract"].memory["vision_cache"] == "miss"
    assert second.stages["extract"].memory["vision_cache"] == "hit"
    assert second.to_dict()["memory"]["extract"]["vision_cache"] == "hit"
    assert "vision_cache" not in reference.stages["extract"].memory
    assert second.stages["extract"].token_ids == reference.stages["extract"].token_ids
    assert pipe.vision_cache.hits == 1 and len(pipe.vision_cache) == 1
    other = pipe(random_image(64, 48, seed=4), "What is shown?", **options)
    assert other.stages["extract"].memory["vision_cache"] == "miss"


def test_cache_size_is_checked():
    from edgevlm.errors import UsageError

    with pytest.raises(UsageError, match="cache size"):
        Pipeline(None, None, vision_cache_mb=-1)
    with pytest.raises(UsageError, match="cache size"):
        Pipeline(None, None, prefix_cache_mb=-1)


def test_prefix_cache_finds_the_longest_shared_prefix_within_its_budget():
    cache = PrefixCache(max_bytes=3000, min_tokens=4)
    cache.put((1, 2, 3, 4, 5, 6), np.zeros(250, np.float32))  # 1000 bytes each
    cache.put((1, 2, 3, 9, 9, 9), np.zeros(250, np.float32))
    cache.put((7, 7, 7, 7, 7), np.zeros(250, np.float32))
    value, n = cache.match([1, 2, 3, 4, 5, 8, 8], limit=6)
    assert n == 5 and value.nbytes == 1000
    assert cache.match([1, 2, 3, 4, 5, 8], limit=3) is None  # the limit caps the shared length below min_tokens
    assert cache.match([1, 2, 9], limit=3) is None
    cache.put((5, 5, 5, 5), np.zeros(250, np.float32))  # evicts the least recently used: (1, 2, 3, 9, 9, 9)
    assert cache.bytes <= 3000 and len(cache) == 3
    assert cache.match([1, 2, 3, 9, 9, 9], limit=6) is None  # gone: only 3 tokens shared with what is left
    assert cache.match([1, 2, 3, 4, 5, 6, 0], limit=6)[1] == 6


def test_planner_prompts_reuse_their_shared_prefix(tiny_bundle):
    """The second planner prompt takes the few-shot block's KV from the cache; its logits and tokens are
    those of a full prefill (within float tolerance)."""
    from edgevlm import prompts
    from edgevlm.pipeline import render_prompt

    pipe, cold = Pipeline.from_bundle(str(tiny_bundle)), Pipeline.from_bundle(str(tiny_bundle), prefix_cache_mb=0)
    image = random_image(64, 48, seed=5)
    options = dict(max_new_tokens=8, think_budget=8)
    pipe(image, "What is shown?", **options)
    warm = pipe(image, "How many shapes are there?", **options)
    reference = cold(image, "How many shapes are there?", **options)
    shared = render_prompt(pipe.reasoner, prompts.planner_prompt(""))
    prefix = len(pipe.reasoner.tokenizer.encode(str(shared).split("Question: ")[0]))
    plan = warm.stages["plan"]
    assert prefix - 2 <= plan.memory["prefix_tokens"] < plan.prompt_tokens
    assert warm.to_dict()["memory"]["plan"]["prefix_tokens"] == plan.memory["prefix_tokens"]
    assert reference.stages["plan"].memory["prefix_tokens"] == 0
    assert plan.token_ids == reference.stages["plan"].token_ids
    # the extract prompt's image comes first: nothing after the image placeholder is ever reused
    image_at = warm.stages["extract"].prompt.index("<image>")
    assert warm.stages["extract"].memory["prefix_tokens"] <= len(
        pipe.extractor.tokenizer.encode(warm.stages["extract"].prompt[:image_at], add_special_tokens=True))
    # the same logits as a full prefill
    model = pipe.reasoner
    ids = model.prepare(plan.prompt).input_ids
    hot = model.prefill(model.prepare(plan.prompt))
    model.prefix_cache.max_bytes, saved = 0, model.prefix_cache.max_bytes
    full = model.prefill(model.prepare(plan.prompt))
    model.prefix_cache.max_bytes = saved
    assert hot.reused > 0 and full.reused == 0 and len(ids) == hot.prompt_len
    np.testing.assert_allclose(hot.logits, full.logits, atol=1e-4)
    np.testing.assert_allclose(hot.step(7), full.step(7), atol=1e-4)


def test_the_vision_tower_runs_beside_the_planner_with_the_same_result(tiny_bundle, torch_models):
    image = random_image(64, 48, seed=7)
    options = dict(max_new_tokens=8, think_budget=8, temperature=0)
    overlapped = Pipeline.from_bundle(str(tiny_bundle), overlap=True)
    in_turn = Pipeline.from_bundle(str(tiny_bundle), overlap=False, vision_cache_mb=0)
    assert overlapped.overlap and not in_turn.overlap
    a, b = overlapped(image, "What is shown?", trace=True, **options), in_turn(image, "What is shown?", **options)
    for stage in ("plan", "extract", "think"):
        assert a.stages[stage].token_ids == b.stages[stage].token_ids
    assert a.stages["extract"].memory["vision_overlapped_ms"] > 0 and "vision_overlapped_ms" not in b.stages[
        "extract"].memory
    tracks = {e["args"]["name"] for e in a.profile.trace_events() if e["name"] == "thread_name"}
    assert "vision (overlapped)" in tracks  # its own track in the trace, beside the planner's
    # the features went into the vision cache: the next question on the frame skips the tower
    again = overlapped(image, "How many shapes?", **options)
    assert again.stages["extract"].memory["vision_cache"] == "hit"
    # nothing to overlap: an instruction given (no planner), or the PyTorch reference backend
    given = overlapped(random_image(64, 48, seed=8), "What?", instruction="the shapes", **options)
    assert "vision_overlapped_ms" not in given.stages["extract"].memory
    assert not Pipeline(torch_models("llava_onevision"), torch_models("qwen3"), overlap=True).overlap
