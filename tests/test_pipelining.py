"""Frame pipelining: two runs in flight, each stage holding its model, so one frame's extract runs beside another's
think; the answers are those of runs in turn, a model never runs two stages at once, and the memory plan allows it
only when both stages fit."""

import itertools

import pytest
from conftest import random_image

from edgevlm import bundle as bundle_mod
from edgevlm import memory
from edgevlm.pipeline import Pipeline
from edgevlm.runner import Runner

OPTIONS = dict(fixed_tokens=12, think_budget=12)
MODEL_OF = {"plan": "reasoner", "think": "reasoner", "extract": "extractor"}


def _intervals(result) -> dict[str, tuple[float, float]]:
    """Each stage's (start, end) on the perf_counter clock, from its profile spans."""
    out = {}
    for span in result.profile.spans:
        if span.stage in MODEL_OF:
            start, end = out.get(span.stage, (span.start, span.end))
            out[span.stage] = (min(start, span.start), max(end, span.end))
    return out


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def _answer_frames(pipe, frames):
    with Runner(pipe, max_queue=len(frames)) as runner:
        requests = [runner.submit(frame, "What is shown?", **OPTIONS) for frame in frames]
        return [request.result(timeout=120) for request in requests]


def test_pipelined_runs_overlap_one_frames_extract_with_anothers_think_and_answer_as_in_turn(tiny_bundle):
    frames = [random_image(64, 48, seed=s) for s in range(4)]
    pipelined = Pipeline.from_bundle(str(tiny_bundle), pipelined=True, vision_cache_mb=0, prefix_cache_mb=0)
    in_turn = Pipeline.from_bundle(str(tiny_bundle), pipelined=False, vision_cache_mb=0, prefix_cache_mb=0)
    assert pipelined.pipelined and not in_turn.pipelined
    a, b = _answer_frames(pipelined, frames), _answer_frames(in_turn, frames)
    for x, y in zip(a, b, strict=True):
        for stage in ("plan", "extract", "think"):
            assert x.stages[stage].token_ids == y.stages[stage].token_ids
    spans = [_intervals(r) for r in a]
    beside = [(i, j) for i, j in itertools.permutations(range(len(a)), 2)
              if _overlap(spans[i]["think"], spans[j]["extract"])]
    assert beside, "no frame's extract ran beside another's think"
    # a model runs one stage at a time: stages of one model never overlap across runs
    for (i, si), (j, sj) in itertools.combinations(enumerate(spans), 2):
        for x, y in itertools.product(si, sj):
            if MODEL_OF[x] == MODEL_OF[y]:
                assert not _overlap(si[x], sj[y]), (i, x, j, y)
    # in turn: no stage of one run beside any of another's
    spans = [_intervals(r) for r in b]
    for si, sj in itertools.combinations(spans, 2):
        assert not any(_overlap(si[x], sj[y]) for x, y in itertools.product(si, sj))


def test_a_pipelined_call_can_be_cancelled_and_the_other_run_finishes(tiny_bundle):
    pipe = Pipeline.from_bundle(str(tiny_bundle), pipelined=True)
    with Runner(pipe, max_queue=2) as runner:
        long = runner.submit(random_image(seed=1), "q", fixed_tokens=400, think_budget=400)
        short = runner.submit(random_image(seed=2), "q", **OPTIONS)
        events = long.events()
        next(events)
        assert long.cancel()
        assert short.result(timeout=120).stages["think"].new_tokens == OPTIONS["fixed_tokens"]
        # both models are free again
        assert runner.submit(random_image(seed=3), "q", **OPTIONS).result(timeout=120).stages["think"]


def test_pipelining_needs_two_models_that_compute_side_by_side(tiny_bundle, torch_models):
    assert not Pipeline(torch_models("llava_onevision"), torch_models("qwen3"), pipelined=True).pipelined
    onnx = Pipeline.from_bundle(str(tiny_bundle), pipelined=True)
    assert not Pipeline(onnx.extractor, None, pipelined=True).pipelined  # no reasoner: nothing to pipeline
    assert Pipeline(onnx.extractor, onnx.reasoner, pipelined=True).pipelined


def test_the_plan_allows_pipelining_only_when_both_models_stages_fit(tiny_bundle):
    b = bundle_mod.load(tiny_bundle, verify=False)
    free = memory.plan(b, None)
    assert free.pipelining and free.to_dict()["pipelining"] is True
    costs = memory.costs(b)
    fixed = sum(free.resident.values())
    vision = max(sum(c.vision_bytes()) for c in costs)
    both = fixed + sum(c.stage_bytes(c.max_context, 512) for c in costs) + vision
    assert memory.plan(b, both).pipelining
    tight = fixed + max(c.stage_bytes(c.max_context, 512) for c in costs)  # each stage fits alone, not both
    plan = memory.plan(b, tight)
    assert not plan.pipelining and "extract beside another's think: does not fit" in plan.describe()
    assert not Pipeline.from_bundle(str(tiny_bundle), memory_budget=tight, pipelined=True, vision_cache_mb=0,
                                    prefix_cache_mb=0).pipelined


@pytest.mark.parametrize("pipelined", [True, False])
def test_the_runner_serves_two_at_once_only_on_a_pipelined_pipeline(tiny_bundle, pipelined):
    pipe = Pipeline.from_bundle(str(tiny_bundle), pipelined=pipelined)
    with Runner(pipe) as runner:
        assert len(runner._workers) == (2 if pipelined else 1)
