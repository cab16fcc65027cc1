"""The shared generation loop: thinking budget, NoWait banning, sampling, stop rules."""

import json

import numpy as np
import pytest

from edgevlm import prompts
from edgevlm.generation import Decoding, ThinkControl, _draw, distribution, generate, sample
from edgevlm.tokenizer import Tokenizer


def _tokens(gen):
    ids = []
    while True:
        try:
            ids.append(next(gen))
        except StopIteration as done:
            assert done.value.token_ids == ids
            return done.value


def _prepare(model, text):
    prepared = model.prepare(model.tokenizer.apply_chat_template([{"role": "user", "content": text}]))
    return model.prefill(prepared)


# ---------------------------------------------------------------- thinking budget
def test_budget_forces_newline_then_think_end_exactly_at_the_budget(torch_models):
    model = torch_models("qwen3")
    tok = model.tokenizer
    control = ThinkControl(think_end_id=tok.token_id("</think>"), newline_id=tok.encode("\n")[0], budget=12)
    gen = _tokens(generate(_prepare(model, "Think about shapes."), Decoding(max_new_tokens=20), eos_ids=set(),
                           max_context=model.max_context, rng=np.random.default_rng(0), think=control))
    ids = gen.token_ids
    assert control.think_end_id not in ids[:10]  # precondition: the model did not stop thinking by itself
    assert ids[10] == control.newline_id  # token 11 = budget - 1
    assert ids[11] == control.think_end_id  # token 12 = budget
    assert len(ids) == 20  # generation goes on after thinking, up to max_new_tokens


def test_budget_boosts_newline_and_think_end_past_95_percent():
    control = ThinkControl(think_end_id=3, newline_id=1, budget=100)
    logits = np.arange(10, dtype=np.float32) + 1.0  # think_end logit = 4
    before = control.apply(logits.copy(), 95)  # 95/100 is not past 95%
    np.testing.assert_array_equal(before, logits)
    after = control.apply(logits.copy(), 96)
    assert after[1] == pytest.approx(4 * 1.96) and after[3] == pytest.approx(4 * 1.96)
    np.testing.assert_array_equal(np.delete(after, [1, 3]), np.delete(logits, [1, 3]))


def test_budget_stops_once_thinking_ended_early():
    # a model that closes </think> by itself is never forced to emit another one
    class EndsEarly:  # a stand-in decoder whose preferences are known: </think> first, then token 5
        prompt_len = 1
        logits = np.array([0, 0, 0, 10, 0, 1.0], dtype=np.float32)

        def step(self, token_id):
            return np.array([0, 0, 0, -10, 0, 1.0], dtype=np.float32)

    control = ThinkControl(think_end_id=3, newline_id=1, budget=4)
    gen = _tokens(generate(EndsEarly(), Decoding(max_new_tokens=8), eos_ids=set(), max_context=100,
                           rng=np.random.default_rng(0), think=control))
    assert gen.token_ids == [3, 5, 5, 5, 5, 5, 5, 5]


# ---------------------------------------------------------------- NoWait
@pytest.fixture
def word_tokenizer(tmp_path):
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers

    words = ["wait", "Wait", " Wait", "waiter", " but", "But", "butter", "button", " however,", "double-check",
             "-check", " checked", "Hmm", "oh", "ohm", " another", "other", "others", " maybe", "ok", "<|im_end|>"]
    raw = RawTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="ok"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.add_special_tokens(["<|im_end|>"])
    raw.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    return Tokenizer(tmp_path), words


def test_reflexive_words_are_banned_as_whole_words_only(word_tokenizer):
    tok, words = word_tokenizer
    banned = {words[i] for i in tok.ids_of_words(prompts.REFLEXIVE_WORDS)}
    assert banned == {"wait", "Wait", " Wait", " but", "But", " however,", "double-check", "-check", "Hmm", "oh",
                      " another", "other", " maybe"}
    # "waiter", "butter", "button", "checked", "ohm", "others" only contain a keyword: allowed


