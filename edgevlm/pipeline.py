"""The Extract->Think pipeline: plan (question -> instruction), extract (image -> description),
think (description + question -> answer); plus `extract` and `direct` modes.

    pipe = Pipeline.from_pretrained(extractor="DIR_OR_ID", reasoner="DIR_OR_ID")
    result = pipe("frame.jpg", "How many cups are on the table?", choices=["1", "2", "3"])
    for event in pipe.stream("frame.jpg", "What is written on the sign?"):
        ...
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace

import numpy as np

from edgevlm import prompts
from edgevlm.backends.base import Model
from edgevlm.cache import FeatureCache, PrefixCache, image_key
from edgevlm.errors import EdgeVLMError, InputTooLongError, UsageError
from edgevlm.generation import ThinkControl, generate
from edgevlm.images import ImageInput, load_image
from edgevlm.profiler import Profiler, StageTimings, peak_rss_bytes
from edgevlm.prompts import Decoding
from edgevlm.tokenizer import Prompt, StreamDecoder

MODES = ("extract-think", "extract", "direct")
MAX_QUESTION_CHARS = 100_000
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
class StageResult:
    """One model call: what went in, what came out, and how long each part took."""

    name: str  # plan, extract, think or direct
    model: str
    prompt: str
    text: str  # the generated text, special tokens removed
    token_ids: list[int]
    prompt_tokens: int
    new_tokens: int
    stop_reason: str  # eos, length or context
    timings: StageTimings
    # backend, weights (bytes per graph/part of the model), step_weights (those a decode step reads),
    # kv_allocated and kv_used (bytes, at the stage's end), prefix_tokens (prompt positions whose KV came
    # from the prefix cache), vision_cache ("hit" or "miss", for stages with an image while the cache is on)
    memory: dict = field(default_factory=dict)

    def memory_dict(self) -> dict:
        """The `--json` view: KV megabytes, prefix-cache positions reused, the vision cache's outcome if any."""
        out = {"kv_allocated_mb": round(self.memory.get("kv_allocated", 0) / 1e6, 3),
               "kv_used_mb": round(self.memory.get("kv_used", 0) / 1e6, 3),
               "prefix_tokens": self.memory.get("prefix_tokens", 0)}
        if "vision_cache" in self.memory:
            out["vision_cache"] = self.memory["vision_cache"]
        return out


@dataclass
class Result:
    """The outcome of one question. `answer` is the letter for multiple choice, else the free text."""

    answer: str
    mode: str
    question: str
    multiple_choice: bool
    instruction: str | None = None
    extraction: str | None = None
    reasoning: str | None = None
    response: str = ""  # the last stage's visible output (after any thinking)
    stages: dict[str, StageResult] = field(default_factory=dict)
    models: dict[str, str] = field(default_factory=dict)
    image_ms: float = 0.0  # reading and normalising the image, before any stage
    total_ms: float = 0.0
    peak_rss_bytes: int = 0  # of the process, so far
    # what the caller should know about how the answer came about: a clamped thinking budget, an answer that
    # is not one of the options, thinking that never ended
    notes: list[str] = field(default_factory=list)
    profile: Profiler | None = field(default=None, repr=False)  # the spans (write_trace turns them into a trace)

    def to_dict(self) -> dict:
        """The `edgevlm run --json` object."""
        return {
            "answer": self.answer,
            "mode": self.mode,
            "question": self.question,
            "multiple_choice": self.multiple_choice,
            "instruction": self.instruction,
            "extraction": self.extraction,
            "reasoning": self.reasoning,
            "response": self.response,
            "timings": {"total_ms": round(self.total_ms, 3), "image_ms": round(self.image_ms, 3),
                        **{name: s.timings.to_dict() for name, s in self.stages.items()}},
            "tokens": {name: {"prompt": s.prompt_tokens, "generated": s.new_tokens, "stop_reason": s.stop_reason}
                       for name, s in self.stages.items()},
            "memory": {"peak_rss_mb": round(self.peak_rss_bytes / 1e6, 1),
                       **{name: s.memory_dict() for name, s in self.stages.items()}},
            "models": self.models,
            "notes": self.notes,
        }


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


class _Cancelled(Exception):
    """The consumer of a stream closed it: the run stops at a token boundary."""


def _check_cancel(call: _Call) -> None:
    if call.cancel is not None and call.cancel.is_set():
        raise _Cancelled


@dataclass
class Event:
    """What `Pipeline.stream` yields: stage_start, token (a text delta), stage_end, then done."""

    kind: str
    stage: str | None = None
    text: str = ""
    result: Result | None = None


