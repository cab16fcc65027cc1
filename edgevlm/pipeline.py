"""The Extract->Think pipeline: plan (question -> instruction), extract (image -> description),
think (description + question -> answer); plus `extract` and `direct` modes.

    pipe = Pipeline.from_pretrained(extractor="DIR_OR_ID", reasoner="DIR_OR_ID")
    result = pipe("frame.jpg", "How many cups are on the table?", choices=["1", "2", "3"])
    for event in pipe.stream("frame.jpg", "What is written on the sign?"):
        ...

One job per module around it: `options` checks what a call asks, `results` is what it returns, `vision`
provides the image features (cache, overlap), `generation` is the decode loop, the backends run the models.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from edgevlm import prompts
from edgevlm.backends.base import Model, State
from edgevlm.cache import PrefixCache
from edgevlm.constraints import AnswerMatcher, Constraint, answer_text
from edgevlm.errors import EdgeVLMError, InputTooLongError, UsageError
from edgevlm.generation import Decoding, Generation, ThinkControl, generate
from edgevlm.images import ImageInput, load_image
from edgevlm.options import MODES, Options, check_text, finite_number
from edgevlm.profiler import Profiler, peak_rss_bytes
from edgevlm.results import Event, Result, StageResult
from edgevlm.tokenizer import Prompt, StreamDecoder
from edgevlm.vision import VisionFeatures

__all__ = ["MODES", "Event", "Options", "Pipeline", "Result", "StageResult", "render_prompt"]

# The memory plan fits the overlapped vision tower beside a planner prompt of memory.MIN_CONTEXT positions
# at most: longer questions run the stages in turn.
OVERLAP_MAX_QUESTION_CHARS = 2_000
VISION_CACHE_MB = 256  # default byte budget of the vision-feature cache (an AnyRes 0.6B image is ~20 MB)
# Default byte budget of each model's prompt-prefix KV cache (ONNX Runtime backend): the planner's few-shot
# block is ~50 MB of KV on Qwen3-1.7B.
PREFIX_CACHE_MB = 128
# When the reasoner's context cannot hold the thinking budget and the answer budget, the answer keeps a
# quarter of the room, and at least this many tokens.
MIN_ANSWER_TOKENS = 32


@dataclass
class _Call:
    """What the stages of one call share."""

    prof: Profiler
    rng: np.random.Generator
    fixed_tokens: int | None  # every stage generates exactly this many tokens (benchmarks)
    image_key: str | None = None  # the vision cache's key for the call's image (None: cache off)
    vision: Future | None = None  # the image's features, being computed beside the planner (overlap)
    letters: str | None = None  # the valid answer letters of a multiple-choice question, where known
    cancel: threading.Event | None = None  # set by a stream's consumer that went away: stop between tokens
    constraint: Constraint | None = None  # what the answer must match (edgevlm.constraints)
    deadline: float | None = None  # time.perf_counter() past which the run stops at the next token


class _Cancelled(Exception):
    """The consumer of a stream closed it: the run stops at a token boundary."""


class _TimeUp(Exception):
    """The call's time limit passed during (or before) the stage `stage`."""

    def __init__(self, stage: str):
        super().__init__(stage)
        self.stage = stage


def _spare_cores(device: str) -> bool:
    """Cores enough to run two things at once by default (overlap, pipelining): 4 or more, or a GPU."""
    return (os.cpu_count() or 1) >= 4 or device == "cuda"


def _past_deadline(call: _Call) -> bool:
    return call.deadline is not None and time.perf_counter() >= call.deadline


def _check_cancel(call: _Call) -> None:
    if call.cancel is not None and call.cancel.is_set():
        raise _Cancelled


def _checked_answer(result: Result, answer: str, letters: str | None) -> str:
    """A multiple-choice answer must be one of the options' letters (in either case); anything else is no
    answer, with a note."""
    if not letters:
        return answer
    letter = answer.strip().upper()
    if len(letter) == 1 and letter in letters:
        return letter
    result.notes.append(f"the model answered {answer!r}, which is not one of the options "
                        f"({', '.join(letters)}); there is no answer")
    return ""


