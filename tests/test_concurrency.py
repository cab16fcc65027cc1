"""Calls serialize on the models, but nothing waits on a caller: a paused, nested, interleaved or abandoned
stream never blocks another call. Every check runs under a timeout, so a regression fails instead of hanging."""

import gc
import threading

import pytest
from conftest import random_image

from edgevlm.errors import ImageError, UsageError

SHORT = dict(max_new_tokens=6, think_budget=6, temperature=0)
TIMEOUT = 120  # seconds; a run of the tiny models takes well under one


def finishes(fn, timeout: float | None = None):
    """fn() on a thread; its return value, or a failure if it does not return in time (a deadlock)."""
    timeout = timeout or TIMEOUT
    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # re-raised below in the test's thread
            out["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still blocked after {timeout} s: a deadlock"
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.fixture
def pipe(pipelines):
    return pipelines("llava_onevision")


def test_a_call_inside_a_paused_stream_in_the_same_thread_completes(pipe):
    def nested():
        stream = pipe.stream(random_image(), "What is shown?", **SHORT)
        first = next(stream)
        inner = pipe(random_image(seed=1), "What else?", **SHORT)  # today: deadlock (the stream holds the lock)
        rest = list(stream)
        return first, inner, rest

    first, inner, rest = finishes(nested)
    assert first.kind == "stage_start" and inner.answer is not None
    assert rest[-1].kind == "done" and rest[-1].result.stages["think"].new_tokens > 0


def test_two_interleaved_streams_in_one_thread_both_finish(pipe):
    def interleave():
        a = pipe.stream(random_image(), "What is shown?", **SHORT)
        b = pipe.stream(random_image(seed=2), "How many?", **SHORT)
        done = {}
        iters = {"a": a, "b": b}
        while iters:
            for name in list(iters):
                event = next(iters[name], None)
                if event is None:
                    del iters[name]
                elif event.kind == "done":
                    done[name] = event.result
        return done

    done = finishes(interleave)
    assert set(done) == {"a", "b"}
    # the same question as a plain call gives the same answer: the two runs never shared state
    assert done["a"].extraction == pipe(random_image(), "What is shown?", **SHORT).extraction


def test_an_abandoned_stream_lets_other_threads_in(pipe):
    stream = pipe.stream(random_image(), "What is shown?", max_new_tokens=64, think_budget=64, temperature=0)
    next(stream)
    del stream  # dropped mid-run: today the lock stays held until the generator is collected
    gc.collect()
    result = finishes(lambda: pipe(random_image(seed=3), "What is shown?", **SHORT))
    assert result.stages["think"].new_tokens > 0


def test_a_paused_stream_does_not_block_another_thread(pipe):
    stream = pipe.stream(random_image(), "What is shown?", **SHORT)
    assert next(stream).kind == "stage_start"  # then the consumer pauses, holding the iterator
    result = finishes(lambda: pipe(random_image(seed=4), "What is shown?", **SHORT))
    assert result.answer is not None
    assert list(stream)[-1].kind == "done"  # the paused one still completes, its events queued


def test_calls_from_many_threads_serialize_and_match_a_lone_call(pipe):
    expected = pipe(random_image(), "What is shown?", **SHORT).extraction
    results, errors = [], []

    def worker():
        try:
            results.append(pipe(random_image(), "What is shown?", **SHORT).extraction)
        except Exception as e:  # collected for the assertion below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not errors and results == [expected] * 4


def test_errors_reach_the_stream_consumer_in_its_own_thread(pipe):
    with pytest.raises(UsageError, match="question is empty"):
        pipe.stream(random_image(), "  ")  # checked before the stream is returned
    stream = pipe.stream(b"not an image", "What is shown?", **SHORT)
    with pytest.raises(ImageError):
        finishes(lambda: list(stream))
    assert finishes(lambda: pipe(random_image(), "What is shown?", **SHORT)).answer is not None  # the lock is free


@pytest.mark.parametrize("bad, needle", [
    (dict(question=123), "question must be a string"),
    (dict(choices="ab"), "choices must be a list"),
    (dict(choices=["a", 2]), "a choice must be a string"),
    (dict(choices=["a", " "]), "a choice is empty"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(temperature=float("inf")), "temperature must be a finite number"),
    (dict(temperature="hot"), "temperature must be a finite number"),
    (dict(think_budget=1.5), "thinking budget must be a whole number"),
    (dict(think_budget=0), "thinking budget must be at least 1"),
    (dict(max_new_tokens=True), "max_new_tokens must be a whole number"),
    (dict(seed="x"), "seed must be a whole number"),
    (dict(think="yes"), "think must be True or False"),
    (dict(instruction=["x"]), "instruction must be a string"),
    (dict(mode="fast"), "unknown mode"),
    (dict(seed=-1), "seed must be at least 0"),
    (dict(chioces=["a"]), "unknown option 'chioces'"),
])
def test_bad_arguments_are_usage_errors_not_type_errors(pipe, bad, needle):
    args = {"question": "What is shown?", **bad}
    question = args.pop("question")
    with pytest.raises(UsageError, match=needle):
        pipe(random_image(), question, **args)


def test_bad_cache_sizes_and_budgets_are_usage_errors(pipe):
    from edgevlm.memory import parse_size
    from edgevlm.pipeline import Pipeline

    for bad in (float("nan"), float("inf"), -1, "64"):
        with pytest.raises(UsageError, match="vision_cache_mb: the cache size must be"):
            Pipeline(pipe.extractor, pipe.reasoner, vision_cache_mb=bad)
        with pytest.raises(UsageError, match="prefix_cache_mb: the cache size must be"):
            Pipeline(pipe.extractor, pipe.reasoner, prefix_cache_mb=bad)
    for bad in (float("nan"), float("inf"), True, "lots"):
        with pytest.raises(UsageError):
            parse_size(bad)
