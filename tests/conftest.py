"""Shared fixtures: tiny models built once per session from configs (never downloaded)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """tiny_dir(family) -> directory of that tiny model, built on first use."""
    from edgevlm.train.tiny import make_tiny

    root = tmp_path_factory.mktemp("tiny")
    built = {}

    def get(family: str):
        if family not in built:
            built[family] = make_tiny(family, root / family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_bundle(tiny_dir, tmp_path_factory):
    """An fp32 bundle of the tiny LLaVA-OneVision(Qwen3) extractor and the tiny Qwen3 reasoner."""
    from edgevlm.export.exporter import export_bundle

    path = tmp_path_factory.mktemp("bundle") / "llava"
    return export_bundle(path, extractor=str(tiny_dir("llava_onevision")), reasoner=str(tiny_dir("qwen3")),
                         log=lambda m: None)


@pytest.fixture(scope="session")
def torch_models(tiny_dir):
    """torch_models(family) -> TorchModel on the tiny model, loaded once."""
    from edgevlm.backends.torch_ref import TorchModel
    from edgevlm.families import extractor_family, reasoner_family

    loaded = {}

    def get(family: str):
        if family not in loaded:
            d = tiny_dir(family)
            fam = reasoner_family(d) if family == "qwen3" else extractor_family(d)
            loaded[family] = TorchModel(d, fam)
        return loaded[family]

    return get


@pytest.fixture(scope="session")
def pipelines(torch_models):
    """pipelines(extractor_family) -> Pipeline with that tiny extractor and the tiny Qwen3 reasoner."""
    from edgevlm.pipeline import Pipeline

    made = {}

    def get(family: str):
        if family not in made:
            made[family] = Pipeline(torch_models(family), torch_models("qwen3"))
        return made[family]

    return get


def random_image(h: int = 50, w: int = 70, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def prefill_each(models, rendered, image=None) -> list:
    """Each model's decode state after the same rendered prompt (and image): what parity tests compare."""
    states = []
    for model in models:
        prepared = model.prepare(rendered, image)
        model.encode(prepared)
        states.append(model.prefill(prepared))
    return states