def _fit_thinking(result: Result, think: ThinkControl, decoding: Decoding, room: int) -> tuple[ThinkControl,
                                                                                                 Decoding]:
    """Clamp the thinking budget to the room the reasoner's context leaves after the prompt, keeping a share
    for the answer: without it a 4096-token budget on a 1024-token model thinks to the end of the context and
    never answers."""
    if decoding.max_new_tokens <= room:
        return think, decoding
    answer = max(decoding.max_new_tokens - think.budget, 1)
    budget = max(2, room - min(answer, max(MIN_ANSWER_TOKENS, room // 4)))  # 2: the forced "\n" and </think>
    if budget >= think.budget:
        return think, replace(decoding, max_new_tokens=room)
    result.notes.append(f"the thinking budget was clamped from {think.budget} to {budget} tokens: the prompt "
                        f"leaves {room} of the reasoner's context")
    return replace(think, budget=budget), replace(decoding, max_new_tokens=room)


def _consume(events: queue.SimpleQueue, cancel: threading.Event, start: Callable[[], object]) -> Iterator[Event]:
    """A stream's events as its producer puts them (`start` sets it going, at the first `next`); closing this
    iterator (or dropping it) cancels the run, which stops at its next token and lets the models go."""
    start()
    try:
        while (event := events.get()) is not None:
            if isinstance(event, BaseException):
                raise event
            yield event
    finally:
        cancel.set()


def render_prompt(model: Model, prompt: str, *, with_image: bool = False,
                  enable_thinking: bool | None = None) -> Prompt:
    """A stage's prompt as the model sees it: its family's messages through its chat template, `prompt` (the
    method's wording around the user's text) literal: only the template's markers are control tokens."""
    return model.family.render(model.tokenizer, prompt, with_image=with_image, enable_thinking=enable_thinking)


class Pipeline:
    """An extractor VLM and a reasoner LLM (also the planner). Calls from several threads share the models:
    each model runs one stage at a time.

    Vision features are cached by image content (`vision_cache_mb`, LRU; 0 turns the cache off), so a
    second question about the same frame skips the vision tower. On ONNX Runtime each model also keeps the
    KV of recent prompts (`prefix_cache_mb` each; 0 = off): a prompt that starts like an earlier one (the
    planner's few-shot block) prefills only what differs.

    `overlap`: where the backend can (ONNX Runtime), the planner needs no image, so the vision tower encodes
    it on a second thread meanwhile. None (default) turns it on where there are cores to spare (4 or more, or
    a GPU) and the memory plan fits both at once; on 2 cores the two sessions' thread pools contend.

    `pipelined`: two calls may be in flight at once, each stage taking its model when free: while the reasoner
    thinks about one frame, the extractor describes the next (benchmarks/frame_pipelining.py). Off, calls run
    one after another. None (default): as `overlap`, where the backend can, there are cores to spare and the
    memory plan fits both models' stages at once. A pipelined bundle's sessions get half the cores each (unless
    `threads` is given), so the two stages do not fight over them.
    """

    def __init__(self, extractor: Model, reasoner: Model | None = None, *, vision_cache_mb: float = VISION_CACHE_MB,
                 prefix_cache_mb: float = PREFIX_CACHE_MB, overlap: bool | None = None,
                 pipelined: bool | None = None):
        self.extractor, self.reasoner = extractor, reasoner
        for name, value in (("vision_cache_mb", vision_cache_mb), ("prefix_cache_mb", prefix_cache_mb)):
            if not finite_number(value, minimum=0):
                raise UsageError(f"{name}: the cache size must be 0 (off) or a finite number of megabytes, "
                                 f"got {value!r}")
        spare = _spare_cores(extractor.device)
        overlap = spare if overlap is None else overlap
        self.vision = VisionFeatures(extractor, int(vision_cache_mb * 1e6),
                                     overlap=overlap and extractor.concurrent and extractor.family.vision)
        two = reasoner is not None and reasoner is not extractor and extractor.concurrent and reasoner.concurrent
        self.pipelined = two and (spare if pipelined is None else pipelined)
        for model in (extractor, reasoner):
            if model is not None and model.prefix_cache is not None:
                model.prefix_cache = PrefixCache(int(prefix_cache_mb * 1e6))
        # Streams run here, one after another: one long-lived thread rather than one per call. With a new thread
        # per question, benchmarks/soak.py's RSS still grew 6 MB per 100 calls after 1000 (692 -> 803 MB); with
        # this one it is flat from the 800th call.
        self._runner = ThreadPoolExecutor(2 if self.pipelined else 1, thread_name_prefix="edgevlm-run")
        # Runs in flight (one, or two when pipelined); each stage also holds its model while it computes.
        self._slots = threading.BoundedSemaphore(2 if self.pipelined else 1)
        self._models = {id(m): threading.Lock() for m in (extractor, reasoner) if m is not None}
        self._banned: np.ndarray | None = None  # NoWait token ids of the reasoner
        self.memory_plan = None  # edgevlm.memory.MemoryPlan (bundles)

    def gpu_bytes(self) -> int | None:
        """What the models hold on a GPU at most (engines, activations, KV and I/O buffers), where the backend
        counts it (TensorRT); None where no model does."""
        counts = [m.gpu_bytes() for m in {id(m): m for m in (self.extractor, self.reasoner) if m}.values()
                  if hasattr(m, "gpu_bytes")]
        return sum(counts) if counts else None

    @property
    def overlap(self) -> bool:
        return self.vision.overlap

    @property
    def vision_cache(self):
        return self.vision.cache

    @classmethod
    def from_pretrained(cls, extractor: str | None = None, reasoner: str | None = None, *,
                        preset: str | None = None, device: str = "cpu", load_reasoner: bool = True,
                        quant: str | None = None, gguf_file: str | None = None,
                        vision_cache_mb: float = VISION_CACHE_MB) -> Pipeline:
        """Load HF checkpoints (hub ids or directories) on the PyTorch reference backend.

        A model not given comes from `preset` (default: paper-0.6b). `load_reasoner=False` skips the
        reasoner (enough for `mode="direct"`). `quant` ("int8" or "nf4") loads the language models'
        weights through bitsandbytes. A GGUF reasoner is a .gguf path, or a directory with `gguf_file`.
        """
        from edgevlm.presets import DEFAULT_PRESET, get_preset

        try:
            from edgevlm.backends import torch_ref
        except ImportError as e:
            raise EdgeVLMError(f"the PyTorch reference backend needs torch and transformers ({e}); "
                               "pip install 'edgevlm[export]'") from None
        p = get_preset(preset or DEFAULT_PRESET)
        ex, rs = torch_ref.load(extractor or p.extractor, (reasoner or p.reasoner) if load_reasoner else None,
                                device=device, quant=quant, gguf_file=gguf_file)
        return cls(ex, rs, vision_cache_mb=vision_cache_mb)

    @classmethod
    def from_bundle(cls, path: str, *, device: str = "cpu", threads: int | None = None, verify: bool = True,
                    vision_cache_mb: float = VISION_CACHE_MB, prefix_cache_mb: float = PREFIX_CACHE_MB,
                    memory_budget: int | str | None = None, overlap: bool | None = None,
                    pipelined: bool | None = None, max_image_tokens: int | None = None,
                    backend: str | None = None) -> Pipeline:
        """Load an exported bundle on ONNX Runtime, or on TensorRT (no torch needed). `verify` checks every file's
        sha256. The backend (edgevlm.backends.trt_plan.choose_backend): a TensorRT-flavour bundle with
        `device` "cuda" runs its engines (built by `edgevlm build`; refused in one line where they, tensorrt,
        cuda-python or a GPU are missing); anything else runs on ONNX Runtime, on its CUDA provider for "cuda".
        `backend` "onnxruntime" keeps a TensorRT bundle on ONNX Runtime (to compare the two on one GPU).

        Before loading, a memory plan (edgevlm.memory) gives each model the longest context that fits
        `memory_budget` ("6GB"; default: the bundle's target's budget, or the memory available now) with
        the caches at their sizes; a budget that cannot hold the bundle is refused (MemoryBudgetError).
        The plan is `pipe.memory_plan`. `max_image_tokens`: a visual-token budget, each image cut (a smaller
        AnyRes grid, a shorter resized edge) to at most that many prompt positions, which the plan then counts."""
        from edgevlm import bundle
        from edgevlm.backends import onnx, trt_plan

        pipelined = _spare_cores(device) if pipelined is None else pipelined
        flavour = bundle.load(path, verify=False).manifest.flavour
        if trt_plan.choose_backend(flavour, device, backend) == "tensorrt":
            from edgevlm.backends import tensorrt

            ex, rs, plan = tensorrt.load(path, verify=verify, memory_budget=memory_budget,
                                         vision_cache_mb=vision_cache_mb, prefix_cache_mb=prefix_cache_mb,
                                         max_image_tokens=max_image_tokens)
        else:
            ex, rs, plan = onnx.load(path, device=device, threads=threads, verify=verify,
                                     memory_budget=memory_budget, vision_cache_mb=vision_cache_mb,
                                     prefix_cache_mb=prefix_cache_mb, max_image_tokens=max_image_tokens,
                                     pipelined=pipelined)
        pipe = cls(ex, rs, vision_cache_mb=vision_cache_mb, prefix_cache_mb=prefix_cache_mb,
                   overlap=overlap if plan.overlap else False, pipelined=pipelined if plan.pipelining else False)
        pipe.memory_plan = plan
        return pipe

    def __call__(self, image: ImageInput, question: str, **options) -> Result:
        """Answer `question` about `image`; `options` are those of `Options`."""
        run = self._start(image, question, Options.of(options))
        with self._slots:  # held only while the models compute: nothing here waits on the caller
            for event in run:
                if event.kind == "done":
                    return event.result
        raise AssertionError("the run ended without a result")  # unreachable

    def stream(self, image: ImageInput, question: str, **options) -> Iterator[Event]:
        """Run the pipeline, yielding events as they come (stage_start, token, stage_end; `done` carries the
        Result). `options` are those of `Options`, checked before this returns (UsageError).

        The models run on a thread of their own and the events wait in a queue, so a consumer that pauses,
        nests another call or never finishes holds nothing: runs still take the models one at a time, and
        closing (or dropping) the iterator stops its run at the next token.
        """
        cancel = threading.Event()
        run = self._start(image, question, Options.of(options), cancel)
        events: queue.SimpleQueue = queue.SimpleQueue()

        def produce():
            try:
                with self._slots:
                    for event in run:
                        events.put(event)
            except _Cancelled:
                pass
            except BaseException as e:  # handed to the consumer, who raises it in its own thread
                events.put(e)
            finally:
                events.put(None)

        return _consume(events, cancel, lambda: self._runner.submit(produce))

    def _start(self, image: ImageInput, question: str, opts: Options,
               cancel: threading.Event | None = None) -> Iterator[Event]:
        """Check what the options cannot check alone (UsageError, before any model runs); the run's events."""
        check_text(question, "the question")
        if self.reasoner is None and not (opts.mode == "direct"
                                          or (opts.mode == "extract" and opts.instruction is not None)):
            raise UsageError(f"mode {opts.mode!r} needs a reasoner; this pipeline was loaded without one")
        letters = prompts.option_letters(question, opts.choices)
        question = prompts.format_question(question, opts.choices)
        multiple_choice = bool(opts.choices) or prompts.is_multiple_choice(question)
        call = _Call(Profiler(detail=opts.trace), np.random.default_rng(opts.seed), opts.fixed_tokens,
                     letters=letters if multiple_choice else None, cancel=cancel)
        call.constraint = opts.answer_constraint(call.letters)
        if opts.time_limit_s is not None:
            call.deadline = time.perf_counter() + opts.time_limit_s
        return self._run(image, question, multiple_choice, opts, call)

    # ------------------------------------------------------------------ stages
    def _run(self, image, question: str, multiple_choice: bool, opts: Options, call: _Call) -> Iterator[Event]:
        try:
            yield from self._stages(image, question, multiple_choice, opts, call)
        finally:
            VisionFeatures.finish(call.vision)

    def _stages(self, image, question: str, multiple_choice: bool, opts: Options, call: _Call) -> Iterator[Event]:
        _check_cancel(call)
        t0 = time.perf_counter()
        result = Result(answer="", mode=opts.mode, question=question, multiple_choice=multiple_choice,
                        models={"extractor": self.extractor.name}, profile=call.prof)
        # Decoded up front so a bad image fails before any model runs; timed apart from the stages.
        start = time.perf_counter()
        pil = load_image(image, bgr=opts.bgr)
        call.image_key = self.vision.key(pil)
        result.image_ms = (time.perf_counter() - start) * 1e3
        try:
            if opts.mode == "direct":
                yield from self._direct(result, call, pil, opts)
            else:
                yield from self._extract_think(result, call, pil, opts)
        except _TimeUp as up:
            _keep_partial(result, up.stage, opts.time_limit_s)
        result.total_ms = (time.perf_counter() - t0) * 1e3
        result.peak_rss_bytes = peak_rss_bytes()
        result.peak_gpu_bytes = self.gpu_bytes()
        yield Event("done", result=result)

    def _direct(self, result: Result, call: _Call, image, opts: Options):
        """The VLM answers the question itself (the paper's baseline)."""
        prompt = prompts.direct_prompt(result.question, multiple_choice=result.multiple_choice)
        answer = self._matcher(call, self.extractor, start="now", prefix=False)
        stage = yield from self._stage(result, call, "direct", self.extractor, prompt,
                                       prompts.DIRECT.with_max_new_tokens(opts.max_new_tokens), image=image,
                                       answer=answer)
        result.response = stage.text.strip()
        self._answer(result, call, stage, stage.text, answer, prefix=False)

    def _extract_think(self, result: Result, call: _Call, image, opts: Options):
        """Plan (unless the caller gave the instruction), extract, then think (unless mode is extract)."""
        if self.reasoner is not None:
            result.models.update(planner=self.reasoner.name, reasoner=self.reasoner.name)
        instruction = opts.instruction
        if instruction is None:
            if len(result.question) <= OVERLAP_MAX_QUESTION_CHARS:
                call.vision = self.vision.start(image, call.image_key)
            cap = min(prompts.PLAN.max_new_tokens, opts.max_new_tokens or prompts.PLAN.max_new_tokens)
            stage = yield from self._stage(result, call, "plan", self.reasoner, prompts.planner_prompt(result.question),
                                           prompts.PLAN.with_max_new_tokens(cap), enable_thinking=False)
            instruction = prompts.parse_instruction(stage.text)
        result.instruction = instruction
        stage = yield from self._stage(result, call, "extract", self.extractor, prompts.extract_prompt(instruction),
                                       prompts.EXTRACT.with_max_new_tokens(opts.max_new_tokens), image=image)
        result.extraction = stage.text.strip()
        if opts.mode == "extract":
            result.answer = result.response = result.extraction
        else:
            yield from self._think(result, call, opts)

    def _think(self, result: Result, call: _Call, opts: Options):
        answer_budget = opts.max_new_tokens or prompts.ANSWER_BUDGET
        # A reasoner without </think> in its vocabulary still reasons step by step, just without the budget.
        control = self._think_control(opts.think_budget) if opts.think else None
        if opts.think:
            decoding = prompts.THINK.with_max_new_tokens(opts.think_budget + answer_budget)
        else:
            decoding = prompts.NO_THINK.with_max_new_tokens(answer_budget)
        if opts.temperature is not None:
            decoding = replace(decoding, temperature=opts.temperature)
        prompt = prompts.reasoner_prompt(result.extraction, result.question, multiple_choice=result.multiple_choice,
                                         think=opts.think)
        start = "think_end" if control is not None else "marker" if opts.think else "now"
        answer = self._matcher(call, self.reasoner, start=start)
        stage = yield from self._stage(result, call, "think", self.reasoner, prompt, decoding,
                                       enable_thinking=opts.think, think=control, answer=answer)
        reasoning, response = self._split_thinking(stage, control)
        result.reasoning = reasoning.replace("<think>", "", 1).strip() or None
        result.response = response.strip()
        if control is not None and control.think_end_id not in stage.token_ids and stage.stop_reason != "eos":
            result.notes.append(f"the reasoner was still thinking when it stopped ({stage.stop_reason}); "
                                "there is no answer")
        self._answer(result, call, stage, response, answer, prefix=True)

    def _matcher(self, call: _Call, model: Model, *, start: str, prefix: bool = True) -> AnswerMatcher | None:
        """The answer's constraint for one stage (none for benchmarks' fixed-length runs)."""
        if call.constraint is None or call.fixed_tokens:
            return None
        return AnswerMatcher(call.constraint, model.tokenizer, model.eos_ids, start=start, prefix=prefix)

    def _answer(self, result: Result, call: _Call, stage: StageResult, response: str,
                matcher: AnswerMatcher | None, *, prefix: bool) -> None:
        """The answer from the last stage's visible output: the constrained part where there is a constraint
        (and its parsed value for a schema), else the paper's "Answer:" rule."""
        if call.constraint is None or call.fixed_tokens:
            answer = prompts.parse_answer(response, multiple_choice=result.multiple_choice)
            result.answer = _checked_answer(result, answer, call.letters)
            return
        if stage.stop_reason == "constraint":
            what = call.constraint.kind.replace("_", " ")
            if matcher is not None and matcher.error:
                result.notes.append(f"the answer could not follow its {what} past llguidance's limits "
                                    f"({matcher.error}); there is no answer")
            else:
                result.notes.append(f"the answer did not complete its {what} within the {stage.name} stage's "
                                    f"{stage.new_tokens} tokens; there is no answer")
            return
        # The constraint made it valid: an option's letter, or what the caller's schema, regex or list allows
        # (which then wins over the letters, so checking it against them would wrongly refuse it).
        result.answer = call.constraint.answer(answer_text(response, prefix=prefix))
        result.answer_json = call.constraint.parse(result.answer)

    def _split_thinking(self, stage: StageResult, control: ThinkControl | None) -> tuple[str, str]:
        """(reasoning, response) of the think stage's output: either side of </think>."""
        ids = stage.token_ids
        if control is not None and control.think_end_id in ids:
            cut = ids.index(control.think_end_id)
            return self.reasoner.tokenizer.decode(ids[:cut]), self.reasoner.tokenizer.decode(ids[cut + 1:])
        if control is not None and stage.stop_reason != "eos":  # thinking never ended
            return stage.text, ""
        return "", stage.text

    def _think_control(self, budget: int) -> ThinkControl | None:
        """Thinking-mode controls for the reasoner, or None when its vocabulary has no </think>."""
        tok = self.reasoner.tokenizer
        think_end, newline = tok.token_id("</think>"), tok.encode("\n")
        if think_end is None or len(newline) != 1:
            return None
        if self._banned is None:  # scanning the vocabulary takes a moment: once per pipeline
            self._banned = np.asarray(tok.ids_of_words(prompts.REFLEXIVE_WORDS), dtype=np.int64)
        return ThinkControl(think_end_id=think_end, newline_id=newline[0], budget=budget, banned_ids=self._banned)

    # ------------------------------------------------------------------ one model call
    def _stage(self, result: Result, call: _Call, name: str, model: Model,
               prompt: str, decoding: Decoding, *, image=None, enable_thinking: bool | None = None,
               think: ThinkControl | None = None,
               answer: AnswerMatcher | None = None) -> Generator[Event, None, StageResult]:
        """One model call, yielding its events; returns its StageResult (also stored in `result`). Past the
        call's deadline it raises _TimeUp, before it starts or once its stage_end is out. It holds its model
        from start to end (a pipelined run's other stage may hold the other model meanwhile)."""
        with self._models[id(model)]:
            return (yield from self._stage_on(result, call, name, model, prompt, decoding, image=image,
                                              enable_thinking=enable_thinking, think=think, answer=answer))

    def _stage_on(self, result: Result, call: _Call, name: str, model: Model, prompt: str, decoding: Decoding, *,
                  image, enable_thinking: bool | None, think: ThinkControl | None,
                  answer: AnswerMatcher | None) -> Generator[Event, None, StageResult]:
        _check_cancel(call)
        if _past_deadline(call):
            raise _TimeUp(name)
        yield Event("stage_start", name)
        eos_ids = model.eos_ids
        if call.fixed_tokens:  # benchmarks: the same length every run, whatever the model says
            decoding, eos_ids = replace(decoding, max_new_tokens=call.fixed_tokens), set()
        rendered = render_prompt(model, prompt, with_image=image is not None, enable_thinking=enable_thinking)
        with call.prof.span(name, "preprocess"):
            prepared = model.prepare(rendered, image)
        n_prompt = len(prepared.input_ids)
        self._check_room(name, model, n_prompt, with_image=image is not None)
        if think is not None and think.budget is not None:
            think, decoding = _fit_thinking(result, think, decoding, model.max_context - n_prompt)
        vision: dict = {}
        with call.prof.span(name, "vision"):  # the time this stage spends on (or waits for) the vision tower
            if image is not None:
                vision = self.vision.fill(prepared, call.image_key, call.vision, call.prof)
                call.vision = None
        with call.prof.span(name, "embed"):
            model.embed(prepared)
        with call.prof.span(name, "prefill"):
            state = model.prefill(prepared)
        generation, first_token_at = yield from _decode(call, name, model, state, decoding, eos_ids, think, answer)
        stage = StageResult(
            name=name, model=model.name, prompt=str(rendered), text=model.tokenizer.decode(generation.token_ids),
            token_ids=generation.token_ids, prompt_tokens=n_prompt, new_tokens=len(generation.token_ids),
            stop_reason=generation.stop_reason,
            timings=call.prof.stage(name, prompt_tokens=n_prompt - state.reused, new_tokens=len(generation.token_ids),
                                    first_token_at=first_token_at),
            memory=_memory(model, state, vision),
        )
        result.stages[name] = stage
        yield Event("stage_end", name, stage.text)
        if stage.stop_reason == "deadline":
            raise _TimeUp(name)
        return stage

    def _check_room(self, name: str, model: Model, n_prompt: int, *, with_image: bool) -> None:
        """A prompt that leaves the model no room to answer is refused, saying what to change."""
        if n_prompt < model.max_context:
            return
        planned = self.memory_plan is not None and model.max_context < model.native_context  # the plan's limit
        raise InputTooLongError(
            f"the {name} prompt is {n_prompt} tokens but {model.name} takes at most {model.max_context}"
            + (f" within the {self.memory_plan.budget / 1e9:.2f} GB memory budget ({self.memory_plan.source}); "
               "raise --memory-budget, shrink the caches or " if planned else "; ")
            + ("use a smaller image or shorter question" if with_image
               else "shorten the question" + (" or the description" if name == "think" else "")))


def _decode(call: _Call, name: str, model: Model, state: State, decoding: Decoding, eos_ids: set[int],
            think: ThinkControl | None,
            answer: AnswerMatcher | None) -> Generator[Event, None, tuple[Generation, float | None]]:
    """The stage's tokens as text deltas, stopping between tokens when the call is cancelled or its deadline
    passes; returns the Generation and when its first token came (None: no token)."""
    until = None if call.deadline is None else lambda: _past_deadline(call)
    tokens = generate(call.prof.timed(state, name), decoding, eos_ids=eos_ids, max_context=model.max_context,
                      rng=call.rng, think=think, answer=answer, until=until)
    detok = StreamDecoder(model.tokenizer)
    first_token_at = None
    while True:
        try:
            token = next(tokens)
        except StopIteration as done:
            generation = done.value
            break
        if first_token_at is None:
            first_token_at = time.perf_counter()
        _check_cancel(call)
        delta = detok.push(token)
        if delta:
            yield Event("token", name, delta)
    if first_token_at is not None:
        call.prof.add(name, "decode", first_token_at, time.perf_counter())
    return generation, first_token_at


def _keep_partial(result: Result, stage: str, limit: float | None) -> None:
    """A run the time limit stopped: what its cut stage had written, where that is still useful."""
    result.cut = stage
    partial = result.stages[stage].text.strip() if stage in result.stages else ""
    if stage == "extract":
        result.extraction = partial or None
    elif stage == "think":
        result.reasoning = partial or None
    elif stage == "direct":
        result.response = partial
    result.notes.append(f"the {stage} stage was cut at the time limit ({limit:g} s)"
                        + ("" if result.answer else "; there is no answer"))


def _memory(model: Model, state: State, vision: dict) -> dict:
    """A stage's memory record (StageResult.memory)."""
    kv_allocated, kv_used = state.kv_bytes()
    return {"backend": model.backend, "weights": dict(model.weight_bytes), "step_weights": model.step_bytes,
            "kv_allocated": kv_allocated, "kv_used": kv_used, "prefix_tokens": state.reused, **vision}
