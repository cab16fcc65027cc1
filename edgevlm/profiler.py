"""Where the time and memory go: spans per stage, their summary, traces, and the machine's bandwidth.

Every run records a handful of spans per stage (preprocess, vision, embed, prefill, decode), not one
per token, so this much is always on. `Profiler(detail=True)` also records each decode step and the
sampling between steps (for `--trace`); its cost is measured by benchmarks/profile_overhead.py.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

STEPS = ("preprocess", "vision", "embed", "prefill", "decode")


@dataclass
class Span:
    stage: str
    name: str
    start: float  # seconds, perf_counter clock
    end: float

    @property
    def ms(self) -> float:
        return (self.end - self.start) * 1e3


@dataclass
class StageTimings:
    """Milliseconds per step of one stage; rates in tokens per second."""

    preprocess_ms: float = 0.0
    vision_ms: float = 0.0
    embed_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    ttft_ms: float = 0.0  # stage start to the first generated token
    total_ms: float = 0.0
    prefill_tok_s: float = 0.0
    decode_tok_s: float = 0.0

    def to_dict(self) -> dict:
        return {k: round(v, 3) for k, v in asdict(self).items()}


class Profiler:
    def __init__(self, detail: bool = False) -> None:
        self.detail = detail
        self.spans: list[Span] = []

    @contextmanager
    def span(self, stage: str, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.spans.append(Span(stage, name, start, time.perf_counter()))

    def add(self, stage: str, name: str, start: float, end: float) -> None:
        self.spans.append(Span(stage, name, start, end))

    def timed(self, state, stage: str):
        """`state` with each decode step (and the sampling before it) recorded, when detail is on."""
        return _TimedState(state, self, stage) if self.detail else state

    def stage(self, stage: str, *, prompt_tokens: int, new_tokens: int, first_token_at: float | None) -> StageTimings:
        spans = [s for s in self.spans if s.stage == stage]
        ms = {name: sum(s.ms for s in spans if s.name == name) for name in STEPS}
        start = min((s.start for s in spans), default=0.0)
        end = max((s.end for s in spans), default=0.0)
        t = StageTimings(
            preprocess_ms=ms["preprocess"], vision_ms=ms["vision"], embed_ms=ms["embed"], prefill_ms=ms["prefill"],
            decode_ms=ms["decode"], ttft_ms=(first_token_at - start) * 1e3 if first_token_at else 0.0,
            total_ms=(end - start) * 1e3,
        )
        if t.prefill_ms + t.embed_ms > 0:
            t.prefill_tok_s = prompt_tokens / ((t.prefill_ms + t.embed_ms) / 1e3)
        # the first token comes from the prefill's logits; each later one costs a decode step
        if new_tokens > 1 and t.decode_ms > 0:
            t.decode_tok_s = (new_tokens - 1) / (t.decode_ms / 1e3)
        return t

    def trace_events(self, origin: float | None = None) -> list[dict]:
        """Chrome trace events ("X" complete events, microseconds): a track per stage for its steps
        (preprocess, vision, embed, prefill, decode) and, with detail, one for its tokens (step, sample)."""
        origin = min((s.start for s in self.spans), default=0.0) if origin is None else origin
        tracks: dict[str, int] = {}
        events = []
        for s in sorted(self.spans, key=lambda s: (s.start, -s.end)):
            track = s.stage if s.name in STEPS else f"{s.stage} tokens"
            tid = tracks.setdefault(track, len(tracks) + 1)
            events.append({"name": s.name, "cat": s.stage, "ph": "X", "pid": 1, "tid": tid,
                           "ts": round((s.start - origin) * 1e6, 3), "dur": round((s.end - s.start) * 1e6, 3)})
        events += [{"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": stage}}
                   for stage, tid in tracks.items()]
        events.append({"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": "edgevlm"}})
        return events


class _TimedState:
    """A DecodeState whose steps are recorded as spans: `step`, and `sample` for the time between steps
    (logits processing, sampling, detokenizing, the caller's own work)."""

    def __init__(self, state, prof: Profiler, stage: str):
        self._state, self._prof, self._stage = state, prof, stage
        self._last = time.perf_counter()

    def __getattr__(self, name):
        return getattr(self._state, name)

    @property
    def logits(self):
        return self._state.logits

    def step(self, token_id: int):
        start = time.perf_counter()
        self._prof.add(self._stage, "sample", self._last, start)
        logits = self._state.step(token_id)
        self._last = time.perf_counter()
        self._prof.add(self._stage, "step", start, self._last)
        return logits


def format_table(head: tuple, rows: list[tuple]) -> list[str]:
    """Aligned text rows: the first column left, the others right; floats to 1 decimal, None as '-'."""
    cells = [[c if isinstance(c, str) else "-" if c is None else f"{c:.1f}" if isinstance(c, float) else str(c)
              for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return [fmt.format(*head)] + [fmt.format(*r) for r in cells]


def profile_table(result) -> str:
    """A pipeline Result's per-stage table (`edgevlm run --profile`): where the milliseconds went, how fast
    tokens came, what the caches saved."""
    head = ("stage", "prompt", "new", "preproc ms", "vision ms", "embed ms", "prefill ms", "decode ms", "TTFT ms",
            "total ms", "prefill tok/s", "decode tok/s", "KV MB")
    rows = []
    for name, s in result.stages.items():
        t = s.timings
        vision = f"{t.vision_ms:.1f} (cached)" if s.memory.get("vision_cache") == "hit" else t.vision_ms
        reused = s.memory.get("prefix_tokens", 0)
        prompt = f"{s.prompt_tokens} ({reused} cached)" if reused else s.prompt_tokens
        rows.append((name, prompt, s.new_tokens, t.preprocess_ms, vision, t.embed_ms, t.prefill_ms,
                     t.decode_ms, t.ttft_ms, t.total_ms, t.prefill_tok_s, t.decode_tok_s,
                     s.memory.get("kv_used", 0) / 1e6))
    lines = format_table(head, rows)
    gpu = "" if result.peak_gpu_bytes is None else f", peak GPU {result.peak_gpu_bytes / 1e6:.0f} MB"
    lines.append(f"total {result.total_ms:.1f} ms (image decode {result.image_ms:.1f} ms), "
                 f"peak RSS {result.peak_rss_bytes / 1e6:.0f} MB{gpu}")
    return "\n".join(lines)


def write_trace(path: str | Path, prof: Profiler, metadata: dict | None = None) -> None:
    """Chrome/Perfetto trace-event JSON (opens in ui.perfetto.dev and chrome://tracing)."""
    doc = {"traceEvents": prof.trace_events(), "displayTimeUnit": "ms", "otherData": metadata or {}}
    from edgevlm.bundle import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(doc))


def peak_rss_bytes() -> int:
    """This process's peak resident set size (since the last reset_peak_rss, where Linux allows one)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Restart the peak-RSS count from the current RSS (Linux: /proc/self/clear_refs), so that several
    models timed in one process each get their own peak. False where the system has no such reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


DRAM_PROBE_BYTES = 256 * 2**20  # far past any CPU cache: what a read of this size gets is the DRAM's


def run_threads() -> int:
    """The threads a run computes with: EDGEVLM_THREADS, else one per core (ONNX Runtime's default)."""
    return int(os.environ.get("EDGEVLM_THREADS", "0") or 0) or os.cpu_count() or 1


def _best_seconds(work, repeats: int) -> float:
    """The shortest of `repeats` timed calls of `work` (the probes' figure: the least disturbed run)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


_BEST_READ: dict[tuple[int, int], float] = {}  # (bytes, threads) -> the fastest read measured in this process


def _read_bandwidth(size: int, threads: int, repeats: int) -> float:
    data = np.ones(size // 8, np.float64)  # written once: its pages are resident before the timing
    parts = np.array_split(data, threads)
    with ThreadPoolExecutor(threads) as pool:  # numpy's reductions let go of the GIL: the threads read at once
        best = _best_seconds(lambda: list(pool.map(np.sum, parts)), repeats)
    return data.nbytes / best / 1e9


def measure_bandwidth(nbytes: int = DRAM_PROBE_BYTES, threads: int | None = None, repeats: int = 25,
                      again: bool = False) -> float:
    """Read bandwidth in GB/s: `threads` threads (default: the run's, `run_threads`) each summing their share of
    `nbytes` (rounded up to a power of two, 1 MB to 256 MB), best of `repeats`. np.sum is as fast a read as any
    measured here (a float32, int64 or bitwise-or reduction and ONNX Runtime's own GEMV all read within the
    2-8% that one 256 MB probe moves between runs). A working set that fits a cache reads at the cache's rate, so
    a decode step is compared with a read of as many bytes as it reads. A read test can only under-state what
    the memory delivers, so the figure for a size is the fastest read of it seen in this process: measured once,
    and again (keeping the faster) with `again`, as bench does after a stage's runs, where the machine may be
    quieter than it was at the start."""
    size = min(max(1 << max(int(nbytes) - 1, 1).bit_length(), 2**20), DRAM_PROBE_BYTES)
    key = (size, threads or run_threads())
    if again or key not in _BEST_READ:
        _BEST_READ[key] = max(_BEST_READ.get(key, 0.0), _read_bandwidth(size, key[1], repeats))
    return _BEST_READ[key]


GEMM_M, GEMM_K, GEMM_N = 1024, 1024, 4096  # the probe's shape (K and N fixed in edgevlm/probes): 8.6 GFLOP


@functools.lru_cache(maxsize=8)
def measure_gemm(precision: str, threads: int | None = None, repeats: int = 5) -> float:
    """GEMM rate in GFLOP/s that ONNX Runtime reaches here at `precision` ("fp32", or "int8": uint8 x int8, what
    int8 activations against int8/int4 weights run on) with `threads` (default: the run's), best of `repeats` on
    a [GEMM_M, GEMM_K] x [GEMM_K, GEMM_N] product with a constant (prepacked) weight, as a model's: the compute
    roofline of prefill and the vision tower. Measured once per setting."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or run_threads()
    options.log_severity_level = 3
    probe = Path(__file__).parent / "probes" / f"gemm_{precision}.onnx"
    session = ort.InferenceSession(probe.read_bytes(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    if precision == "int8":
        feed = {"A": rng.integers(0, 255, (GEMM_M, GEMM_K), dtype=np.uint8)}
    else:
        feed = {"A": rng.standard_normal((GEMM_M, GEMM_K), dtype=np.float32)}
    session.run(None, feed)  # warm up
    return 2 * GEMM_M * GEMM_K * GEMM_N / _best_seconds(lambda: session.run(None, feed), repeats) / 1e9
