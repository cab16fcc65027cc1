"""edgevlm tune reads what `run` reads: images through load_image (EXIF rotation, alpha, limits), items through the
same line checks as eval."""

import json

import numpy as np
import pytest
from PIL import Image

from edgevlm.errors import UsageError
from edgevlm.images import load_image

torch = pytest.importorskip("torch")
tune = pytest.importorskip("edgevlm.train.tune")


def test_an_exif_rotated_image_gives_tune_the_pixels_run_sees(tiny_dir, torch_models, tmp_path):
    path = tmp_path / "rotated.jpg"
    a = np.zeros((30, 80, 3), np.uint8)
    a[:, :20] = (255, 0, 0)  # a red band at the left of the stored frame: at the top once turned upright
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(a).save(path, exif=exif, quality=95)
    item = {"image": path, "question": "What is shown?", "answer": "a band", "instruction": "the colours",
            "description": "A red band."}
    ex_dir = tiny_dir("llava_onevision")
    (example,) = tune.extractor_examples(ex_dir, [item], extra_fraction=0)
    ids, pixels = tune._Batcher(ex_dir, vision=True)._with_image(example.prompt, path)
    prepared = torch_models("llava_onevision").prepare(example.prompt, load_image(path))
    assert load_image(path).size == (30, 80)
    assert ids == prepared.input_ids
    assert set(pixels) == set(prepared.image_inputs)
    for key, value in pixels.items():
        torch.testing.assert_close(value.to(torch.float32), prepared.image_inputs[key][0].to(torch.float32),
                                   rtol=0, atol=0, msg=key)


def test_a_malformed_line_in_tunes_data_is_a_usage_error_naming_it(tiny_dir, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    good = {"image": "a.png", "question": "q", "answer": "B", "choices": ["x", "y"], "description": "d"}
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(good) + "\n" + json.dumps({**good, "answer": "C"}) + "\n")
    with pytest.raises(UsageError, match=rf"{data}:2: \"answer\" 'C' is not the letter of one of the 2 choices"):
        tune.tune(tiny_dir("qwen3"), data, tmp_path / "out", steps=1, log=lambda m: None)
    assert not (tmp_path / "out").exists()
