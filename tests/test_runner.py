"""The request API for control loops (edgevlm.runner): answers equal a direct call's, a bounded queue that
refuses when full, latest-frame replacement, cancellation between tokens, deadlines that cut a stage and keep
what was finished, asyncio, and every input checked at submission."""

import asyncio
import time
from concurrent.futures import CancelledError

import numpy as np
import pytest
from conftest import random_image
from hypothesis import given, settings
from hypothesis import strategies as st

from edgevlm.errors import UsageError
from edgevlm.runner import QueueFullError, Runner, SupersededError

SHORT = dict(max_new_tokens=6, think_budget=6, instruction="the shapes")


@pytest.fixture
def pipe(pipelines):
    return pipelines("llava_onevision")


class Held:
    """Hold the pipeline's models (its one run slot) so that the runner's first request blocks on them."""

    def __init__(self, pipe):
        assert not pipe.pipelined
        self.lock = pipe._slots

    def __enter__(self):
        self.lock.acquire()

    def __exit__(self, *exc):
        self.lock.release()


def _wait_until(condition, timeout=30.0):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_a_request_answers_as_a_direct_call_does_with_its_events_and_queue_wait(pipe):
    image = random_image(seed=1)
    direct = pipe(image, "What is shown?", seed=2, **SHORT)
    with Runner(pipe) as runner:
        request = runner.submit(image, "What is shown?", seed=2, **SHORT)
        events = list(request.events())
        result = request.result(timeout=60)
    assert result.answer == direct.answer and result.stages["think"].token_ids == direct.stages["think"].token_ids
    assert [e.kind for e in events][-1] == "done" and events[-1].result is result
    assert result.queue_ms >= 0 and result.to_dict()["timings"]["queue_ms"] == round(result.queue_ms, 3)
    assert result.cut is None


def test_a_full_queue_refuses_at_once_and_the_queued_requests_all_run(pipe):
    with Runner(pipe, max_queue=2) as runner:
        with Held(pipe):
            first = runner.submit(random_image(), "q", **SHORT)
            _wait_until(lambda: runner.waiting == 0)  # the worker took it, and waits for the models
            queued = [runner.submit(random_image(seed=i), "q", **SHORT) for i in range(2)]
            with pytest.raises(QueueFullError, match="max_queue=2"):
                runner.submit(random_image(), "q", **SHORT)
        for request in [first, *queued]:
            assert request.result(timeout=60).answer is not None


def test_a_newer_frame_replaces_the_waiting_one_under_its_key(pipe):
    with Runner(pipe, max_queue=1) as runner:
        with Held(pipe):
            runner.submit(random_image(), "q", **SHORT)
            _wait_until(lambda: runner.waiting == 0)
            old = runner.submit(random_image(seed=1), "Where is the cup?", latest="front", **SHORT)
            new = runner.submit(random_image(seed=2), "Where is the cup?", latest="front", **SHORT)
            assert runner.waiting == 1  # replaced, not queued: a full queue (max 1) took the newer frame
        with pytest.raises(SupersededError, match="newer frame"):
            old.result(timeout=60)
        assert list(old.events()) == []
        assert new.result(timeout=60).stages


def test_cancelling_a_waiting_request_frees_its_place_and_a_running_one_stops_between_tokens(pipe):
    with Runner(pipe, max_queue=1) as runner:
        with Held(pipe):
            running = runner.submit(random_image(), "q", fixed_tokens=400, think_budget=400,
                                    instruction="x")
            _wait_until(lambda: runner.waiting == 0)
            waiting = runner.submit(random_image(), "q", **SHORT)
            assert waiting.cancel() and runner.waiting == 0
        with pytest.raises(CancelledError):
            waiting.result(timeout=1)
        events = running.events()
        assert next(events).kind == "stage_start"
        assert running.cancel()
        with pytest.raises(CancelledError):
            running.result(timeout=60)
        # the models are free again: the next request runs to its end
        assert runner.submit(random_image(), "q", **SHORT).result(timeout=60).stages["think"]


def test_a_deadline_cuts_the_stage_it_passes_in_and_keeps_what_was_finished(pipe):
    result = pipe(random_image(), "What is shown?", time_limit_s=0, **SHORT)
    assert result.cut == "extract" and result.stages == {} and result.answer == ""
    assert any("cut at the time limit" in n for n in result.notes)
    ask = dict(instruction="x", fixed_tokens=300, think_budget=300)
    full = [pipe(random_image(), "q", **ask) for _ in range(2)][-1]  # the second: warm
    budget, order = full.total_ms / 1e3 / 2, ["extract", "think"]
    with Runner(pipe) as runner:
        for _ in range(8):  # a loaded machine runs slower or faster than it measured: halve until a cut
            cut = runner.submit(random_image(), "q", deadline_s=budget, **ask).result(timeout=120)
            if cut.cut:
                break
            budget /= 2
    assert cut.cut in order and cut.answer == ""
    for stage in order[:order.index(cut.cut)]:  # finished before the deadline: whole
        assert cut.stages[stage].new_tokens == 300 and cut.stages[stage].stop_reason != "deadline"
    if cut.cut in cut.stages:  # stopped at a token: partial
        assert cut.stages[cut.cut].stop_reason == "deadline" and cut.stages[cut.cut].new_tokens < 300
    assert not set(cut.stages) - set(order[:order.index(cut.cut) + 1])  # nothing ran after it
    if cut.cut == "think":
        assert cut.extraction == cut.stages["extract"].text.strip()


def test_asyncio_code_awaits_requests_and_iterates_their_events(pipe):
    async def main():
        with Runner(pipe) as runner:
            request = runner.submit(random_image(), "q", **SHORT)
            kinds = [event.kind async for event in request.aevents()]
            return kinds, await request

    kinds, result = asyncio.run(main())
    assert kinds[0] == "stage_start" and kinds[-1] == "done" and result.stages


def test_a_numpy_frame_is_copied_at_submission(pipe):
    frame = np.asarray(random_image(seed=3)).copy()
    with Runner(pipe) as runner:
        with Held(pipe):
            runner.submit(random_image(), "q", **SHORT)
            _wait_until(lambda: runner.waiting == 0)
            request = runner.submit(frame, "q", **SHORT)
            frame[:] = 0  # the camera overwrites its buffer
            assert request.image is not frame and request.image.any()
        request.result(timeout=60)


@settings(max_examples=60, deadline=None)
@given(deadline=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5),
                          st.text(max_size=3)),
       question=st.one_of(st.text(max_size=20), st.none(), st.integers()),
       option=st.sampled_from([{}, {"mode": "nope"}, {"seed": -1}, {"bogus": 1}, {"time_limit_s": -1}]))
def test_every_submission_is_queued_or_refused_with_a_usage_error(pipelines, deadline, question, option):
    """Property: whatever a caller submits, it is a request or a one-line UsageError, at once."""
    pipe = pipelines("llava_onevision")
    with Runner(pipe, max_queue=64) as runner, Held(pipe):
        try:
            request = runner.submit(random_image(), question, deadline_s=deadline, **{**SHORT, **option})
        except UsageError as e:
            assert "\n" not in str(e)
        else:
            assert not request.done() or request.future.exception() is not None


def test_a_closed_runner_refuses_and_its_worker_ends(pipe):
    runner = Runner(pipe)
    runner.close()
    with pytest.raises(UsageError, match="closed"):
        runner.submit(random_image(), "q")
    assert not any(worker.is_alive() for worker in runner._workers)
