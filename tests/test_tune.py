"""edgevlm tune: the training examples are the runtime's prompts, loss goes down, resume is exact, LoRA merges
(at save, or from an adapter saved alone on first use)."""

import json
import re

import numpy as np
import pytest

from edgevlm import prompts
from edgevlm.train import scenes

torch = pytest.importorskip("torch")
tune = pytest.importorskip("edgevlm.train.tune")


@pytest.fixture(scope="module")
def scene_items(tmp_path_factory):
    from edgevlm.evaluation import load_items

    folder = scenes.make_set(tmp_path_factory.mktemp("scenes"), 6, seed=5, split="train")
    return load_items(folder / "items.jsonl")


def test_examples_are_the_runtime_prompts(tiny_dir, scene_items):
    from edgevlm.backends.torch_ref import TorchModel
    from edgevlm.families import extractor_family, reasoner_family
    from edgevlm.pipeline import render_prompt

    ex_dir, re_dir = tiny_dir("llava_onevision"), tiny_dir("qwen3")
    item = next(i for i in scene_items if i.get("choices"))
    extractor = TorchModel(ex_dir, extractor_family(ex_dir))
    reasoner = TorchModel(re_dir, reasoner_family(re_dir))
    examples = tune.extractor_examples(ex_dir, [item], extra_fraction=1.0)
    assert examples[0].prompt == render_prompt(extractor, prompts.extract_prompt(item["instruction"]), with_image=True)
    assert str(examples[0].target) == item["description"]
    question = prompts.format_question(item["question"], item["choices"])
    assert examples[1].prompt == render_prompt(extractor, prompts.direct_prompt(question, multiple_choice=True),
                                               with_image=True)
    plan, think, answer = tune.reasoner_examples(re_dir, [item], extra_fraction=1.0)
    assert plan.prompt == render_prompt(reasoner, prompts.planner_prompt(question), enable_thinking=False)
    assert prompts.parse_instruction(str(plan.target)) == item["instruction"]
    think_prompt = prompts.reasoner_prompt(item["description"], question, multiple_choice=True, think=True)
    assert think.prompt == render_prompt(reasoner, think_prompt, enable_thinking=True)
    assert str(think.target).startswith("<think>\n") and "</think>" in str(think.target)
    assert prompts.parse_answer(str(think.target).split("</think>")[1], multiple_choice=True) == item["answer"]
    assert prompts.parse_answer(str(answer.target), multiple_choice=True) == item["answer"]


def test_scene_reasoning_avoids_the_words_nowait_bans(scene_items):
    banned = re.compile(r"\b(" + "|".join(map(re.escape, prompts.REFLEXIVE_WORDS)) + r")\b", re.IGNORECASE)
    for item in scene_items:
        assert not banned.search(item["reasoning"]), item["reasoning"]


@pytest.mark.parametrize("family", ["llava_onevision", "qwen3"])
def test_tune_lowers_the_validation_loss_and_saves_a_loadable_model(tiny_dir, scene_items, tmp_path, family):
    from edgevlm.pipeline import Pipeline

    out = tmp_path / "tuned"
    scores = tune.tune(tiny_dir(family), scene_items, out, steps=12, batch_size=4, lr=3e-3, warmup=2,
                       val_fraction=0.2, eval_every=12, log=lambda m: None)
    first, last = scores["history"][0], scores["history"][-1]
    assert last["step"] == 12 and last["val_loss"] < 0.8 * first["val_loss"]
    assert not (tmp_path / "tuned.partial").exists()
    kwargs = {"extractor": str(out), "reasoner": str(tiny_dir("qwen3"))} if family != "qwen3" else {
        "extractor": str(tiny_dir("llava_onevision")), "reasoner": str(out)}
    result = Pipeline.from_pretrained(**kwargs)(scene_items[0]["image"], "What is shown?", max_new_tokens=4)
    assert result.answer is not None


def _weights(path):
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def test_an_interrupted_tune_resumes_to_the_same_weights(tiny_dir, scene_items, tmp_path):
    common = dict(steps=6, batch_size=3, lr=3e-3, warmup=1, val_fraction=0.2, eval_every=3, save_every=3,
                  log=lambda m: None)
    tune.tune(tiny_dir("qwen3"), scene_items, tmp_path / "straight", **common)

    def interrupt(step):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tune.tune(tiny_dir("qwen3"), scene_items, tmp_path / "resumed", on_step=interrupt, **common)
    assert (tmp_path / "resumed.partial" / tune.CHECKPOINT).exists() and not (tmp_path / "resumed").exists()
    scores = tune.tune(tiny_dir("qwen3"), scene_items, tmp_path / "resumed", resume=True, **common)
    assert scores["history"][0]["step"] == 3
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key].numpy(), b[key].numpy(), atol=1e-6, err_msg=key)


@pytest.mark.parametrize("family", ["llava_onevision", "idefics3"])
def test_freeze_vision_tunes_the_language_model_only(tiny_dir, scene_items, tmp_path, family):
    base = _weights(tiny_dir(family))
    tune.tune(tiny_dir(family), scene_items, tmp_path / "tuned", steps=3, batch_size=2, lr=1e-2, warmup=1,
              val_fraction=0.2, eval_every=3, freeze_vision=True, log=lambda m: None)
    tuned = _weights(tmp_path / "tuned")
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    frozen = {k for k in base if set(k.split(".")) & set(tune.VISION_MODULES)}
    assert frozen and changed and not changed & frozen  # the tower and projector as they were; the rest learned


