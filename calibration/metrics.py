"""Fidelity metrics: how close a quantized model's next-token distributions are to the reference's."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(ref || test) in nats per position, for logits [..., vocab]."""
    p_log, q_log = log_softmax(ref_logits), log_softmax(logits)
    return (np.exp(p_log) * (p_log - q_log)).sum(axis=-1)


def top1_agreement(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    return float((ref_logits.argmax(-1) == logits.argmax(-1)).mean())


DECISIVE = float(np.log(2.0))  # nats: the reference's top token at least twice as likely as its runner-up


def decisive(ref_logits: np.ndarray) -> np.ndarray:
    """The positions where the reference's top token leads its runner-up by at least DECISIVE nats (a logit
    difference is a log-probability difference). Elsewhere the reference itself hesitates between two tokens, and
    any change of arithmetic (another CPU's kernels, fp16) flips some of them."""
    top2 = np.partition(ref_logits.astype(np.float64), -2, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0] >= DECISIVE


@dataclass
class Fidelity:
    """One stage's agreement with the reference, over `positions` teacher-forced next-token predictions
    and `sequences` free-running greedy continuations of `tokens` tokens. `prefill_*`: the same at the last
    prompt position alone (what the prefill computed); `feature_cosine`: the image features' mean cosine
    similarity, per visual token (stages with an image; else None). `decisive_top1`: the top-1 agreement over
    the `decisive_positions` alone (see `decisive`): whether the flips are where the reference was sure (1.0
    when there are none such)."""

    top1_agreement: float
    mean_kl: float
    exact_match: float
    positions: int
    sequences: int
    tokens: int
    prefill_top1: float = 0.0
    prefill_kl: float = 0.0
    feature_cosine: float | None = None
    decisive_top1: float = 1.0
    decisive_positions: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean_kl"] = round(d["mean_kl"], 6)
        d["top1_agreement"] = round(d["top1_agreement"], 4)
        d["exact_match"] = round(d["exact_match"], 4)
        d["prefill_top1"] = round(d["prefill_top1"], 4)
        d["prefill_kl"] = round(d["prefill_kl"], 6)
        d["decisive_top1"] = round(d["decisive_top1"], 4)
        if d["feature_cosine"] is None:
            del d["feature_cosine"]
        else:
            d["feature_cosine"] = round(d["feature_cosine"], 6)
        return d


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of the rows of a and b [..., dim]."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


def summarize(ref_logits: list[np.ndarray], test_logits: list[np.ndarray], matches: list[bool],
              tokens: int, feature_cosines: list[float] = ()) -> Fidelity:
    """Pool per-sequence logits [positions, vocab] (the first: the prefill's last position) and greedy
    exact-match flags into one Fidelity."""
    ref, test = np.concatenate(ref_logits), np.concatenate(test_logits)
    ref0, test0 = np.stack([r[0] for r in ref_logits]), np.stack([t[0] for t in test_logits])
    sure = decisive(ref)
    return Fidelity(top1_agreement=top1_agreement(ref, test), mean_kl=float(kl_divergence(ref, test).mean()),
                    exact_match=float(np.mean(matches)) if matches else 0.0, positions=len(ref),
                    sequences=len(matches), tokens=tokens, prefill_top1=top1_agreement(ref0, test0),
                    prefill_kl=float(kl_divergence(ref0, test0).mean()),
                    feature_cosine=float(np.mean(feature_cosines)) if len(feature_cosines) else None,
                    decisive_top1=top1_agreement(ref[sure], test[sure]) if sure.any() else 1.0,
                    decisive_positions=int(sure.sum()))


def report_table(report: dict | None) -> str:
    """A bundle's fidelity report (manifest "fidelity": stage -> Fidelity fields + role, size_ratio) as a table."""
    if not report:
        return "fidelity: not measured (an fp32 bundle is the reference)"
    lines = [f"{'stage':<9}{'model':<11}{'top-1 agree':>12}{'mean KL':>10}{'exact match':>13}{'positions':>11}"
             f"{'decisive top-1':>15}{'prefill top-1':>14}{'prefill KL':>11}{'features cos':>13}{'size':>8}"]
    for stage, r in report.items():
        lines.append(f"{stage:<9}{str(r.get('role', '-')):<11}{_field(r, 'top1_agreement', '.4f'):>12}"
                     f"{_field(r, 'mean_kl', '.4g'):>10}{_field(r, 'exact_match', '.2f'):>13}"
                     f"{_field(r, 'positions', 'd'):>11}{_decisive(r):>15}{_field(r, 'prefill_top1', '.4f'):>14}"
                     f"{_field(r, 'prefill_kl', '.4g'):>11}{_field(r, 'feature_cosine', '.5f'):>13}"
                     f"{_field(r, 'size_ratio', '.2f', 'x'):>8}")
    return "fidelity vs fp32:\n" + "\n".join(lines)


def _field(r: dict, key: str, spec: str, unit: str = "") -> str:
    """One figure of a stage's report, '-' where it is absent: the manifest's schema keeps the report
    informational (every field optional), so older or hand-edited manifests print rather than fail."""
    value = r.get(key)
    return "-" if value is None else format(value, spec) + unit


def _decisive(r: dict) -> str:
    """`decisive_top1 (positions)`; '-' for a report written before it was measured (the manifest's schema has
    each field optional: a count missing is left out)."""
    if "decisive_top1" not in r:
        return "-"
    count = r.get("decisive_positions")
    return f"{r['decisive_top1']:.4f}" + ("" if count is None else f" ({count})")
