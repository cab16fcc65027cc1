"""Converting the paper's LLaVA-NeXT-format extractors: a tiny checkpoint in that format converts to a
transformers model that computes exactly what the original computes."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import random_image
from safetensors.torch import save_file

from edgevlm.backends.torch_ref import TorchModel
from edgevlm.export import llava_next
from edgevlm.families import extractor_family
from edgevlm.generation import Decoding, generate


@pytest.fixture(scope="module")
def original(tiny_dir, tmp_path_factory):
    """The tiny LLaVA-OneVision model written the way LLaVA-NeXT training saves a llava_qwen3 checkpoint."""
    hf_dir = tiny_dir("llava_onevision")
    root = tmp_path_factory.mktemp("llava_next")
    out, tower = root / "llava-extract-tiny", root / "siglip-tiny"
    out.mkdir(), tower.mkdir()
    hf_config = json.loads((hf_dir / "config.json").read_text())
    (tower / "config.json").write_text(json.dumps(hf_config["vision_config"]))
    config = {**hf_config["text_config"], "model_type": "llava_qwen3", "architectures": ["LlavaQwen3ForCausalLM"],
              "mm_vision_tower": str(tower), "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
              "mm_hidden_size": hf_config["vision_config"]["hidden_size"], "image_aspect_ratio": "anyres_max_9",
              "image_grid_pinpoints": "(1x1),...,(3x3)", "mm_patch_merge_type": "spatial_unpad"}
    (out / "config.json").write_text(json.dumps(config))
    back = {new: old for old, new in llava_next.RENAMES}
    state = {}
    from transformers import LlavaOnevisionForConditionalGeneration

    # module names (what the authors' renames target), not the on-disk names transformers 5 writes
    for key, value in LlavaOnevisionForConditionalGeneration.from_pretrained(hf_dir).state_dict().items():
        for new, old in back.items():
            if key.startswith(new):
                key = old + key[len(new):]
                break
        state[key] = value.contiguous()
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old checkpoints carry these
    save_file(state, out / "model.safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_dir / name, out / name)
    return out


def test_weight_names_and_pinpoints_follow_the_authors_converter():
    assert llava_next.rename("model.vision_tower.vision_tower.vision_model.encoder.layers.3.mlp.fc1.weight") == \
        "model.vision_tower.vision_model.encoder.layers.3.mlp.fc1.weight"
    assert llava_next.rename("model.mm_projector.2.bias") == "model.multi_modal_projector.linear_2.bias"
    assert llava_next.rename("model.layers.5.mlp.up_proj.weight") == "model.language_model.layers.5.mlp.up_proj.weight"
    assert llava_next.rename("model.image_newline") == "model.image_newline"
    assert llava_next.rename("lm_head.weight") == "lm_head.weight"
    pins = llava_next.grid_pinpoints("(1x1),...,(6x6)", 384)
    assert len(pins) == 36 and pins[0] == [384, 384] and pins[1] == [384, 768] and pins[-1] == [2304, 2304]
    assert llava_next.vision_tower_config({"mm_vision_tower": "google/siglip-so400m-patch14-384"}) == llava_next.SO400M


def test_converted_model_computes_what_the_original_computes(original, tiny_dir, tmp_path):
    out = llava_next.convert(original, tmp_path / "converted", log=lambda m: None)
    reference = TorchModel(tiny_dir("llava_onevision"), extractor_family(tiny_dir("llava_onevision")))
    converted = TorchModel(out, extractor_family(out))
    vocab = reference.model.config.text_config.vocab_size
    assert converted.model.config.text_config.vocab_size == -(-(vocab + 2) // 64) * 64  # vocab+2, padded to 64
    image = random_image(70, 45)
    rendered = reference.tokenizer.apply_chat_template(reference.family.messages("Describe.", with_image=True))
    assert converted.tokenizer.apply_chat_template(converted.family.messages("Describe.", with_image=True)) == rendered
    runs = []
    for model in (reference, converted):
        prepared = model.prepare(rendered, image)
        model.encode(prepared)
        state = model.prefill(prepared)
        logits = state.logits[:vocab].copy()
        tokens = list(generate(state, Decoding(max_new_tokens=16), eos_ids=set(), max_context=2048,
                               rng=np.random.default_rng(0)))
        runs.append((prepared.input_ids, logits, tokens))
    assert runs[0][0] == runs[1][0]
    np.testing.assert_allclose(runs[1][1], runs[0][1], atol=1e-5)
    assert runs[0][2] == runs[1][2]


def test_pipeline_converts_on_first_use_and_caches(original, tiny_dir, tmp_path, monkeypatch):
    from edgevlm.pipeline import Pipeline

    monkeypatch.setenv("EDGEVLM_CACHE", str(tmp_path / "cache"))
    pipe = Pipeline.from_pretrained(extractor=str(original), reasoner=str(tiny_dir("qwen3")))
    converted = list((tmp_path / "cache" / "converted").iterdir())
    assert len(converted) == 1 and (converted[0] / "config.json").exists()
    assert not [p for p in converted[0].parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    stamp = (converted[0] / "model.safetensors").stat().st_mtime_ns
    assert pipe(random_image(), "What is shown?", mode="extract", max_new_tokens=4).extraction is not None
    Pipeline.from_pretrained(extractor=str(original), reasoner=str(tiny_dir("qwen3")))
    assert (converted[0] / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not converted again


# ---------------------------------------------------------------- conversion caches follow their sources
def _rewrite_in_place(path, change) -> None:
    """Change a file's bytes, same size, and set its mtime back: only its ctime (and content) says so."""
    import os

    before = path.stat()
    change(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns


def test_a_checkpoint_retrained_in_place_is_converted_again(original, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from edgevlm.export.checkpoints import resolve_extractor

    monkeypatch.setenv("EDGEVLM_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "llava-extract-tiny"
    shutil.copytree(original, source)
    first = resolve_extractor(str(source))
    assert resolve_extractor(str(source)) == first and (first / ".edgevlm").is_file()

    def retrain(path):
        tensors = load_file(path)
        save_file({**tensors, "lm_head.weight": tensors["lm_head.weight"] + 1}, path)

    _rewrite_in_place(source / "model.safetensors", retrain)
    second = resolve_extractor(str(source))
    assert second != first
    old, new = (load_file(d / "model.safetensors")["language_model.lm_head.weight"] for d in (first, second))
    vocab = load_file(source / "model.safetensors")["lm_head.weight"].shape[0]
    torch.testing.assert_close(new[:vocab], old[:vocab] + 1)


def _write_gguf(path, tokenizer_json, seed: int, q_seed: int) -> None:
    """A tiny Llama as llama.cpp writes one (f32 tensors, a gpt2 BPE tokenizer), 5.6 MB: blk.1.attn_q
    (drawn with `q_seed`) lies at 3.3 MB, past the file's first and last MiB."""
    import gguf

    hidden, inter, layers, heads, kv_heads = 256, 512, 2, 4, 2
    tok = json.loads(tokenizer_json.read_text())
    vocab = {**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert len(tokens) == max(vocab.values()) + 1
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(inter)
    writer.add_block_count(layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(1e4)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_bos_token_id(vocab["<|im_start|>"])
    rng = np.random.default_rng(seed)

    def weight(*shape, rng=rng):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    kv = hidden // heads * kv_heads
    writer.add_tensor("token_embd.weight", weight(len(tokens), hidden))
    for i in range(layers):
        q = weight(hidden, hidden, rng=np.random.default_rng(q_seed)) if i == 1 else weight(hidden, hidden)
        for name, value in (("attn_norm", np.ones(hidden, np.float32)), ("attn_q", q), ("attn_k", weight(kv, hidden)),
                            ("attn_v", weight(kv, hidden)), ("attn_output", weight(hidden, hidden)),
                            ("ffn_norm", np.ones(hidden, np.float32)), ("ffn_gate", weight(inter, hidden)),
                            ("ffn_up", weight(inter, hidden)), ("ffn_down", weight(hidden, inter))):
            writer.add_tensor(f"blk.{i}.{name}.weight", value)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_gguf_file_rewritten_in_place_is_imported_again(tiny_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from edgevlm.export.checkpoints import resolve

    monkeypatch.setenv("EDGEVLM_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, tiny_dir("llama") / "tokenizer.json", seed=0, q_seed=1)
    first = resolve(str(path))
    assert first.parent == tmp_path / "cache" / "gguf" and (first / ".edgevlm").is_file()
    assert resolve(str(path)) == first
    _rewrite_in_place(path, lambda p: _write_gguf(p, tiny_dir("llama") / "tokenizer.json", seed=0, q_seed=2))
    second = resolve(str(path))
    assert second != first
    old, new = (load_file(d / "model.safetensors") for d in (first, second))
    q = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(old[q], new[q])
    assert all(torch.equal(old[k], new[k]) for k in old if k != q)