@pytest.mark.parametrize("family", ["llava_onevision", "idefics3"])
def test_an_image_and_a_prompt_are_processed_once_with_the_same_result(tiny_dir, scene_items, family):
    from dataclasses import replace

    images = sorted({i["image"] for i in scene_items})[:2]
    first = [i for i in scene_items if i["image"] == images[0]]
    two = tune.extractor_examples(tiny_dir(family), first, extra_fraction=0)[:2]
    assert two[0].prompt != two[1].prompt
    examples = two + [replace(ex, image=images[1]) for ex in two]  # two images, two prompts, in all four pairs
    shared = tune._Batcher(tiny_dir(family), True)
    calls = []
    processor = shared.processor

    class Counting:  # the processor, counting its calls
        image_token = processor.image_token

        def __call__(self, **kw):
            calls.append(kw["images"])
            return processor(**kw)

    shared.processor = Counting()
    encoded = [shared.encode(ex) for ex in examples]
    assert len(calls) == 3  # the fourth pair's image and prompt were both processed before
    for ex, (ids, target, pixels) in zip(examples, encoded, strict=True):
        ids2, target2, pixels2 = tune._Batcher(tiny_dir(family), True).encode(ex)
        assert ids == ids2 and target == target2
        for key in pixels2:
            torch.testing.assert_close(pixels[key], pixels2[key])


def test_lora_is_merged_into_the_saved_weights(tiny_dir, scene_items, tmp_path):
    pytest.importorskip("peft")
    base = _weights(tiny_dir("qwen3"))
    scores = tune.tune(tiny_dir("qwen3"), scene_items, tmp_path / "lora", steps=8, batch_size=4, lr=1e-2, lora=4,
                       warmup=1, val_fraction=0.2, eval_every=8, log=lambda m: None)
    assert scores["history"][-1]["val_loss"] < scores["history"][0]["val_loss"]
    tuned = _weights(tmp_path / "lora")
    assert tuned.keys() == base.keys()  # no adapter tensors: merged
    changed = [k for k in base if not torch.equal(base[k], tuned[k])]
    assert changed and all("proj" in k for k in changed)  # LoRA touches the projections only


def test_an_adapter_saved_alone_merges_into_its_base_on_first_use(tiny_dir, scene_items, tmp_path, monkeypatch):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from edgevlm.errors import ModelError
    from edgevlm.export import adapter
    from edgevlm.export.checkpoints import resolve

    monkeypatch.setenv("EDGEVLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "adapter"
    tune.tune(tiny_dir("qwen3"), scene_items, out, steps=4, batch_size=4, lr=1e-2, lora=4, warmup=1,
              val_fraction=0.2, eval_every=4, adapter_only=True, log=lambda m: None)
    assert adapter.is_adapter(out) and not list(out.glob("model*.safetensors"))  # the adapter alone
    merged = resolve(str(out))
    assert merged.parent == tmp_path / "cache" / "merged" and (merged / "tokenizer.json").exists()
    # the merged checkpoint computes what peft computes with the adapter on the base, and not what the base does
    base = AutoModelForCausalLM.from_pretrained(tiny_dir("qwen3"), dtype=torch.float32).eval()
    ids = torch.tensor([list(range(5, 40))])
    with torch.no_grad():
        plain = base(ids).logits
        ref = peft.PeftModel.from_pretrained(base, out).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()(ids).logits
    assert (ref - plain).abs().max() > 1e-3
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    stamp = (merged / "model.safetensors").stat().st_mtime_ns
    assert resolve(str(out)) == merged and (merged / "model.safetensors").stat().st_mtime_ns == stamp  # cached

    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(ModelError, match="LoRA adapter on .*gone, which cannot be loaded"):
        resolve(str(out))
    with pytest.raises(tune.UsageError, match="--lora"):
        tune.tune(tiny_dir("qwen3"), scene_items, tmp_path / "x", steps=1, adapter_only=True, log=lambda m: None)


def test_cli_tune_reports_scores_and_rejects_bad_data(tiny_dir, scene_items, tmp_path):
    from test_cli import assert_one_line_error, edgevlm

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    assert_one_line_error(edgevlm("tune", "--model", tiny_dir("qwen3"), "--data", bad, "--out", tmp_path / "o"),
                          2, "bad.jsonl:1:")
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps({**i, "image": str(i["image"])}) + "\n" for i in scene_items))
    proc = edgevlm("tune", "--model", tiny_dir("qwen3"), "--data", data, "--out", tmp_path / "o", "--steps", "2",
                   "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout)["step"] == 2 and (tmp_path / "o" / "config.json").exists()


def test_a_teacher_writes_the_descriptions_items_lack(tiny_dir, scene_items, tmp_path):
    items = [{k: v for k, v in i.items() if k != "description"} for i in scene_items[:4]]
    with pytest.raises(Exception, match="no description"):
        tune.tune(tiny_dir("qwen3"), items, tmp_path / "none", steps=1, log=lambda m: None)
    tune.tune(tiny_dir("qwen3"), items, tmp_path / "taught", steps=2, batch_size=2,
              teacher=str(tiny_dir("llava_onevision")), log=lambda m: None)
    assert all(i.get("description") for i in items)  # written by the teacher (a tiny random extractor here)
    assert (tmp_path / "taught" / "config.json").exists()
