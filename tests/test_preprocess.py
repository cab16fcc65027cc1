"""The runtime's numpy image preprocessing, token counts and feature packing equal transformers' own.

Checked on the tiny models' settings and on the real ones' (LLaVA-OneVision / the paper's extractor:
384 px crops, patch 14, 36 AnyRes pinpoints, anyres_max_9; SmolVLM: 1536 px, 384 px crops, Lanczos).
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from edgevlm.export import llava_onevision as export_llava
from edgevlm.families import idefics3, llava_onevision
from edgevlm.images import load_image
from edgevlm.tokenizer import Tokenizer
from edgevlm.train.tiny import build_tokenizer

TOL = 1e-5


def odd_images():
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 255, (40, 60, 4), dtype=np.uint8), "RGBA")
    return {
        "1x1": Image.new("RGB", (1, 1), (9, 99, 199)),
        "tiny 5x3": Image.fromarray(rng.integers(0, 255, (3, 5, 3), dtype=np.uint8)),
        "portrait": Image.fromarray(rng.integers(0, 255, (900, 300, 3), dtype=np.uint8)),
        "landscape": Image.fromarray(rng.integers(0, 255, (240, 1000, 3), dtype=np.uint8)),
        "square": Image.fromarray(rng.integers(0, 255, (384, 384, 3), dtype=np.uint8)),
        "grayscale": Image.fromarray(rng.integers(0, 255, (120, 77), dtype=np.uint8), "L"),
        "rgba": rgba,
        "huge": Image.fromarray(rng.integers(0, 255, (3000, 4000, 3), dtype=np.uint8)),
        "extreme strip": Image.fromarray(rng.integers(0, 255, (7, 2500, 3), dtype=np.uint8)),
    }


PAPER_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
PAPER_LLAVA = {
    "crop_size": [384, 384], "patch_size": 14, "image_grid_pinpoints": PAPER_PINPOINTS, "resample": 3,
    "rescale_factor": 1 / 255, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "num_image_tokens": 729,
    "vision_aspect_ratio": "anyres_max_9", "vision_feature_select_strategy": "full", "image_token_id": 3,
}
SMOLVLM = {
    "longest_edge": 1536, "max_image_size": 384, "do_image_splitting": True, "resample": 1, "rescale_factor": 1 / 255,
    "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "image_seq_len": 81, "image_token_id": 3,
}


def _llava_hf(cfg):
    from transformers import LlavaOnevisionImageProcessorPil

    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": cfg["crop_size"][0], "width": cfg["crop_size"][1]},
        image_grid_pinpoints=cfg["image_grid_pinpoints"], image_mean=cfg["image_mean"], image_std=cfg["image_std"],
        resample=cfg["resample"], do_pad=True)
    processor = export_llava._processor_class()(
        image_processor=image_processor, tokenizer=build_tokenizer(), num_image_tokens=cfg["num_image_tokens"],
        vision_feature_select_strategy="full")
    model = SimpleNamespace(config=SimpleNamespace(
        vision_config=SimpleNamespace(image_size=cfg["crop_size"][0], patch_size=cfg["patch_size"]),
        image_grid_pinpoints=cfg["image_grid_pinpoints"]))
    return processor, model


@pytest.fixture(scope="module")
def llava_cases(tiny_dir):
    return {"tiny": llava_onevision.preprocess_config(tiny_dir("llava_onevision")), "paper": PAPER_LLAVA}


@pytest.mark.parametrize("which", ["tiny", "paper"])
def test_llava_onevision_pixels_token_counts_and_packing_match_hf(llava_cases, which):
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    cfg = llava_cases[which]
    processor, model = _llava_hf(cfg)
    side = int(np.sqrt(cfg["num_image_tokens"]))
    hidden = 8
    newline = np.random.default_rng(1).normal(size=hidden).astype(np.float32)
    for name, raw in odd_images().items():
        pixels, size = llava_onevision.preprocess(load_image(raw), cfg)
        ref = processor.image_processor(raw, return_tensors="np")
        np.testing.assert_allclose(pixels, ref["pixel_values"][0], atol=TOL, err_msg=name)
        assert tuple(size) == tuple(ref["image_sizes"][0]), name
        h, w = size
        expected = processor._get_number_of_features(h, w, *ref["pixel_values"].shape[-2:])
        assert llava_onevision.num_image_tokens(size, cfg) == expected, name
        feats = np.random.default_rng(2).normal(size=(len(pixels), side * side, hidden)).astype(np.float32)
        packed, _ = LlavaOnevisionModel.pack_image_features(
            model, [torch.from_numpy(feats)], torch.tensor([size]), torch.from_numpy(newline),
            vision_aspect_ratio=cfg["vision_aspect_ratio"])
        ours = llava_onevision.pack_features(feats, size, newline, cfg)
        assert ours.shape == (expected, hidden), name
        np.testing.assert_allclose(ours, packed[0].numpy(), atol=TOL, err_msg=name)


def test_bilinear_downsampling_matches_torch():
    x = np.random.default_rng(0).normal(size=(5, 54, 81)).astype(np.float32)
    for out in [(27, 40), (13, 61), (54, 81), (1, 1)]:
        ref = torch.nn.functional.interpolate(torch.from_numpy(x)[None], list(out), mode="bilinear")[0].numpy()
        np.testing.assert_allclose(llava_onevision.interpolate_bilinear(x, *out), ref, atol=TOL)


def test_paper_shaped_packing_is_downsampled_past_nine_crops():
    # a big square image fills the 6x6 pinpoint: 36 crops of 27x27 features are more than anyres_max_9 allows
    assert llava_onevision.select_best_resolution((3000, 3000), PAPER_PINPOINTS) == (2304, 2304)
    assert llava_onevision.num_image_tokens((3000, 3000), PAPER_LLAVA) < 729 + 36 * 729 // 2


@pytest.fixture(scope="module")
def idefics3_cases(tiny_dir):
    return {"tiny": idefics3.preprocess_config(tiny_dir("idefics3")), "smolvlm": SMOLVLM}


@pytest.mark.parametrize("which", ["tiny", "smolvlm"])
def test_idefics3_pixels_and_prompt_expansion_match_hf(tiny_dir, idefics3_cases, which):
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    cfg = idefics3_cases[which]
    d = tiny_dir("idefics3")
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": cfg["longest_edge"]}, max_image_size={"longest_edge": cfg["max_image_size"]},
        resample=cfg["resample"], image_mean=cfg["image_mean"], image_std=cfg["image_std"], do_image_splitting=True)
    from transformers import AutoTokenizer

    processor = Idefics3Processor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(d),
                                  image_seq_len=cfg["image_seq_len"])
    tok = Tokenizer(d)
    prompt = idefics3.FAMILY.render(tok, "Hi", with_image=True)
    for name, raw in odd_images().items():
        ids, inputs = idefics3.prepare_inputs(prompt, load_image(raw), cfg, tok)
        ref = processor(text=str(prompt), images=raw, return_tensors="np")
        np.testing.assert_allclose(inputs["pixel_values"], ref["pixel_values"][0], atol=TOL, err_msg=name)
        assert ref["pixel_attention_mask"].all(), name  # one image: every crop is full, as the graph assumes
        assert ids == ref["input_ids"][0].tolist(), name
        assert ids.count(cfg["image_token_id"]) == len(inputs["pixel_values"]) * cfg["image_seq_len"]
