"""The PyTorch reference backend reproduces transformers' own `generate` token for token."""

import numpy as np
import pytest
import torch
from conftest import random_image

from edgevlm.generation import Decoding, generate

N = 32


def _ours(model, rendered, image):
    prepared = model.prepare(rendered, image)
    model.encode(prepared)
    gen = generate(model.prefill(prepared), Decoding(max_new_tokens=N), eos_ids=set(),
                   max_context=model.max_context, rng=np.random.default_rng(0))
    ids = list(gen)
    return prepared, ids


def _hf(model, rendered, image):
    if image is None:
        ids = torch.tensor([model.tokenizer.encode(rendered)])
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    else:
        inputs = dict(model.processor(text=rendered, images=image, return_tensors="pt",
                                      input_data_format="channels_last"))
    with torch.inference_mode():
        out = model.model.generate(**inputs, max_new_tokens=N, min_new_tokens=N, do_sample=False)
    return inputs["input_ids"][0].tolist(), out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("family, size", [
    ("qwen3", None),
    ("llava_onevision", (50, 70)),
    ("llava_onevision", (3, 200)),  # 3 px high: HF would guess the channel axis wrong without channels_last
    ("llava_onevision", (97, 31)),
    ("idefics3", (50, 70)),
    ("idefics3", (1, 1)),
    ("idefics3", (120, 40)),
])
def test_greedy_tokens_match_hf_generate(torch_models, family, size):
    model = torch_models(family)
    image = random_image(*size) if size else None
    rendered = model.tokenizer.apply_chat_template(model.family.messages("Describe the image.",
                                                                         with_image=image is not None))
    prepared, ours = _ours(model, rendered, image)
    hf_ids, theirs = _hf(model, rendered, image)
    assert prepared.input_ids == hf_ids
    assert ours == theirs


def test_prefill_and_step_logits_match_a_full_forward(torch_models):
    model = torch_models("llava_onevision")
    image = random_image(64, 40)
    rendered = model.tokenizer.apply_chat_template(model.family.messages("Describe.", with_image=True))
    prepared = model.prepare(rendered, image)
    model.encode(prepared)
    state = model.prefill(prepared)
    prefill_logits = state.logits.copy()
    step_logits = state.step(7)
    inputs = dict(model.processor(text=rendered, images=image, return_tensors="pt", input_data_format="channels_last"))
    inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([[7]])], 1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    with torch.inference_mode():
        full = model.model(**inputs).logits[0].numpy()
    np.testing.assert_allclose(prefill_logits, full[-2], atol=1e-4)
    np.testing.assert_allclose(step_logits, full[-1], atol=1e-4)


def test_unusable_device_is_a_clear_error():
    from edgevlm.backends.torch_ref import torch_device
    from edgevlm.errors import DeviceError

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        torch_device("cuda")
    with pytest.raises(DeviceError, match="unknown device"):
        torch_device("tpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_greedy_tokens_match_cpu(tiny_dir):
    from edgevlm.backends.torch_ref import TorchModel
    from edgevlm.families import reasoner_family

    d = tiny_dir("qwen3")
    cpu, gpu = TorchModel(d, reasoner_family(d)), TorchModel(d, reasoner_family(d), device="cuda")
    rendered = cpu.tokenizer.apply_chat_template([{"role": "user", "content": "Describe the image."}])
    ref, got = cpu.prefill(cpu.prepare(rendered)).logits, gpu.prefill(gpu.prepare(rendered)).logits
    np.testing.assert_allclose(got, ref, atol=5e-2)  # bf16/fp16 on the GPU
    assert len(_ours(gpu, rendered, None)[1]) == N
