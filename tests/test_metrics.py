"""The fidelity metrics themselves."""

import numpy as np
import pytest

from edgevlm.calibration.metrics import (
    DECISIVE,
    cosine,
    decisive,
    kl_divergence,
    log_softmax,
    report_table,
    summarize,
    top1_agreement,
)


def test_kl_of_identical_distributions_is_zero_and_shift_invariant():
    logits = np.random.default_rng(0).normal(size=(7, 50)).astype(np.float32) * 4
    np.testing.assert_allclose(kl_divergence(logits, logits), 0, atol=1e-12)
    np.testing.assert_allclose(kl_divergence(logits, logits + 3.0), 0, atol=1e-9)  # softmax ignores a shift


def test_kl_matches_the_definition_and_is_positive_and_asymmetric():
    p = np.array([0.7, 0.2, 0.1])
    q = np.array([0.1, 0.3, 0.6])
    expected = float((p * np.log(p / q)).sum())
    assert kl_divergence(np.log(p), np.log(q)) == pytest.approx(expected)
    assert kl_divergence(np.log(q), np.log(p)) != pytest.approx(expected)
    rng = np.random.default_rng(1)
    assert (kl_divergence(rng.normal(size=(100, 20)), rng.normal(size=(100, 20))) > 0).all()


def test_log_softmax_is_stable_for_huge_logits():
    out = log_softmax(np.array([[1e4, 0.0, -1e4]]))
    assert np.isfinite(out).all() and out[0, 0] == pytest.approx(0.0)


def test_top1_agreement_and_summary():
    ref = np.eye(4)[[0, 1, 2, 3]] * 5
    test = np.eye(4)[[0, 1, 3, 3]] * 5
    assert top1_agreement(ref, test) == 0.75
    f = summarize([ref[:2], ref[2:]], [test[:2], test[2:]], [True, False], tokens=2)
    assert (f.positions, f.sequences, f.exact_match, f.top1_agreement) == (4, 2, 0.5, 0.75)
    assert f.mean_kl > 0
    # the prefill's last position is each sequence's first: rows 0 (agree) and 2 (disagree)
    assert f.prefill_top1 == 0.5 and f.prefill_kl > 0
    assert set(f.to_dict()) == {"top1_agreement", "mean_kl", "exact_match", "positions", "sequences", "tokens",
                                "prefill_top1", "prefill_kl", "decisive_top1", "decisive_positions"}
    assert (f.decisive_positions, f.decisive_top1) == (4, 0.75)  # one-hot logits of 5: every position decisive
    late = summarize([ref[:2], ref[1:3]], [test[:2], test[1:3]], [True, False], tokens=2)
    assert late.prefill_top1 == 1.0 and late.prefill_kl == pytest.approx(0.0)  # rows 0 and 1 first: both agree
    assert late.top1_agreement == 0.75
    with_images = summarize([ref], [test], [False], tokens=4, feature_cosines=[0.5, 1.0])
    assert with_images.to_dict()["feature_cosine"] == 0.75


def test_decisive_agreement_counts_only_the_flips_where_the_reference_was_sure():
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(40, 30))
    margins = rng.uniform(0, 2, size=40)  # the reference's top token's lead over its runner-up, in nats
    top, second = ref.argsort(-1)[:, -1], ref.argsort(-1)[:, -2]
    ref[np.arange(40), top] = ref[np.arange(40), second] + margins
    test = ref.copy()
    test[np.arange(40), second] += 2.5  # every position flips to the runner-up
    sure = margins >= DECISIVE
    np.testing.assert_array_equal(decisive(ref), sure)
    np.testing.assert_array_equal(decisive(ref + 7.0), sure)  # a shift of the logits changes no probability
    f = summarize([ref], [test], [False], tokens=40)
    assert f.top1_agreement == 0 and f.decisive_top1 == 0 and f.decisive_positions == sure.sum() > 0
    hesitant = ~sure  # flips only where the reference hesitated: decisive agreement stays perfect
    mixed = np.where(hesitant[:, None], test, ref)
    g = summarize([ref], [mixed], [False], tokens=40)
    assert g.top1_agreement == pytest.approx(sure.mean()) and g.decisive_top1 == 1.0
    # logits from probabilities: a 2:1 lead is exactly DECISIVE
    assert decisive(np.log(np.array([[0.5, 0.25, 0.25], [0.5, 0.3, 0.2]]))).tolist() == [True, False]
    assert summarize([ref[:1] * 0], [ref[:1]], [True], tokens=1).decisive_top1 == 1.0  # no decisive position
    row = {**f.to_dict(), "role": "reasoner", "size_ratio": 0.3}
    assert f"0.0000 ({f.decisive_positions})" in report_table({"plan": row})
    row.pop("decisive_positions")  # a hand-edited manifest (its schema has each field optional)
    assert "0.0000 " in report_table({"plan": row})
    row.pop("decisive_top1")  # a report written before it was measured
    assert report_table({"plan": row}).splitlines()[-1].split()[6] == "-"


def test_the_fidelity_table_prints_a_dash_for_each_figure_a_manifest_lacks():
    """The manifest's fidelity report is informational (its schema has every field optional): a bundle whose
    report lacks any figure, or all of them, still prints its table (`edgevlm info`), with '-' in their place."""
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(6, 20)) * 3
    f = summarize([ref], [ref + rng.normal(size=ref.shape)], [True], tokens=6)
    row = {**f.to_dict(), "role": "reasoner", "size_ratio": 0.3, "feature_cosine": 0.99}
    full = report_table({"plan": row}).splitlines()[-1].split()
    assert full[:2] == ["plan", "reasoner"] and "-" not in full and full[-1] == "0.30x"
    for key in row:
        cells = report_table({"plan": {k: v for k, v in row.items() if k != key}}).splitlines()[-1].split()
        assert cells[0] == "plan" and (key in ("sequences", "tokens", "decisive_positions") or "-" in cells), key
    assert report_table({"plan": {}}).splitlines()[-1].split() == ["plan"] + ["-"] * 10


def test_cosine_of_rows():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    b = np.array([[2.0, 0.0], [-1.0, -1.0], [0.0, 0.0]])
    np.testing.assert_allclose(cosine(a, b), [1.0, -1.0, 0.0])
