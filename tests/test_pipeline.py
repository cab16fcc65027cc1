"""The Extract->Think pipeline end to end on each tiny extractor family with the tiny Qwen3 reasoner."""

import json
import threading

import numpy as np
import pytest
from conftest import random_image
from PIL import Image

from edgevlm import prompts
from edgevlm.errors import ImageError, InputTooLongError, UsageError
from edgevlm.pipeline import Pipeline

FAMILIES = ["llava_onevision", "idefics3"]
SHORT = dict(max_new_tokens=12, think_budget=16)


@pytest.mark.parametrize("family", FAMILIES)
def test_extract_think_runs_three_stages_with_the_papers_prompts(pipelines, family):
    pipe = pipelines(family)
    r = pipe(random_image(), "What is shown?", **SHORT)
    assert list(r.stages) == ["plan", "extract", "think"]
    plan, extract, think = r.stages["plan"], r.stages["extract"], r.stages["think"]
    # plan: reasoner, thinking off, few-shot prompt ending with the question
    assert prompts.planner_prompt("What is shown?") in plan.prompt
    assert plan.prompt.endswith("<think>\n\n</think>\n\n")
    assert r.instruction == prompts.parse_instruction(plan.text)
    # extract: the perception prompt with the planner's instruction, on the image
    assert prompts.extract_prompt(r.instruction) in extract.prompt
    assert extract.timings.vision_ms > 0 and extract.new_tokens <= 12
    assert r.extraction == extract.text.strip()
    # think: text only, the reasoning prompt built from the extraction, thinking on
    assert prompts.reasoner_prompt(r.extraction, "What is shown?", multiple_choice=False, think=True) in think.prompt
    assert think.prompt.endswith("<|im_start|>assistant\n")
    assert think.new_tokens <= 16 + 12
    assert r.models == {"extractor": pipe.extractor.name, "planner": pipe.reasoner.name,
                        "reasoner": pipe.reasoner.name}


