"""Measuring how closely a quantized model follows its full-precision reference, per pipeline stage.

For each held-out prompt the reference decodes greedily for N tokens; the candidate is fed the same
tokens (teacher forcing), and at every position both next-token distributions are compared (top-1
agreement, KL divergence). The candidate's own greedy continuation equals the reference's exactly
when its top-1 agreed at every position, so exact match needs no second pass.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

from edgevlm import prompts
from edgevlm.backends.base import Model
from edgevlm.calibration.data import Item
from edgevlm.calibration.metrics import Fidelity, cosine, summarize
from edgevlm.images import load_image
from edgevlm.pipeline import render_prompt
from edgevlm.tokenizer import Prompt

STAGES = {"plan": "reasoner", "extract": "extractor", "think": "reasoner"}


def reference_run(reference: Model, rendered: Prompt | str, image: Image.Image | None,
                  tokens: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
    """The reference's side of `measure` for one prompt: its next-token logits [tokens, vocab] along its own greedy
    continuation, and its image features (None without an image). Kept, it serves every candidate measured
    against the same reference (the fidelity target's steps)."""
    prepared = reference.prepare(rendered, image)
    reference.encode(prepared)
    state = reference.prefill(prepared)
    logits = []
    for n in range(tokens):
        logits.append(np.array(state.logits, dtype=np.float32))
        if n < tokens - 1:
            state.step(int(np.argmax(logits[-1])))
    return np.stack(logits), _feature_array(prepared.image_features)


def _feature_array(features) -> np.ndarray | None:
    """Image features as one array [visual tokens, hidden]: ONNX Runtime's are one; transformers' (the PyTorch
    reference backend's) are its vision output, the packed features of each image in `pooler_output`."""
    pooled = getattr(features, "pooler_output", None)
    if pooled is None:
        return None if features is None else np.asarray(features)
    pooled = pooled if isinstance(pooled, (list, tuple)) else [pooled]
    return np.concatenate([p.detach().float().cpu().numpy().reshape(-1, p.shape[-1]) for p in pooled])


def measure(reference: Model | None, candidate: Model, inputs: list[tuple[Prompt | str, Image.Image | None]],
            tokens: int = 32, recorded: list[tuple[np.ndarray, np.ndarray | None]] | None = None) -> Fidelity:
    """Compare `candidate` with `reference` on rendered prompts (with their image, if any). `recorded`: the
    reference's reference_run of each input, if kept from before (else run now; `reference` may be None with it)."""
    ref_all, test_all, matches, cosines = [], [], [], []
    for i, (rendered, image) in enumerate(inputs):
        ref, ref_features = recorded[i] if recorded is not None else reference_run(reference, rendered, image, tokens)
        prepared = candidate.prepare(rendered, image)
        candidate.encode(prepared)
        state = candidate.prefill(prepared)
        features = _feature_array(prepared.image_features)
        if ref_features is not None and features is not None:
            cosines.append(float(cosine(ref_features, features).mean()))
        test = []
        for n in range(tokens):
            test.append(np.array(state.logits, dtype=np.float32))
            if n < tokens - 1:
                state.step(int(np.argmax(ref[n])))  # teacher-forced along the reference's continuation
        ref_all.append(ref)
        test_all.append(np.stack(test))
        matches.append(bool((ref_all[-1].argmax(-1) == test_all[-1].argmax(-1)).all()))
    return summarize(ref_all, test_all, matches, tokens, cosines)


def stage_inputs(stage: str, model: Model, items: list[Item],
                 describe: Callable[[Item], str] | None = None) -> list[tuple[str, Image.Image | None]]:
    """The rendered prompts a stage sees for each item (plan and think on the reasoner, extract on the VLM)."""
    out = []
    for item in items:
        question = prompts.format_question(item.question, list(item.choices) if item.choices else None)
        if stage == "plan":
            out.append((render_prompt(model, prompts.planner_prompt(question), enable_thinking=False), None))
        elif stage == "extract":
            out.append((render_prompt(model, prompts.extract_prompt(item.instruction), with_image=True),
                        load_image(item.image)))
        elif stage == "think":
            description = item.description or (describe(item) if describe else prompts.FALLBACK_INSTRUCTION)
            text = prompts.reasoner_prompt(description, question, multiple_choice=bool(item.choices), think=True)
            out.append((render_prompt(model, text, enable_thinking=True), None))
        else:
            raise ValueError(f"unknown stage {stage!r}")
    return out
