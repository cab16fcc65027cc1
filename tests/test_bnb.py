"""bitsandbytes int8 / nf4 on the PyTorch reference backend (`edgevlm run --quant`).

bitsandbytes 0.50 runs its kernels on the CPU too, so the plumbing is tested here on every machine; the
same tests run on CUDA where a GPU is present (marker `cuda`).
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import random_image

pytest.importorskip("bitsandbytes")

from edgevlm.backends.torch_ref import BNB_SKIP, TorchModel  # noqa: E402
from edgevlm.families import extractor_family, reasoner_family  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")])]
# Correlation of the quantized model's next-token logits with the full-precision ones (tiny random model).
MIN_CORR = {"int8": 0.999, "nf4": 0.98}


def _layers(model, cls_name: str) -> list[str]:
    return [name for name, mod in model.named_modules() if type(mod).__name__ == cls_name]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant, layer", [("int8", "Linear8bitLt"), ("nf4", "Linear4bit")])
def test_decoder_weights_are_quantized_and_logits_stay_close(tiny_dir, device, quant, layer):
    d = tiny_dir("qwen3")
    ref = TorchModel(d, reasoner_family(d), device=device)
    got = TorchModel(d, reasoner_family(d), device=device, quant=quant)
    quantized = _layers(got.model, layer)
    assert len(quantized) == 7 * got.model.config.num_hidden_layers  # q k v o gate up down
    assert type(got.model.lm_head).__name__ == "Linear"  # the head stays in full precision
    rendered = ref.tokenizer.apply_chat_template([{"role": "user", "content": "Describe the image."}])
    a, b = ref.prefill(ref.prepare(rendered)).logits, got.prefill(got.prepare(rendered)).logits
    assert np.corrcoef(a, b)[0, 1] >= MIN_CORR[quant]


@pytest.mark.parametrize("device", DEVICES)
def test_vision_side_is_never_quantized(tiny_dir, device):
    d = tiny_dir("llava_onevision")
    got = TorchModel(d, extractor_family(d), device=device, quant="nf4")
    quantized = _layers(got.model, "Linear4bit")
    assert quantized and not [n for n in quantized if any(s in n for s in BNB_SKIP)]


def test_cli_runs_the_pipeline_with_nf4(tiny_dir, tmp_path):
    image = tmp_path / "img.png"
    random_image(64, 48).save(image)
    proc = subprocess.run([sys.executable, "-m", "edgevlm", "run", str(image), "What is shown?", "--extractor",
                           str(tiny_dir("llava_onevision")), "--reasoner", str(tiny_dir("qwen3")), "--quant", "nf4",
                           "--max-new-tokens", "8", "--think-budget", "8", "--json"], capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    out = json.loads(proc.stdout)
    assert out["extraction"] is not None and "answer" in out


def test_unknown_quant_is_a_clear_error(tiny_dir):
    from edgevlm.errors import EdgeVLMError

    d = tiny_dir("qwen3")
    with pytest.raises(EdgeVLMError, match="nf4"):
        TorchModel(d, reasoner_family(d), quant="int3")
