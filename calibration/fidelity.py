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


def measure(reference: Model, candidate: Model, inputs: list[tuple[Prompt | str, Image.Image | None]],
            tokens: int = 32) -> Fidelity:
    """Compare `candidate` with `reference` on rendered prompts (with their image, if any)."""
    ref_all, test_all, matches, cosines = [], [], [], []
    for rendered, image in inputs:
        states, features = [], []
        for model in (reference, candidate):
            prepared = model.prepare(rendered, image)
            model.encode(prepared)
            features.append(prepared.image_features)
            states.append(model.prefill(prepared))
        if features[0] is not None and features[1] is not None:
            cosines.append(float(cosine(np.asarray(features[0]), np.asarray(features[1])).mean()))
        ref, test = states
        ref_logits, test_logits = [], []
        for n in range(tokens):
            ref_logits.append(np.array(ref.logits, dtype=np.float32))
            test_logits.append(np.array(test.logits, dtype=np.float32))
            if n < tokens - 1:
                token = int(np.argmax(ref.logits))
                ref.step(token)
                test.step(token)
        ref_all.append(np.stack(ref_logits))
        test_all.append(np.stack(test_logits))
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