@dataclass(frozen=True)
class Options:
    """What one call may set: `Pipeline.__call__` and `Pipeline.stream` take these as keywords.

    choices: answer options (the question becomes multiple choice, answered by an option's letter).
    mode: extract-think (default), extract (stop after the description) or direct (the VLM answers).
    think: Qwen3 thinking mode for the reasoner, bounded by `think_budget` tokens (and by the room its
    context leaves: Result.notes says when that clamped it).
    max_new_tokens: cap on each stage's visible output (thinking excluded); default per stage.
    instruction: skip the planner and use this "contents to observe" instruction.
    temperature: override the reasoner's sampling temperature in the think stage (0 = greedy).
    seed: the sampling seed. bgr: a numpy image is in OpenCV's BGR order.
    fixed_tokens: every stage generates exactly this many tokens, end-of-sequence ignored (benchmarks).
    trace: also record each decode step and the sampling between steps (Result.profile; `--trace`).
    Every value is checked here: a wrong type, a NaN or an unknown option is a UsageError.
    """

    choices: list[str] | None = None
    mode: str = "extract-think"
    think: bool = True
    think_budget: int = prompts.THINK_BUDGET
    max_new_tokens: int | None = None
    instruction: str | None = None
    temperature: float | None = None
    seed: int = 0
    bgr: bool = False
    fixed_tokens: int | None = None
    trace: bool = False

    @classmethod
    def of(cls, options: dict) -> Options:
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise UsageError(f"unknown option {unknown[0]!r}; the options are: {', '.join(names)}")
        return cls(**options)

    def __post_init__(self):
        if self.choices is not None:
            if isinstance(self.choices, str) or not isinstance(self.choices, (list, tuple)):
                raise UsageError(f"choices must be a list of strings, got {type(self.choices).__name__}")
            for choice in self.choices:
                _check_text(choice, "a choice")
        if self.instruction is not None:
            _check_text(self.instruction, "the instruction")
        if self.mode not in MODES:
            raise UsageError(f"unknown mode {self.mode!r}; choose one of: {', '.join(MODES)}")
        for name in ("think", "bgr", "trace"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"{name} must be True or False, got {getattr(self, name)!r}")
        _check_int(self.think_budget, "the thinking budget")
        _check_int(self.seed, "the seed", minimum=0)
        for name in ("max_new_tokens", "fixed_tokens"):
            if getattr(self, name) is not None:
                _check_int(getattr(self, name), name)
        if self.temperature is not None and not _finite_number(self.temperature, minimum=0):
            raise UsageError(f"the temperature must be a finite number, 0 (greedy) or more; got {self.temperature!r}")


def _finite_number(value, minimum: float) -> bool:
    return (not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
            and math.isfinite(value) and value >= minimum)