def test_reasoning_and_response_are_split_at_think_end(pipelines):
    r = pipelines("llava_onevision")(random_image(), "What is shown?", **SHORT)
    think = r.stages["think"]
    tok = pipelines("llava_onevision").reasoner.tokenizer
    cut = think.token_ids.index(tok.token_id("</think>"))  # the budget forces it at token 16
    assert cut <= 15
    assert r.response == tok.decode(think.token_ids[cut + 1:]).strip()
    assert r.answer == prompts.parse_answer(r.response, multiple_choice=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_direct_mode_asks_the_vlm_alone(pipelines, family):
    r = pipelines(family)(random_image(), "What is shown?", mode="direct", max_new_tokens=8)
    assert list(r.stages) == ["direct"]
    assert prompts.direct_prompt("What is shown?", multiple_choice=False) in r.stages["direct"].prompt
    assert r.instruction is None and r.extraction is None and "reasoner" not in r.models


def test_extract_mode_stops_after_the_description(pipelines):
    r = pipelines("idefics3")(random_image(), "What is shown?", mode="extract", max_new_tokens=8)
    assert list(r.stages) == ["plan", "extract"]
    assert r.answer == r.extraction


def test_given_instruction_skips_the_planner(pipelines):
    r = pipelines("llava_onevision")(random_image(), "Q?", mode="extract", instruction="the colors", max_new_tokens=4)
    assert list(r.stages) == ["extract"]
    assert prompts.extract_prompt("the colors") in r.stages["extract"].prompt


def test_choices_make_a_multiple_choice_question(pipelines):
    r = pipelines("llava_onevision")(random_image(), "Which color?", choices=["red", "blue"], think=False,
                                     max_new_tokens=8)
    assert r.multiple_choice and r.question == "Which color?\nOptions: A: red, B: blue"
    assert prompts.POST_DIRECT_CHOICE in r.stages["think"].prompt
    assert r.stages["think"].prompt.endswith("<think>\n\n</think>\n\n")  # --no-think


def test_results_are_reproducible_with_a_seed_and_vary_without(pipelines):
    pipe = pipelines("llava_onevision")
    a = pipe(random_image(), "What is shown?", seed=3, **SHORT)
    b = pipe(random_image(), "What is shown?", seed=3, **SHORT)
    assert a.stages["think"].token_ids == b.stages["think"].token_ids
    others = {tuple(pipe(random_image(), "What is shown?", seed=s, **SHORT).stages["think"].token_ids)
              for s in range(4, 8)}
    assert len(others) > 1  # thinking samples (temperature 0.6)


def test_stream_events_add_up_to_the_result(pipelines):
    events = list(pipelines("idefics3").stream(random_image(), "What is shown?", **SHORT))
    result = events[-1].result
    assert events[-1].kind == "done"
    for name, stage in result.stages.items():
        kinds = [e.kind for e in events if e.stage == name]
        assert kinds[0] == "stage_start" and kinds[-1] == "stage_end"
        assert "".join(e.text for e in events if e.stage == name and e.kind == "token") == stage.text


def test_json_has_every_field(pipelines):
    d = json.loads(json.dumps(pipelines("llava_onevision")(random_image(), "What is shown?", **SHORT).to_dict()))
    for key in ("answer", "extraction", "instruction", "reasoning", "timings", "tokens", "models"):
        assert key in d
    for stage in ("plan", "extract", "think"):
        t = d["timings"][stage]
        assert set(t) >= {"preprocess_ms", "vision_ms", "prefill_ms", "decode_ms", "ttft_ms", "decode_tok_s"}
        assert t["ttft_ms"] >= t["prefill_ms"] > 0
        assert d["tokens"][stage]["prompt"] > 0 and d["tokens"][stage]["generated"] > 0
    stages_ms = sum(d["timings"][s]["total_ms"] for s in ("plan", "extract", "think"))
    assert d["timings"]["total_ms"] >= stages_ms + d["timings"]["image_ms"]


def test_threads_serialize_and_never_mix_state(pipelines):
    pipe = pipelines("llava_onevision")
    images = [random_image(seed=s) for s in range(4)]
    expected = [pipe(img, "What is shown?", mode="extract", max_new_tokens=10).extraction for img in images]
    got = [None] * 4

    def work(i):
        got[i] = pipe(images[i], "What is shown?", mode="extract", max_new_tokens=10).extraction

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected


def test_numpy_bgr_frames_are_accepted(pipelines):
    frame = np.asarray(random_image())[:, :, ::-1].copy()
    pipe = pipelines("llava_onevision")
    a = pipe(frame, "Q?", mode="direct", bgr=True, max_new_tokens=6)
    b = pipe(random_image(), "Q?", mode="direct", max_new_tokens=6)
    assert a.stages["direct"].token_ids == b.stages["direct"].token_ids


@pytest.mark.parametrize("question, kwargs, error", [
    ("", {}, UsageError),
    ("   \n", {}, UsageError),
    ("x" * 200_000, {}, UsageError),
    ("q", {"mode": "dream"}, UsageError),
    ("q", {"max_new_tokens": 0}, UsageError),
    ("q", {"think_budget": 0}, UsageError),
])
def test_bad_calls_are_usage_errors(pipelines, question, kwargs, error):
    with pytest.raises(error):
        pipelines("llava_onevision")(random_image(), question, **kwargs)


def test_a_question_longer_than_the_context_is_refused(pipelines):
    long_question = " ".join(["What color is the car near the house?"] * 400)  # > 2048 tokens
    with pytest.raises(InputTooLongError, match="takes at most 2048"):
        pipelines("llava_onevision")(random_image(), long_question)


def test_bad_image_is_an_image_error(pipelines, tmp_path):
    with pytest.raises(ImageError):
        pipelines("llava_onevision")(tmp_path / "missing.png", "q")


def test_extract_think_needs_a_reasoner(torch_models):
    pipe = Pipeline(torch_models("llava_onevision"))
    with pytest.raises(UsageError, match="needs a reasoner"):
        pipe(random_image(), "q")
    assert pipe(random_image(), "q", mode="direct", max_new_tokens=2).answer is not None


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("odd")
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (90, 60), (0, 255, 255, 0)).save(cmyk)
    huge = tmp_path / "huge.jpg"
    Image.new("RGB", (12000, 12000), (30, 90, 200)).save(huge)
    deep = np.linspace(0, 65535, 64 * 48, dtype=np.uint16).reshape(48, 64)
    rgba = Image.new("RGBA", (33, 77), (200, 10, 10, 128))
    return {"grayscale": Image.new("L", (64, 40), 128), "rgba": rgba, "16-bit": deep, "cmyk": cmyk, "huge": huge,
            "1x1": Image.new("RGB", (1, 1), (5, 5, 5)), "wide": random_image(3, 900), "tall": random_image(700, 5)}


@pytest.mark.parametrize("family", FAMILIES)
def test_odd_images_run_through_the_vision_side(pipelines, family, odd_images):
    pipe = pipelines(family)
    for name, image in odd_images.items():
        r = pipe(image, "What is shown?", mode="direct", max_new_tokens=2)
        assert r.stages["direct"].timings.vision_ms > 0, name
        assert r.stages["direct"].new_tokens == 2, name
