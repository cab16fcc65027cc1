"""The regex states that key a regex or choice constraint's remembered masks (edgevlm.automaton): the syntax it
takes means to it what it means to Python's re and to llguidance, and answers that reach one state by different
text get one mask from llguidance (what makes sharing a state's mask between them exact)."""

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgevlm import automaton as automaton_module
from edgevlm.automaton import automaton
from edgevlm.constraints import Constraint, _compile, _vocabulary
from edgevlm.demo import REASONER
from edgevlm.tokenizer import Tokenizer

EOS = frozenset({0, 2})  # the demo reasoner's <|endoftext|> and <|im_end|>

# Patterns of the syntax taken: literals (escaped punctuation, a two-byte letter), classes, `.`, groups,
# alternation, and repeats of each kind, nested.
ATOMS = st.sampled_from(["a", "b", "é", " ", r"\.", r"\-", ".", "[a-c]", "[^a]", "[ab é]", r"\n", "[0-9]"])
PATTERNS = st.recursive(ATOMS, lambda inner: st.one_of(
    st.tuples(inner, inner).map("".join),
    st.tuples(inner, inner).map(lambda t: f"(?:{t[0]}|{t[1]})"),
    inner.map(lambda p: f"(?:{p})*"), inner.map(lambda p: f"({p})+"), inner.map(lambda p: f"(?:{p})?"),
    st.tuples(inner, st.integers(0, 3), st.integers(0, 3)).map(
        lambda t: f"(?:{t[0]}){{{min(t[1:])},{max(t[1:])}}}"),
), max_leaves=8)
TEXTS = st.text(alphabet="abcé .-\n09", max_size=10)


@pytest.fixture(scope="module")
def vocab():
    return _vocabulary(Tokenizer(REASONER), EOS)


def _matcher(vocab, constraint: Constraint, prefix: str | None = None):
    import llguidance

    return llguidance.LLMatcher(vocab.llg, _compile(constraint.grammar(prefix)), log_level=0)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pattern=PATTERNS, texts=st.lists(TEXTS, max_size=4), prefix=st.sampled_from([None, "Answer: "]),
       data=st.data())
def test_the_automaton_matches_what_python_and_llguidance_match(vocab, pattern, texts, prefix, data):
    """Property: over random patterns of the syntax taken and text (random, matching, and matching with a
    character doubled or dropped, where a bounded repeat ends), the automaton of a regex constraint's lexeme
    (leading blanks, the prefix, the pattern) accepts exactly what Python's re.fullmatch and llguidance's
    matcher accept."""
    constraint = Constraint.regex(pattern)
    states = automaton(list(constraint.parts(prefix)))
    assert states is not None, pattern
    python = re.compile(r"[ \t\n]{0,4}" + re.escape(prefix or "") + f"(?:{pattern})")
    for _ in range(3):
        match = data.draw(st.from_regex(python, fullmatch=True).filter(lambda t: len(t) < 40))
        at = data.draw(st.integers(0, len(match)))
        texts = texts + [match, match[:at] + match[at:at + 1] * 2 + match[at + 1:], match[:at] + match[at + 1:]]
    for text in texts:
        text = text if text.lstrip(" \t\n").startswith(prefix or "") else (prefix or "") + text
        state = states.after(states.start, text.encode())
        ours = state is not None and states.accepts(state)
        matcher = _matcher(vocab, constraint, prefix)
        theirs = all(matcher.consume_token(t) for t in vocab.llg.tokenize_str(text)) and matcher.is_accepting()
        assert ours == bool(python.fullmatch(text)) == theirs, (pattern, text)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pattern=PATTERNS, seed=st.integers(0, 2**31))
def test_answers_in_one_state_get_one_mask(vocab, pattern, seed):
    """Property: random answers under a regex (each token drawn from llguidance's mask) stay followed by the
    automaton token by token, and wherever two of them reach the same state, by whatever text, llguidance's
    masks there are the same."""
    constraint = Constraint.regex(pattern)
    states = automaton(list(constraint.parts("Answer: ")))
    template = _matcher(vocab, constraint, "Answer: ")
    rng = np.random.default_rng(seed)
    masks: dict = {}
    for _ in range(12):
        matcher, state = template.deep_copy(), states.start
        for _ in range(16):
            mask = np.frombuffer(matcher.compute_bitmask(), np.uint8)
            assert masks.setdefault(state, mask.tobytes()) == mask.tobytes(), (pattern, state)
            allowed = [t for t in np.flatnonzero(np.unpackbits(mask, bitorder="little")[:vocab.size]) if t not in EOS]
            if not allowed:
                break
            token = int(rng.choice(allowed))
            assert matcher.consume_token(token)
            state = states.after(state, vocab.text(token))
            assert state is not None, (pattern, token)


@pytest.mark.parametrize("pattern", [r"\d+", r"\w", r"\s", "^a", "a$", r"a\b", "(?i)ab", "(?=a)a", r"(a)\1",
                                     "[[:alpha:]]", "[a&&b]", "[a--b]", "a{,3}", r"\x41", r"\p{L}", "a{2000}"])
def test_patterns_outside_the_syntax_taken_have_no_automaton(pattern):
    assert automaton(["", pattern]) is None


def test_a_character_split_between_tokens_is_followed_and_bad_bytes_end_it():
    states = automaton([r"[ \t\n]{0,4}", "", "é+x"])
    whole = states.after(states.start, "éx".encode())
    half = states.after(states.start, b"\xc3")
    assert half is not None and half[1] == b"\xc3"
    assert states.after(half, b"\xa9x") == whole and states.accepts(whole)
    assert states.after(states.start, b"\xff") is None and states.after(half, b"x") is None


@pytest.mark.parametrize("bound", ["MAX_HELD", "MAX_MOVES"])
def test_past_its_bounds_a_new_state_is_none(monkeypatch, bound):
    """Positions held in its states, and moves worked out: what a hostile pattern can cost is bounded."""
    monkeypatch.setattr(automaton_module, bound, 40 if bound == "MAX_HELD" else 8)
    states = automaton(["", "", "[a-z]{0,30}"])
    assert states.after(states.start, b"a" * 5) is not None  # a few states fit
    assert states.after(states.start, b"a" * 30) is None  # thirty do not