def _check_text(value, what: str) -> None:
    if not isinstance(value, str):
        raise UsageError(f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise UsageError(f"{what} is empty")
    if len(value) > MAX_QUESTION_CHARS:
        raise UsageError(f"{what} is {len(value)} characters; the limit is {MAX_QUESTION_CHARS}")


def _check_int(value, what: str, minimum: int | None = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise UsageError(f"{what} must be a whole number, got {value!r}")
    if minimum is not None and value < minimum:
        raise UsageError(f"{what} must be at least {minimum}, got {value}")


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
    """An extractor VLM and a reasoner LLM (also the planner). Calls from several threads serialize.

    Vision features are cached by image content (`vision_cache_mb`, LRU; 0 turns the cache off), so a
    second question about the same frame skips the vision tower. On ONNX Runtime each model also keeps the
    KV of recent prompts (`prefix_cache_mb` each; 0 = off): a prompt that starts like an earlier one (the
    planner's few-shot block) prefills only what differs.

    `overlap`: on ONNX Runtime the planner needs no image, so the vision tower encodes it on a second
    thread meanwhile. None (default) turns it on where there are cores to spare (4 or more, or a GPU)
    and the memory plan fits both at once; on 2 cores the two sessions' thread pools contend.
    """

    def __init__(self, extractor: Model, reasoner: Model | None = None, *, vision_cache_mb: float = VISION_CACHE_MB,
                 prefix_cache_mb: float = PREFIX_CACHE_MB, overlap: bool | None = None):
        self.extractor, self.reasoner = extractor, reasoner
        if overlap is None:
            overlap = (os.cpu_count() or 1) >= 4 or getattr(extractor, "device", "cpu") == "cuda"
        self.overlap = overlap and getattr(extractor, "backend", "") == "onnxruntime" and extractor.family.vision
        self._executor: ThreadPoolExecutor | None = None
        # Streams run here, one after another: one long-lived thread rather than one per call. With a new thread
        # per question, benchmarks/soak.py's RSS still grew 6 MB per 100 calls after 1000 (692 -> 803 MB); with
        # this one it is flat from the 800th call.
        self._runner = ThreadPoolExecutor(1, thread_name_prefix="edgevlm-run")
        for name, value in (("vision_cache_mb", vision_cache_mb), ("prefix_cache_mb", prefix_cache_mb)):
            if not _finite_number(value, minimum=0):
                raise UsageError(f"{name}: the cache size must be 0 (off) or a finite number of megabytes, "
                                 f"got {value!r}")
        self.vision_cache = FeatureCache(int(vision_cache_mb * 1e6))
        for model in (extractor, reasoner):
            if hasattr(model, "prefix_cache"):
                model.prefix_cache = PrefixCache(int(prefix_cache_mb * 1e6))
        self._lock = threading.Lock()
        self._banned: np.ndarray | None = None  # NoWait token ids of the reasoner
        self.memory_plan = None  # edgevlm.memory.MemoryPlan (bundles)

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
            from edgevlm.backends.torch_ref import load_pretrained
        except ImportError as e:
            raise EdgeVLMError(f"the PyTorch reference backend needs torch and transformers ({e}); "
                               "pip install 'edgevlm[export]'") from None
        p = get_preset(preset or DEFAULT_PRESET)
        ex, rs = load_pretrained(extractor or p.extractor, (reasoner or p.reasoner) if load_reasoner else None,
                                 device=device, quant=quant, gguf_file=gguf_file)
        return cls(ex, rs, vision_cache_mb=vision_cache_mb)

    @classmethod
    def from_bundle(cls, path: str, *, device: str = "cpu", threads: int | None = None, verify: bool = True,
                    vision_cache_mb: float = VISION_CACHE_MB, prefix_cache_mb: float = PREFIX_CACHE_MB,
                    memory_budget: int | str | None = None, overlap: bool | None = None) -> Pipeline:
        """Load an exported bundle on ONNX Runtime (no torch needed). `verify` checks every file's sha256.

        Before loading, a memory plan (edgevlm.memory) gives each model the longest context that fits
        `memory_budget` ("6GB"; default: the bundle's target's budget, or the memory available now) with
        the caches at their sizes; a budget that cannot hold the bundle is refused (MemoryBudgetError).
        The plan is `pipe.memory_plan`."""
        from edgevlm import bundle, memory
        from edgevlm.backends.onnx import OrtModel

        b = bundle.load(path, verify=verify)
        budget, source = memory.budget_for(memory_budget, b.manifest.get("target"))
        plan = memory.plan(b, budget, source=source, vision_cache_mb=vision_cache_mb, prefix_cache_mb=prefix_cache_mb)
        models = {role: OrtModel(b, role, device=device, threads=threads, max_context=plan.max_context[role])
                  for role in sorted(set(b.stages.values()))}
        pipe = cls(models[b.stages["extract"]], models.get(b.stages.get("think", "")),
                   vision_cache_mb=vision_cache_mb, prefix_cache_mb=prefix_cache_mb,
                   overlap=overlap if plan.overlap else False)
        pipe.memory_plan = plan
        return pipe

    def __call__(self, image: ImageInput, question: str, **options) -> Result:
        """Answer `question` about `image`; `options` are those of `Options`."""
        run = self._start(image, question, Options.of(options))
        with self._lock:  # held only while the models compute: nothing here waits on the caller
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
                with self._lock:
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
        _check_text(question, "the question")
        if self.reasoner is None and not (opts.mode == "direct"
                                          or (opts.mode == "extract" and opts.instruction is not None)):
            raise UsageError(f"mode {opts.mode!r} needs a reasoner; this pipeline was loaded without one")
        letters = prompts.option_letters(question, opts.choices)
        question = prompts.format_question(question, opts.choices)
        multiple_choice = bool(opts.choices) or prompts.is_multiple_choice(question)
        call = _Call(Profiler(detail=opts.trace), np.random.default_rng(opts.seed), opts.fixed_tokens,
                     letters=letters if multiple_choice else None, cancel=cancel)
        return self._run(image, question, multiple_choice, opts, call)

    # ------------------------------------------------------------------ stages
    def _run(self, image, question: str, multiple_choice: bool, opts: Options, call: _Call) -> Iterator[Event]:
        try:
            yield from self._stages(image, question, multiple_choice, opts, call)
        finally:
            # a run stopped during the plan: its overlapped vision tower ends before the next run's may start
            if call.vision is not None and not call.vision.cancel():
                call.vision.exception()

    def _stages(self, image, question: str, multiple_choice: bool, opts: Options, call: _Call) -> Iterator[Event]:
        _check_cancel(call)
        t0 = time.perf_counter()
        mode, max_new_tokens, instruction = opts.mode, opts.max_new_tokens, opts.instruction
        result = Result(answer="", mode=mode, question=question, multiple_choice=multiple_choice,
                        models={"extractor": self.extractor.name}, profile=call.prof)
        # Decoded up front so a bad image fails before any model runs; timed apart from the stages.
        start = time.perf_counter()
        pil = load_image(image, bgr=opts.bgr)
        call.image_key = image_key(pil) if self.vision_cache.max_bytes else None
        result.image_ms = (time.perf_counter() - start) * 1e3

        if mode == "direct":
            prompt = prompts.direct_prompt(question, multiple_choice=multiple_choice)
            stage = yield from self._stage(result, call, "direct", self.extractor, prompt,
                                           prompts.DIRECT.with_max_new_tokens(max_new_tokens), image=pil)
            result.response = stage.text.strip()
            result.answer = _checked_answer(result, prompts.parse_answer(stage.text, multiple_choice=multiple_choice),
                                            call.letters)
        else:
            if self.reasoner is not None:
                result.models.update(planner=self.reasoner.name, reasoner=self.reasoner.name)
            if instruction is None:
                if (self.overlap and len(question) <= OVERLAP_MAX_QUESTION_CHARS
                        and (call.image_key is None or call.image_key not in self.vision_cache)):
                    if self._executor is None:
                        self._executor = ThreadPoolExecutor(1, thread_name_prefix="edgevlm-vision")
                    call.vision = self._executor.submit(self._encode_image, pil)
                cap = min(prompts.PLAN.max_new_tokens, max_new_tokens or prompts.PLAN.max_new_tokens)
                stage = yield from self._stage(result, call, "plan", self.reasoner,
                                               prompts.planner_prompt(question),
                                               prompts.PLAN.with_max_new_tokens(cap), enable_thinking=False)
                instruction = prompts.parse_instruction(stage.text)
            result.instruction = instruction
            stage = yield from self._stage(result, call, "extract", self.extractor,
                                           prompts.extract_prompt(instruction),
                                           prompts.EXTRACT.with_max_new_tokens(max_new_tokens), image=pil)
            result.extraction = stage.text.strip()
            if mode == "extract":
                result.answer = result.response = result.extraction
            else:
                yield from self._think(result, call, question, multiple_choice, opts)
        result.total_ms = (time.perf_counter() - t0) * 1e3
        result.peak_rss_bytes = peak_rss_bytes()
        yield Event("done", result=result)

    def _encode_image(self, image) -> tuple[np.ndarray, float, float]:
        """The extractor's image features for `image` (the prompt around it does not matter), with the
        start and end of the work; runs on the overlap thread."""
        start = time.perf_counter()
        prepared = self.extractor.prepare(render_prompt(self.extractor, "", with_image=True), image)
        self.extractor.encode(prepared)
        return prepared.image_features, start, time.perf_counter()

    def _think(self, result: Result, call: _Call, question: str, multiple_choice: bool, opts: Options):
        think, think_budget, temperature = opts.think, opts.think_budget, opts.temperature
        answer_budget = opts.max_new_tokens or prompts.ANSWER_BUDGET
        # A reasoner without </think> in its vocabulary still reasons step by step, just without the budget.
        control = self._think_control(think_budget) if think else None
        if think:
            decoding = prompts.THINK.with_max_new_tokens(think_budget + answer_budget)
        else:
            decoding = prompts.NO_THINK.with_max_new_tokens(answer_budget)
        if temperature is not None:
            decoding = replace(decoding, temperature=temperature)
        prompt = prompts.reasoner_prompt(result.extraction, question, multiple_choice=multiple_choice, think=think)
        stage = yield from self._stage(result, call, "think", self.reasoner, prompt, decoding,
                                       enable_thinking=think, think=control)
        ids = stage.token_ids
        if control is not None and control.think_end_id in ids:
            cut = ids.index(control.think_end_id)
            reasoning = self.reasoner.tokenizer.decode(ids[:cut])
            response = self.reasoner.tokenizer.decode(ids[cut + 1:])
        elif control is not None and stage.stop_reason != "eos":  # thinking never ended
            reasoning, response = stage.text, ""
        else:
            reasoning, response = "", stage.text
        result.reasoning = reasoning.replace("<think>", "", 1).strip() or None
        result.response = response.strip()
        if control is not None and control.think_end_id not in ids and stage.stop_reason != "eos":
            result.notes.append(f"the reasoner was still thinking when it stopped ({stage.stop_reason}); "
                                "there is no answer")
        result.answer = _checked_answer(result, prompts.parse_answer(response, multiple_choice=multiple_choice),
                                        call.letters)

    def _think_control(self, budget: int) -> ThinkControl | None:
        """Thinking-mode controls for the reasoner, or None when its vocabulary has no </think>."""
        tok = self.reasoner.tokenizer
        think_end, newline = tok.token_id("</think>"), tok.encode("\n")
        if think_end is None or len(newline) != 1:
            return None
        if self._banned is None:  # scanning the vocabulary takes a moment: once per pipeline
            self._banned = np.asarray(tok.ids_of_words(prompts.REFLEXIVE_WORDS), dtype=np.int64)
        return ThinkControl(think_end_id=think_end, newline_id=newline[0], budget=budget, banned_ids=self._banned)

    def _stage(self, result: Result, call: _Call, name: str, model: Model,
               prompt: str, decoding: Decoding, *, image=None, enable_thinking: bool | None = None,
               think: ThinkControl | None = None) -> Generator[Event, None, StageResult]:
        """One model call, yielding its events; returns its StageResult (also stored in `result`)."""
        _check_cancel(call)
        yield Event("stage_start", name)
        eos_ids = model.eos_ids
        if call.fixed_tokens:  # benchmarks: the same length every run, whatever the model says
            decoding, eos_ids = replace(decoding, max_new_tokens=call.fixed_tokens), set()
        rendered = render_prompt(model, prompt, with_image=image is not None, enable_thinking=enable_thinking)
        with call.prof.span(name, "preprocess"):
            prepared = model.prepare(rendered, image)
        n_prompt = len(prepared.input_ids)
        if n_prompt >= model.max_context:
            planned = model.max_context < getattr(model, "native_context", model.max_context)  # the memory plan's
            raise InputTooLongError(
                f"the {name} prompt is {n_prompt} tokens but {model.name} takes at most {model.max_context}"
                + (f" within the {self.memory_plan.budget / 1e9:.2f} GB memory budget ({self.memory_plan.source}); "
                   "raise --memory-budget, shrink the caches or " if planned else "; ")
                + ("use a smaller image or shorter question" if image is not None
                   else "shorten the question" + (" or the description" if name == "think" else "")))
        if think is not None and think.budget is not None:
            think, decoding = _fit_thinking(result, think, decoding, model.max_context - n_prompt)
        cache, overlapped = None, {}
        with call.prof.span(name, "vision"):  # the time this stage spends on (or waits for) the vision tower
            if image is not None and call.vision is not None:  # encoded beside the planner
                prepared.image_features, start, end = call.vision.result()
                call.vision = None
                call.prof.add("vision (overlapped)", "vision", start, end)
                overlapped = {"vision_overlapped_ms": round((end - start) * 1e3, 3)}
                if call.image_key is not None:
                    self.vision_cache.put(call.image_key, prepared.image_features)
            elif image is not None and call.image_key is not None:
                features = self.vision_cache.get(call.image_key)
                cache = "miss" if features is None else "hit"
                if features is None:
                    model.encode(prepared)
                    self.vision_cache.put(call.image_key, prepared.image_features)
                else:
                    prepared.image_features = features
            else:
                model.encode(prepared)
        with call.prof.span(name, "embed"):
            model.embed(prepared)
        with call.prof.span(name, "prefill"):
            state = model.prefill(prepared)
        tokens = generate(call.prof.timed(state, name), decoding, eos_ids=eos_ids, max_context=model.max_context,
                          rng=call.rng, think=think)
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
        n_new = len(generation.token_ids)
        reused = getattr(state, "reused", 0)  # prompt positions the prefix cache supplied
        kv_allocated, kv_used = state.kv_bytes()
        stage = StageResult(
            name=name, model=model.name, prompt=str(rendered), text=model.tokenizer.decode(generation.token_ids),
            token_ids=generation.token_ids, prompt_tokens=n_prompt, new_tokens=n_new,
            stop_reason=generation.stop_reason,
            timings=call.prof.stage(name, prompt_tokens=n_prompt - reused, new_tokens=n_new,
                                    first_token_at=first_token_at),
            memory={"backend": model.backend, "weights": dict(model.weight_bytes), "step_weights": model.step_bytes,
                    "kv_allocated": kv_allocated, "kv_used": kv_used, "prefix_tokens": reused,
                    **({"vision_cache": cache} if cache else {}), **overlapped},
        )
        result.stages[name] = stage
        yield Event("stage_end", name, stage.text)
        return stage
