"""Fused decoder graphs (edgevlm.export.fused) and the in-place KV cache they allow: logits match PyTorch
through chunked prefill and decoding, the cache is one buffer the graph writes in place, and models the
fused graph cannot express fall back to the traced export."""

from contextlib import nullcontext

import numpy as np
import pytest

from edgevlm.backends.onnx import OrtModel
from edgevlm.bundle import Bundle
from edgevlm.kv_cache import KVCache

pytest.importorskip("torch")

LOGITS_TOL = 1e-4  # fp32 graphs vs PyTorch


def _export(model_dir, root):
    from edgevlm.export import causal_lm

    entry = causal_lm.export_model(model_dir, root / "model", root, step=lambda what: nullcontext())
    return OrtModel(Bundle.in_progress(root, {"model": entry}), "model", prefill_chunk=5)


def _compare(ours, ref, steps=8):
    rendered = ref.tokenizer.apply_chat_template(ref.family.messages("Describe a red square and a blue circle."))
    states = []
    for model in (ref, ours):
        prepared = model.prepare(rendered)
        states.append(model.prefill(prepared))
    ref_state, our_state = states
    assert our_state.prompt_len > 3 * ours.prefill_chunk  # the prompt went in as several chunks
    np.testing.assert_allclose(our_state.logits, ref_state.logits, atol=LOGITS_TOL)
    for _ in range(steps):
        token = int(np.argmax(ref_state.logits))
        np.testing.assert_allclose(our_state.step(token), ref_state.step(token), atol=LOGITS_TOL)
    return our_state


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_fused_decoder_matches_pytorch_through_chunked_prefill_and_decoding(tiny_dir, torch_models, tmp_path, family):
    from edgevlm.backends.torch_ref import TorchModel
    from edgevlm.families import reasoner_family

    ours = _export(tiny_dir(family), tmp_path)
    ops = _ops(tmp_path / ours.entry.graphs["decoder"].file)
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization", "QuickGelu"} <= ops and "Concat" not in ops
    assert ours.entry.kv.shared
    ref = TorchModel(tiny_dir(family), reasoner_family(tiny_dir(family)))
    state = _compare(ours, ref)
    cache = state.cache
    # one buffer per tensor, written in place: past and present are the same memory, reserved for the
    # planned context from the start, and filled up to the cache's length
    assert cache.read_pointers() == cache.write_pointers() and cache.capacity == ours.max_context
    assert cache.length == state.prompt_len + 8


def test_a_head_size_the_fused_attention_cannot_take_falls_back_to_the_traced_graph(tmp_path):
    from edgevlm.backends.torch_ref import TorchModel
    from edgevlm.export import fused
    from edgevlm.families import reasoner_family
    from edgevlm.train import tiny

    tiny._make_qwen3(tmp_path / "hf", 0, text_extra={"head_dim": 8})
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert "head size 8" in fused.unsupported(model.model, model.config)
    ours = _export(tmp_path / "hf", tmp_path / "bundle")
    assert not ours.entry.kv.shared and "GroupQueryAttention" not in _ops(
        tmp_path / "bundle" / ours.entry.graphs["decoder"].file)
    state = _compare(ours, TorchModel(tmp_path / "hf", reasoner_family(tmp_path / "hf")), steps=4)
    assert state.cache.read_pointers() != state.cache.write_pointers()  # two buffer sets used in turn


def _ops(path):
    import onnx

    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


@pytest.mark.parametrize("shared", [True, False])
def test_kv_cache_keeps_its_contents_through_growth_snapshots_and_loads(shared):
    cache = KVCache(tensors=4, kv_heads=2, head_dim=16, capacity=8, shared=shared)
    rows = np.random.default_rng(0).standard_normal((4, 2, 6, 16)).astype(np.float32)
    cache._fill(rows)
    assert cache.nbytes() == ((1 if shared else 2) * 4 * 2 * 16 * 4 * 8, 4 * 2 * 16 * 4 * 6)
    cache.reserve(20)  # grows: the layout changes (shared: the stride is the capacity), the contents do not
    assert cache.capacity == 20 and np.array_equal(cache._rows(6), rows)
    snap = cache.snapshot(4)
    other = KVCache(tensors=4, kv_heads=2, head_dim=16, capacity=2, shared=shared)
    other.load(snap, 3)
    assert other.length == 3 and np.array_equal(other._rows(3), rows[:, :, :3])
    limited = KVCache(tensors=4, kv_heads=2, head_dim=16, capacity=8, limit=100, shared=shared)
    assert limited.capacity == (100 if shared else 8)  # shared: the whole planned context, reserved up front


def test_weights_stream_to_the_data_file_as_the_graph_is_written(tiny_dir, tmp_path):
    # the graph never holds the weights itself (a 1.7B decoder would be in memory three times over)
    import onnx
    from transformers import AutoModelForCausalLM

    from edgevlm.export import fused

    model = AutoModelForCausalLM.from_pretrained(tiny_dir("qwen3"))
    path = fused.build_decoder(model.model, model.lm_head, model.config, tmp_path / "decoder.onnx", embeds=False)
    big = [t for t in onnx.load(str(path), load_external_data=False).graph.initializer
           if np.prod(t.dims) * 4 >= fused._Graph.external_bytes]
    assert big and all(t.data_location == onnx.TensorProto.EXTERNAL and not t.raw_data for t in big)
    offsets = [int(next(e.value for e in t.external_data if e.key == "offset")) for t in big]
    assert all(o % 64 == 0 for o in offsets) and len(set(offsets)) == len(big)
    weights = {k: v.detach().numpy() for k, v in model.model.state_dict().items()}
    loaded = {t.name: onnx.numpy_helper.to_array(t, base_dir=str(tmp_path)) for t in big}
    np.testing.assert_array_equal(loaded["layers.1.mlp.down_proj.weight"], weights["layers.1.mlp.down_proj.weight"].T)