def test_banned_tokens_are_never_chosen_while_thinking_and_allowed_after():
    control = ThinkControl(think_end_id=0, newline_id=1, budget=None, banned_ids=np.array([2, 3]))
    logits = np.array([0.0, 0.0, 9.0, 8.0, 1.0], dtype=np.float32)
    assert sample(control.apply(logits.copy(), 1), Decoding(max_new_tokens=1), np.random.default_rng(0)) == 4

    class Decoder:
        prompt_len = 1
        logits = np.array([5.0, 0, 9.0, 8.0, 1.0], dtype=np.float32)  # step 1: 2 is banned, 0 (</think>) wins

        def step(self, token_id):
            return np.array([0.0, 0, 9.0, 8.0, 1.0], dtype=np.float32)

    gen = _tokens(generate(Decoder(), Decoding(max_new_tokens=3), eos_ids=set(), max_context=100,
                           rng=np.random.default_rng(0), think=control))
    assert gen.token_ids == [0, 2, 2]  # after </think> the banned word is the model's choice again


# ---------------------------------------------------------------- sampling
def test_greedy_is_argmax():
    logits = np.random.default_rng(1).normal(size=1000).astype(np.float32)
    assert sample(logits, Decoding(max_new_tokens=1), np.random.default_rng(0)) == int(np.argmax(logits))


def _dense(logits, decoding):
    """`distribution` as probabilities over the whole vocabulary."""
    ids, weights = distribution(logits, decoding)
    probs = np.zeros(logits.size)
    probs[slice(None) if ids is None else ids] = weights
    return probs / probs.sum()


def _hf_in_float64(logits, decoding):
    """HF's warpers the way HF runs them (a sort of the whole vocabulary), in float64: the specification
    `distribution` keeps without the sort. Also returns each token's distance from the top-p cut."""
    x = logits.astype(np.float64) / decoding.temperature
    if 0 < decoding.top_k < x.size:
        x[x < np.sort(x)[-decoding.top_k]] = -np.inf
    p = np.exp(x - x.max())
    p /= p.sum()
    margin = np.full(x.size, np.inf)
    if decoding.top_p < 1:
        order = np.argsort(x, kind="stable")
        cum = np.cumsum(p[order])
        remove = cum <= 1 - decoding.top_p
        remove[-1] = False
        margin[order] = np.abs(cum - (1 - decoding.top_p))
        p[order[remove]] = 0
    return p / p.sum(), margin


@pytest.mark.parametrize("top_k, top_p, temperature", [(20, 1.0, 0.6), (0, 0.95, 0.6), (20, 0.8, 0.7), (5, 0.5, 1.3)])
def test_distribution_keeps_the_same_tokens_as_transformers(top_k, top_p, temperature):
    import torch
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    rng = np.random.default_rng(top_k + int(top_p * 100))
    decoding = Decoding(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p)
    for _ in range(20):
        logits = (rng.normal(size=500) * 3).astype(np.float32)
        scores = torch.from_numpy(logits)[None]
        scores = TemperatureLogitsWarper(temperature)(None, scores)
        if top_k:
            scores = TopKLogitsWarper(top_k)(None, scores)
        if top_p < 1:
            scores = TopPLogitsWarper(top_p)(None, scores)
        theirs = torch.softmax(scores[0].double(), -1).numpy()
        ours = _dense(logits, decoding)
        np.testing.assert_array_equal(ours > 0, theirs > 0)
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (0, 0.95), (0, 0.5), (20, 0.95), (50, 1.0)])
def test_distribution_over_a_real_vocabulary_matches_the_full_sort(top_k, top_p):
    # 50,001 tokens: the float32 path, top-p's shortcut past the tokens under (1 - top_p) / vocab, ties at the
    # k-th value, banned tokens (-inf), and a vocabulary that is not a whole number of the draw's blocks.
    rng = np.random.default_rng(top_k + int(top_p * 100))
    decoding = Decoding(max_new_tokens=1, temperature=0.6, top_k=top_k, top_p=top_p)
    for trial in range(5):
        logits = (rng.normal(size=50_001) * (1 + 3 * trial)).astype(np.float32)
        logits[rng.choice(logits.size, 50, replace=False)] = -np.inf
        logits[np.argsort(logits)[-top_k - 3:-top_k + 3]] = logits[np.argsort(logits)[-top_k]] if top_k else 0
        ref, margin = _hf_in_float64(logits, decoding)
        ours = _dense(logits, decoding)
        differ = (ours > 0) != (ref > 0)
        # Only a token on the top-p cut itself may go either way, or one that float32's exp rounds to 0.
        assert not differ[(margin > 1e-6) & (ref > 1e-30)].any()
        np.testing.assert_allclose(ours[~differ], ref[~differ], rtol=1e-4, atol=1e-9)


