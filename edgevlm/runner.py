"""Requests for control loops: questions about frames, answered in order by a pipeline's models, with
deadlines, cancellation, a bounded queue and a latest-frame mode.

    runner = Runner(Pipeline.from_bundle("bundle"), max_queue=4)
    request = runner.submit(frame, "Is the path clear?", deadline_s=2.0, latest="front-camera")
    for event in request.events():          # or: result = request.result(); or in asyncio: await request
        ...
    request.cancel()                        # stops between tokens, frees the models for the next request

A request's deadline counts from its submission (queue wait included): the run stops at the token where it
passes, and the Result says which stage was cut (`Result.cut`) and keeps what was finished. A `latest` key
makes a camera loop's newest frame replace the one still waiting under that key, never queue behind it. A full
queue refuses at once (QueueFullError). Every Result carries its queue wait (`queue_ms`) and stage timings.
On a pipelined Pipeline two requests run at once, one's extract beside the other's think; otherwise one.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import CancelledError, Future

import numpy as np

from edgevlm.errors import EdgeVLMError, UsageError
from edgevlm.images import ImageInput
from edgevlm.options import Options, check_text, finite_number
from edgevlm.results import Event, Result

MAX_QUEUE = 4


class QueueFullError(EdgeVLMError):
    """The runner's queue holds max_queue requests already: try again later (a server answers 503)."""


class SupersededError(EdgeVLMError):
    """A newer frame with the same `latest` key replaced this request before it ran."""


class Request:
    """A submitted question: a Future of its Result (`result`, `done`, `await request`) and its events."""

    def __init__(self, image: ImageInput, question: str, options: dict, deadline: float | None, latest):
        self.image, self.question, self.options = image, question, options
        self.deadline, self.latest = deadline, latest
        self.submitted = time.monotonic()
        self.future: Future = Future()
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._cancel = threading.Event()
        self._withdraw = lambda request: None  # set by the runner: take a waiting request out of its queue

    def result(self, timeout: float | None = None) -> Result:
        """The Result (raises what the run raised; CancelledError once cancelled; SupersededError)."""
        return self.future.result(timeout)

    def done(self) -> bool:
        return self.future.done()

    def cancel(self) -> bool:
        """Stop this request: dropped if still waiting, else stopped at the next token. True unless it had
        already finished."""
        self._cancel.set()
        if self.future.cancel():  # still waiting: it never runs, and leaves room in the queue
            self._withdraw(self)
            self._events.put(None)
            return True
        return not self.future.done()

    def events(self) -> Iterator[Event]:
        """Its events as they come (stage_start, token, stage_end, done); ends when the request does."""
        while (event := self._events.get()) is not None:
            yield event

    async def aevents(self) -> AsyncIterator[Event]:
        """`events` for asyncio code (each wait on a worker thread, so the loop never blocks)."""
        while (event := await asyncio.to_thread(self._events.get)) is not None:
            yield event

    def __await__(self):
        return asyncio.wrap_future(self.future).__await__()


class Runner:
    """Serves requests in order of submission on one worker thread, or two for a pipelined pipeline."""

    def __init__(self, pipeline, *, max_queue: int = MAX_QUEUE):
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise UsageError(f"max_queue must be a whole number, 1 or more; got {max_queue!r}")
        self.pipeline, self.max_queue = pipeline, max_queue
        self._waiting: collections.deque[Request] = collections.deque()
        self._lock = threading.Condition()
        self._closed = False
        self._workers = [threading.Thread(target=self._serve, name=f"edgevlm-runner-{i}", daemon=True)
                         for i in range(2 if pipeline.pipelined else 1)]
        for worker in self._workers:
            worker.start()

    def submit(self, image: ImageInput, question: str, *, deadline_s: float | None = None, latest=None,
               **options) -> Request:
        """Queue a question about a frame (path, bytes, PIL image or numpy array; `bgr=True` for OpenCV's
        order). `deadline_s`: seconds from now for the whole request. `latest`: a key (a camera's name)
        under which a newer frame replaces a waiting one. `options` are the pipeline's (Options); they and the
        question are checked here (UsageError). QueueFullError when max_queue requests wait already."""
        check_text(question, "the question")
        Options.of(options)
        if deadline_s is not None and not finite_number(deadline_s, minimum=0):
            raise UsageError(f"deadline_s must be a finite number of seconds, 0 or more; got {deadline_s!r}")
        if isinstance(image, np.ndarray):
            image = image.copy()  # a camera reuses its buffer; this frame must stay the one asked about
        deadline = None if deadline_s is None else time.monotonic() + deadline_s
        request = Request(image, question, options, deadline, latest)
        request._withdraw = self._withdraw
        with self._lock:
            if self._closed:
                raise UsageError("the runner is closed")
            stale = next((r for r in self._waiting if latest is not None and r.latest == latest), None)
            if stale is not None:
                self._waiting.remove(stale)
                _finish(stale, SupersededError(f"a newer frame for {latest!r} replaced this request"))
            elif len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests are waiting (max_queue={self.max_queue}); "
                                     "try again later")
            self._waiting.append(request)
            self._lock.notify()
        return request

    def _withdraw(self, request: Request) -> None:
        with self._lock:
            if request in self._waiting:
                self._waiting.remove(request)

    @property
    def waiting(self) -> int:
        """Requests queued and not yet running."""
        with self._lock:
            return len(self._waiting)

    def close(self, *, cancel_waiting: bool = True) -> None:
        """Refuse new requests; cancel the waiting ones (or let them run) and wait for the worker to end."""
        with self._lock:
            self._closed = True
            if cancel_waiting:
                for request in list(self._waiting):
                    request.future.cancel()
                    request._events.put(None)
                self._waiting.clear()
            self._lock.notify_all()
        for worker in self._workers:
            worker.join()

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _serve(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._closed:
                    self._lock.wait()
                if not self._waiting:
                    return
                request = self._waiting.popleft()
            if request.future.set_running_or_notify_cancel():
                self._run(request)

    def _run(self, request: Request) -> None:
        """One request on the models; everything it raises goes to its Future, never out of the worker."""
        started = time.monotonic()
        waited_ms = (started - request.submitted) * 1e3
        options = dict(request.options)
        if request.deadline is not None:
            options["time_limit_s"] = max(request.deadline - started, 0.0)
        try:
            stream = self.pipeline.stream(request.image, request.question, **options)
            try:
                for event in stream:
                    if request._cancel.is_set():
                        raise CancelledError()
                    if event.kind == "done":
                        event.result.queue_ms = waited_ms
                        request.future.set_result(event.result)
                    request._events.put(event)
            finally:
                stream.close()  # a cancelled run stops at its next token and lets the models go
        except BaseException as e:  # noqa: BLE001 - handed to the caller through the Future
            if not request.future.done():
                request.future.set_exception(e)
        finally:
            request._events.put(None)


def _finish(request: Request, error: Exception) -> None:
    """End a request that never ran with `error`."""
    if request.future.set_running_or_notify_cancel():
        request.future.set_exception(error)
    request._events.put(None)