def test_drawing_by_blocks_follows_the_weights():
    rng = np.random.default_rng(3)
    weights = np.zeros(50_001, np.float32)
    heavy = [0, 255, 256, 20_000, 49_920, 50_000]  # block edges and the last, short block
    weights[heavy] = [1, 2, 3, 4, 5, 6]
    weights[1000:1256] = 5 / 256  # a block of many small ones
    draws = np.array([_draw(weights, u) for u in rng.random(30_000)])
    freq = np.bincount(draws, minlength=weights.size)
    expect = weights / weights.sum()
    np.testing.assert_allclose(freq[heavy] / draws.size, expect[heavy], atol=0.01)
    assert abs(freq[1000:1256].sum() / draws.size - expect[1000:1256].sum()) < 0.01
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(weights))  # never a token of weight 0
    # The ends of [0, 1) land on tokens that can be drawn, never on a zero (banned) one.
    assert _draw(weights, 0.0) == 0 and _draw(weights, np.nextafter(1.0, 0.0)) == 50_000
    weights[50_000] = 0
    assert _draw(weights, np.nextafter(1.0, 0.0)) == 49_920
    assert _draw(np.array([0.0, 1.0, 0.0]), np.nextafter(1.0, 0.0)) == 1  # a few tokens: in Python
    assert _draw(np.r_[np.zeros(100), 1.0, np.zeros(399)], np.nextafter(1.0, 0.0)) == 100  # up to 1024: one cumsum
    for size in (7, 500):  # the two shorter paths follow the weights too
        weights = rng.random(size) ** 4
        draws = np.bincount([_draw(weights, u) for u in rng.random(20_000)], minlength=size) / 20_000
        assert np.abs(draws - weights / weights.sum()).max() < 0.015


def test_sampling_follows_the_softmax_and_is_reproducible():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    decoding = Decoding(max_new_tokens=1, temperature=1.0)
    draws = [sample(logits, decoding, rng) for rng in [np.random.default_rng(7)] for _ in range(20000)]
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.015)  # ~4 sigma at n=20000
    again = [sample(logits, decoding, rng) for rng in [np.random.default_rng(7)] for _ in range(20000)]
    assert again == draws
    nucleus = Decoding(max_new_tokens=1, temperature=1.0, top_p=0.7)  # keeps {0.5, 0.3}
    assert {sample(logits, nucleus, np.random.default_rng(s)) for s in range(500)} == {0, 1}


# ---------------------------------------------------------------- stop rules
def test_generation_stops_at_eos_length_and_context(torch_models):
    model = torch_models("qwen3")
    free = _tokens(generate(_prepare(model, "Describe."), Decoding(max_new_tokens=12), eos_ids=set(),
                            max_context=model.max_context, rng=np.random.default_rng(0)))
    assert free.stop_reason == "length" and len(free.token_ids) == 12
    # the 5th token declared an end-of-sequence token: generation stops right after it, keeping it
    eos = _tokens(generate(_prepare(model, "Describe."), Decoding(max_new_tokens=12), eos_ids={free.token_ids[4]},
                           max_context=model.max_context, rng=np.random.default_rng(0)))
    first = free.token_ids.index(free.token_ids[4])
    assert eos.stop_reason == "eos" and eos.token_ids == free.token_ids[:first + 1]
    state = _prepare(model, "Describe.")
    ctx = _tokens(generate(state, Decoding(max_new_tokens=12), eos_ids=set(), max_context=state.prompt_len + 3,
                           rng=np.random.default_rng(0)))
    assert ctx.stop_reason == "context" and ctx.token_ids == free.token_ids[:3]


def test_until_stops_after_the_token_where_it_turns_true_even_under_a_constraint(torch_models):
    from edgevlm.constraints import AnswerMatcher, Constraint

    model = torch_models("qwen3")
    asked = []

    def until():
        asked.append(1)
        return len(asked) == 3

    gen = _tokens(generate(_prepare(model, "Describe."), Decoding(max_new_tokens=12), eos_ids=set(),
                           max_context=10_000, rng=np.random.default_rng(0), until=until))
    assert gen.stop_reason == "deadline" and len(gen.token_ids) == 3
    matcher = AnswerMatcher(Constraint.regex("[a-z]{30}"), model.tokenizer, model.eos_ids, start="now", prefix=False)
    asked.clear()
    cut = _tokens(generate(_prepare(model, "Describe."), Decoding(max_new_tokens=12), eos_ids=model.eos_ids,
                           max_context=10_000, rng=np.random.default_rng(0), answer=matcher, until=until))
    assert cut.stop_reason == "deadline" and not matcher.satisfied  # cut by the deadline, not the constraint
