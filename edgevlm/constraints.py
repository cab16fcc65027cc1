"""Answers a robot can act on: the answer after the reasoning is decoded under a constraint (a JSON schema, a
regular expression or a list of choices), token by token: the token the model would pick is checked with
llguidance, and only a refused one costs a mask of the vocabulary (numpy logits).

The reasoning stays free (thinking budget, NoWait). The constraint takes over where the answer starts:
after `</think>` in thinking mode; from the first token when the stage writes nothing but the answer
(no-think, direct); and for a reasoner that thinks in plain text (no `</think>` in its vocabulary), when
its text reaches "Answer:", or when only the answer's share of the budget is left, at which point it is
made to write "Answer:" and the answer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache, wraps
from typing import Any

import numpy as np

from edgevlm.automaton import automaton
from edgevlm.errors import UsageError
from edgevlm.generation import Decoding, distribution, draw, sample

MARKER = "Answer:"  # what the method's prompts ask the reasoner to write before its answer
# Tokens a plain-text reasoner keeps for its answer: past this point of its budget it must answer.
ANSWER_RESERVE = 64
_LEADING_SPACE = r"[ \t\n]{0,4}"  # a blank line or so before the answer, as models write it
# A constraint's text at most (a schema's JSON, a regex, the options together): ~50,000 short options. Past it
# llguidance refuses the grammar anyway, but only after seconds and gigabytes (a million options: 10 s, 2.5 GB).
MAX_CONSTRAINT_CHARS = 1_000_000
KEPT_CHARS = 65_536  # grammars up to this size are kept once compiled and built (see _kept)
_REGEX_META = frozenset("\\.+*?()|[]{}^$#&-~")  # what a literal escapes in a regex (Rust's regex::escape)


def _llguidance():
    import llguidance

    return llguidance


def _limits():
    """llguidance's own bounds on a grammar's work per step (its defaults), with errors that do not quote the
    grammar and parser state back (by default they do: tens of kB for a long list of choices)."""
    return _llguidance().LLParserLimits(verbose_errors=False)


@dataclass(frozen=True)
class Constraint:
    """What the answer must be. `kind` is "json_schema", "regex" or "choice"; `rule` its Lark rule body."""

    kind: str
    rule: str
    schema: dict | None = None
    options: tuple[str, ...] = ()  # a choice's options, as the caller wrote them
    pattern: str | None = None  # a regex's or choice's regular expression (Python's syntax, as given)

    @classmethod
    def json_schema(cls, schema: dict | str) -> Constraint:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except (ValueError, RecursionError) as e:
                raise UsageError(f"the JSON schema is not JSON: {_first_line(str(e))}") from None
        if not isinstance(schema, dict):
            raise UsageError(f"a JSON schema must be an object, got {type(schema).__name__}")
        guidance = schema.get("x-guidance") or {}
        if not isinstance(guidance, dict):
            raise UsageError(f"the JSON schema's x-guidance must be an object of llguidance's options, got "
                             f"{type(guidance).__name__}")
        # Compact JSON (no whitespace between tokens) unless the schema's own x-guidance says otherwise.
        try:
            rule = "%json " + json.dumps({**schema, "x-guidance": {"whitespace_flexible": False, **guidance}},
                                         separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError, RecursionError) as e:  # a Python caller's set, NaN, object, or a cycle
            raise UsageError(f"the JSON schema is not JSON: {_first_line(str(e))}") from None
        _bound(len(rule), "the JSON schema")
        return cls("json_schema", rule, schema)._checked()

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        if not isinstance(pattern, str) or not pattern:
            raise UsageError("the regular expression must be a non-empty string")
        _bound(len(pattern), "the regular expression")
        return cls("regex", "/" + _llguidance().regex_to_lark(pattern) + "/", pattern=pattern)._checked()

    @classmethod
    def choice(cls, options: list[str] | tuple[str, ...]) -> Constraint:
        if not options or not all(isinstance(o, str) and o.strip() for o in options):
            raise UsageError("choices must be a non-empty list of non-empty strings")
        _bound(sum(map(len, options)), "the choices together")
        # One lexeme (a regex of the options), not a rule of one alternative per option: its states are the
        # lexer's, where a rule of thousands of alternatives passes llguidance's 2,000 items in a parse row.
        # Stripped: an answer is read without its surrounding blanks (`answer`: the caller's own option).
        pattern = "|".join(map(_literal, dict.fromkeys(o.strip() for o in options)))
        return cls("choice", "/" + _llguidance().regex_to_lark(pattern) + "/", options=tuple(options),
                   pattern=pattern)._checked()

    def grammar(self, prefix: str | None) -> str:
        """The Lark grammar of an answer: leading blanks, then `prefix` (if any), then the rule. A regex's or
        choice's is one lexeme, whose state the answer's text alone decides (see `parts`)."""
        start = f"/{_LEADING_SPACE}/" + (f" {json.dumps(prefix)}" if prefix else "")
        if self.pattern is None:
            return f"start: {start} answer\nanswer: {self.rule}\n"
        return f"start: ANSWER\nANSWER: {start} RULE\nRULE: {self.rule}\n"

    def parts(self, prefix: str | None) -> tuple[str, ...] | None:
        """The grammar's one lexeme as regular expressions in a row (Python's syntax), or None (JSON)."""
        if self.pattern is None:
            return None
        return (_LEADING_SPACE, _literal(prefix or ""), self.pattern)

    def _checked(self) -> Constraint:
        """A constraint llguidance can compile, else a one-line UsageError (before any model runs)."""
        error, messages = _validate(self.grammar(MARKER + " "))
        if error:
            what = {"json_schema": "JSON schema", "regex": "regular expression", "choice": "choices"}[self.kind]
            first = next((m for m in messages if m.strip()), "invalid")
            raise UsageError(f"invalid {what}: {_first_line(first)}")
        return self

    def answer(self, text: str) -> str:
        """A constrained answer's text as the caller wrote it: for a choice, the first option it is (an option
        written with blanks around it, " left ", is answered as such)."""
        return next((o for o in self.options if o.strip() == text), text)

    def parse(self, answer: str) -> Any:
        """The JSON value of an answer a schema constrained (None for other kinds, or text that is not JSON)."""
        if self.kind != "json_schema":
            return None
        try:
            return json.loads(answer)
        except ValueError:
            return None


def _literal(text: str) -> str:
    """A regular expression matching `text` alone."""
    return "".join("\\" + c if c in _REGEX_META else c for c in text)


def _bound(chars: int, what: str) -> None:
    if chars > MAX_CONSTRAINT_CHARS:
        raise UsageError(f"{what} is {chars:,} characters; the limit is {MAX_CONSTRAINT_CHARS:,}")


def answer_text(response: str, *, prefix: bool) -> str:
    """The constrained answer in a stage's visible output: after the last "Answer:" (reasoner stages), or all
    of it (direct mode)."""
    return (response.rsplit(MARKER, 1)[-1] if prefix else response).strip()


def _first_line(message: str) -> str:
    """llguidance's error, on one line: its first line (less the grammar position) and its `error:` line."""
    lines = [line.strip() for line in message.strip().splitlines()]
    head = re.sub(r"^at \d+\(\d+\): ", "", lines[0]).removesuffix("regex parse error:").strip(" :")
    detail = next((line.removeprefix("error:").strip() for line in lines[1:] if line.startswith("error:")), "")
    return (f"{head}: {detail}" if detail else head)[:300]


def _kept(maxsize: int):
    """An LRU cache of a function whose last argument is a grammar's text, for grammars of up to KEPT_CHARS:
    a server sees as many grammars as its clients send, and a large one (up to MAX_CONSTRAINT_CHARS) costs
    llguidance ~100 MB built, so those are made again on each call rather than kept."""
    def wrap(fn):
        cached = lru_cache(maxsize=maxsize)(fn)

        @wraps(fn)
        def call(*args):
            return (cached if len(args[-1]) <= KEPT_CHARS else fn)(*args)

        return call

    return wrap


@_kept(256)
def _compile(lark: str) -> str:
    return _llguidance().grammar_from("lark", lark)


@_kept(256)
def _validate(lark: str) -> tuple[bool, tuple[str, ...]]:
    """(is_error, messages) of a grammar: once per grammar, though a call's options are checked twice (when
    given, and when the run starts)."""
    error, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(_compile(lark), None, limits=_limits())
    return error, tuple(messages)


class _Vocabulary:
    """A tokenizer as llguidance reads it (built once per tokenizer: ~0.3 s for a 49k vocabulary, ~1 s for
    150k)."""

    def __init__(self, tokenizer, eos_ids: set[int]):
        self.llg = _llguidance().LLTokenizer(tokenizer.to_json(), eos_token=sorted(eos_ids))
        self.size = self.llg.vocab_size  # the bitmask's length in bits, as llguidance writes it
        self._texts: dict[int, bytes | None] = {}  # at most a vocabulary's

    def text(self, token: int) -> bytes | None:
        """A token's bytes as text (None for a special token: an end of sequence)."""
        if token not in self._texts:
            special = self.llg.is_special_token(token)
            self._texts[token] = None if special else self.llg.decode_bytes([token])
        return self._texts[token]


@lru_cache(maxsize=8)
def _vocabulary(tokenizer, eos: frozenset[int]) -> _Vocabulary:
    return _Vocabulary(tokenizer, set(eos))


class _Node:
    """A state of an answer under one grammar: the states its allowed tokens lead to, as seen so far, and once
    a mask was computed there, the allowed tokens (a bit per token, and their ids)."""

    __slots__ = ("children", "bits", "ids", "shared", "key", "checked")

    def __init__(self, shared: bool, key=None):
        self.children: dict[int, _Node] = {}
        self.bits: np.ndarray | None = None  # uint8, bit t % 8 of byte t // 8 for token t (llguidance's order)
        self.ids: np.ndarray | None = None  # int32, ascending
        self.shared = shared  # part of its grammar's states (counted in its bounds), else one answer's own
        self.key = key  # the answer's regex state (edgevlm.automaton), where its text decides it
        self.checked = False  # a token was checked here without the mask


class _Grammar:
    """One grammar over one vocabulary: a fresh matcher to copy (~2 us) rather than build (~1 ms) for each
    answer, and the states answers have reached with the masks computed in them, so that an answer reaching a
    state seen before (a robot asking with the same constraint every frame) reuses them instead of asking
    llguidance again (a mask costs 5-55 us on a 1k vocabulary, the token that completes an answer as much).

    A state is what is left to match. For a regex or choice, whose grammar is one lexeme, the answer's text
    decides it (`automaton`: the lexeme's states; llguidance's mask is a function of what is left, so two texts
    with the same state have the same mask), and answers of different words share the states of a word's
    letters. Else (JSON, or a regex outside the syntax the automaton takes) a state is the tokens that led to it
    (a trie). Bounded: MAX_NODES states, MAX_EDGES tokens from one to the next (a trie has one per state; a
    regex's states can have one per token of the vocabulary) and MAX_MASK_BYTES of masks; past one, an
    answer's new states (or edges, or masks) are its own and go with it. Generations on other threads add to it
    at once without a lock: a state is added once (dict.setdefault), a mask kept once; a race can overshoot a
    bound's count by one."""

    MAX_NODES = 4096
    MAX_EDGES = 16_384
    MAX_MASK_BYTES = 1 << 20

    def __init__(self, vocab: _Vocabulary, parts: tuple[str, ...] | None, grammar: str):
        self.vocab = vocab
        self.template = _llguidance().LLMatcher(vocab.llg, grammar, log_level=0, limits=_limits())
        self.automaton = None if parts is None else automaton(list(parts))
        self.root = _Node(shared=True, key=None if self.automaton is None else self.automaton.start)
        self.keyed = {} if self.automaton is None else {self.root.key: self.root}  # the states reached, by key
        self.nodes, self.edges, self.mask_bytes, self.largest = 1, 0, 0, 0

    def child(self, node: _Node, token: int) -> _Node:
        """The state `token` leads to from `node` (an allowed token), added if new."""
        child = node.children.get(token)
        if child is not None:
            return child
        key = None
        if node.key is not None and (text := self.vocab.text(token)) is not None:
            key = self.automaton.after(node.key, text)
            child = self.keyed.get(key)
        if child is None:
            shared = node.shared and self.nodes < self.MAX_NODES and self.edges < self.MAX_EDGES
            new = _Node(shared, key)
            if not shared:  # an answer's own state: kept only by its own states
                return new if node.shared else node.children.setdefault(token, new)
            # one state, whichever thread adds it first
            child = node.children.setdefault(token, new) if key is None else self.keyed.setdefault(key, new)
            self.nodes += child is new
        elif node.shared and self.edges >= self.MAX_EDGES:
            return child
        self.edges += node.shared
        return node.children.setdefault(token, child)

    def has_room(self, node: _Node) -> bool:
        """Whether a mask computed in `node` would be remembered (one as large as the largest so far would)."""
        return node.shared and self.mask_bytes + self.largest <= self.MAX_MASK_BYTES

    def remember(self, node: _Node, bits: np.ndarray, ids: np.ndarray) -> None:
        if node.ids is not None:  # another generation computed it meanwhile
            return
        if node.shared:
            size = bits.nbytes + ids.nbytes
            self.largest = max(self.largest, size)
            if self.mask_bytes + size > self.MAX_MASK_BYTES:
                return
            self.mask_bytes += size
        node.bits, node.ids = bits, ids


@_kept(32)  # with its remembered states: at most ~2 MB, and llguidance's tables (~10 MB at KEPT_CHARS)
def _grammar(vocab: _Vocabulary, parts: tuple[str, ...] | None, grammar: str) -> _Grammar:
    return _Grammar(vocab, parts, grammar)


class AnswerMatcher:
    """One generation's constraint: idle while the model reasons, then chooses every token of the answer under
    its grammar (`choose`, in place of `sample`, with the generation loop).

    Speculate, then check: the token the model would pick anyway is checked (~1-2 us with llguidance); only
    when it is refused is the vocabulary's mask computed (5-55 us, plus numpy) and the token drawn again among
    the allowed tokens. `speculate=False` masks every step (the reference). The check asks what the mask would
    allow: where the grammar forces bytes (a key's remaining letters), llguidance's mask allows only the first
    token of their canonical tokenization, though any valid split would parse and try takes it ("o" then "unt"
    for "ount"), so there the check reads the mask (computed, and remembered, as a refusal would). Both give
    the masked distribution exactly, token for token under greedy decoding:

    - greedy: the argmax of the logits, if allowed, is the argmax of the masked logits.
    - temperature alone: a draw that is refused is redrawn from the masked distribution q (the first draw's
      weights, the allowed ones renormalized). An allowed token s comes out with probability p(s) + (1 - A)
      q(s), A the allowed mass and q(s) = p(s) / A: that is p(s) / A = q(s) (rejection sampling, with one exact
      fallback draw).
    - top-k and top-p change the kept set once tokens are masked, so a first draw from the unmasked nucleus is
      not a draw from the masked one. The shortcut is taken only where both are certain to give the same
      single token t, the argmax: with top-k 1 and no tie for the top; or with top-p when t's probability under
      temperature alone is at least top_p (plus 1e-4 for float32 rounding). Masking and top-k only remove
      other tokens, so t's share of what is kept can only grow; a share of at least top_p removes every other
      token from the nucleus (HF removes the second token when 1 - p(t) <= 1 - top_p). Else: masked.

    Remembered: the masks of states an earlier answer of the same grammar reached (`_Grammar`) are used as
    computed, and a sampled step draws among them at once (no speculative draw from the whole vocabulary);
    llguidance's matcher is copied and fed the answer's tokens only when a state without a remembered mask is
    reached, so an answer along a remembered path never asks it. `remember=False`: this answer's states are
    its own (the tests' reference).
    """

    def __init__(self, constraint: Constraint, tokenizer, eos_ids: set[int], *, start: str, prefix: bool = True,
                 speculate: bool = True, remember: bool = True):
        """`start`: "now" (the stage writes only the answer), "think_end" (after `</think>`) or "marker" (when
        the text reaches "Answer:", or only ANSWER_RESERVE tokens are left). `prefix`: the answer begins with
        "Answer: " (reasoner stages; direct mode answers bare). `speculate`: False masks every step."""
        self.constraint, self.tokenizer, self.start, self.speculate = constraint, tokenizer, start, speculate
        self.remember = remember
        self.eos_ids = frozenset(eos_ids)
        self.vocab = _vocabulary(tokenizer, self.eos_ids)
        self.node: _Node | None = None  # the answer's state, once it started
        self.matcher = None  # llguidance's, copied from the grammar's template when first asked
        self._pending: list[int] = []  # the answer's tokens not yet given to `matcher`
        self.text = ""  # the plain-text reasoning so far ("marker" start), to find the marker
        self.masked = 0  # steps that drew among the allowed tokens (the rest took the speculated token)
        self.computed = 0  # masks llguidance computed (the rest of the masked steps were remembered)
        self.error: str | None = None  # why llguidance stopped following the answer (its limits), if it did
        if start == "now":
            self._activate(MARKER + " " if prefix else None)

    @property
    def active(self) -> bool:
        return self.node is not None

    @property
    def satisfied(self) -> bool:
        """The answer so far is a complete one."""
        matcher = None if self.node is None else self._synced()
        return matcher is not None and (matcher.is_accepting() or matcher.is_stopped())

    def _activate(self, prefix: str | None) -> None:
        self.grammar = _grammar(self.vocab, self.constraint.parts(prefix), _compile(self.constraint.grammar(prefix)))
        self.node = self.grammar.root if self.remember else _Node(shared=False)
        self._bitmask = np.zeros((self.vocab.size + 31) // 32, np.int32)  # a bit per token: 1 = allowed
        self._bits = self._bitmask.view(np.uint8)
        self._pointer = (self._bitmask.ctypes.data, self._bitmask.nbytes)

    def _synced(self):
        """llguidance's matcher, at the answer's state; None once it stopped following the answer."""
        if self.matcher is None:
            self.matcher = self.grammar.template.deep_copy()
        if self._pending:
            tokens, self._pending = self._pending, []
            # At once (half the cost of one by one), but an end of sequence alone: consume_tokens refuses one
            # after a stopped answer, which consume_token takes.
            if self.eos_ids.isdisjoint(tokens):
                self.matcher.consume_tokens(tokens)
            else:
                all(self.matcher.consume_token(token) for token in tokens)
        return None if self._failed() else self.matcher

    def _failed(self) -> bool:
        """Whether llguidance's matcher is in its error state, which it never leaves: a grammar past its limits
        (a row of over 2,000 parse items: an object of thousands of optional keys), found only as the answer
        reaches it; then the answer goes no further (stop reason "constraint") and `error` says why. Else (a
        remembered token it refuses) a bug, ended the same way rather than raised in the middle of a robot's
        call."""
        if self.error is None and self.matcher is not None and self.matcher.is_error():
            self.error = _first_line(self.matcher.get_error())
        return self.error is not None

    def think_ended(self) -> None:
        if self.start == "think_end" and self.node is None:
            self._activate(MARKER + " ")

    def choose(self, logits: np.ndarray, decoding: Decoding, rng: np.random.Generator, remaining: int) -> int | None:
        """The next token, sampled as `sample` would from `logits` (which this does not modify) with every token
        the answer cannot continue with removed, and advanced past; None when the answer can go no further
        (every token refused). `remaining`: the tokens left, this one included ("marker" start)."""
        if self.node is None and self.start == "marker" and remaining <= ANSWER_RESERVE:
            self._activate("\n" + MARKER + " ")
        if self.node is None:
            token = sample(logits, decoding, rng)
            self._read(token)
            return token
        weights = None
        if self.speculate and (self.node.ids is None or decoding.temperature <= 0):
            token, weights = _speculated(logits, decoding, rng)
            if token is not None and self._accept(token):
                return token
        self.masked += 1
        allowed = self.allowed(len(logits))
        if not allowed.size:  # the constraint can go no further (llguidance refused a token)
            return None
        if allowed.size == 1:  # forced (a key's letters, the rest of a choice): whatever the logits, no draw
            token = int(allowed[0])
        elif weights is not None and (kept := weights[allowed]).max() >= 1e-20:
            # A refused draw at temperature alone: redrawn from its own weights, the allowed ones (unless they all
            # sit so far below the refused best that float32 lost the smaller ones).
            token = int(allowed[draw(None, kept, rng)])
        else:
            # Drawn among the allowed tokens alone: the distribution of the logits with the rest at -inf (which
            # add nothing to the softmax, top-k or top-p; greedy: the same token), without sorting (np.partition
            # for top-k, ~6 ms at 49k) a vocabulary that is mostly -inf.
            token = int(allowed[sample(logits.take(allowed), decoding, rng)])
        self._advance(token)
        return token

    def _advance(self, token: int) -> None:
        """Past an allowed `token`, which llguidance's matcher is given when next asked."""
        self.node = self.grammar.child(self.node, token)
        self._pending.append(token)

    def _accept(self, token: int) -> bool:
        """Advance past `token` if the answer allows it: what the mask would say, computed only where the grammar
        forces bytes or in a regex's state visited before."""
        node = self.node
        known = self._known(node, token)
        if known is not None:
            if known:
                self._advance(token)
            return known
        matcher = self._synced()
        if matcher is None:
            return False
        # The check reads the mask (~20 us) where the grammar forces bytes (~2 us to ask), and in a state the
        # answer's text decides that an answer reached before, if its mask can be remembered (it then serves
        # every later answer there).
        if (node.checked and node.key is not None and self.grammar.has_room(node)) or matcher.compute_ff_bytes():
            if not self.allowed(self.vocab.size).size:
                return False  # llguidance stopped
            # computed into self._bits, unless another generation remembered the state's mask meanwhile
            ok = self._allows(self._bits if node.bits is None else node.bits, token)
            if ok:
                self._advance(token)
            return ok
        node.checked = True
        if token in self.eos_ids:  # allowed once the answer is complete; a stopped matcher refuses to try it
            ok = bool(matcher.is_accepting() and matcher.consume_token(token))
        else:
            ok = token < self.vocab.size and matcher.try_consume_tokens([token]) == 1
        if ok:
            self.node = self.grammar.child(node, token)  # consumed: nothing pending
        self._failed()  # a refused try leaves the matcher as it was, unless a limit stopped it
        return ok

    def _known(self, node: _Node, token: int) -> bool | None:
        """Whether `token` is allowed in `node`, where remembered (a token taken there before, or its mask)."""
        if token in node.children:
            return True
        if node.bits is None:
            return None
        return self._allows(node.bits, token)

    def _allows(self, bits: np.ndarray, token: int) -> bool:
        """Whether a mask (llguidance's bits, as bytes) allows `token`."""
        return token < self.vocab.size and bool(bits[token >> 3] >> (token & 7) & 1)

    def allowed(self, size: int) -> np.ndarray:
        """The ids below `size` (the logits' length) of the tokens the answer can continue with: the mask,
        remembered or computed, without advancing."""
        node = self.node
        ids = node.ids
        if ids is None:
            matcher = self._synced()
            if matcher is None:
                return np.empty(0, np.int32)
            matcher.unsafe_compute_mask_ptr(*self._pointer)  # writes the bitmask, checking its size
            self.computed += 1
            if self._failed():  # its mask then allows only EOS, which would end an unfinished answer
                return np.empty(0, np.int32)
            bits = np.unpackbits(self._bits, count=self.vocab.size, bitorder="little")
            ids = np.flatnonzero(bits.view(bool)).astype(np.int32)  # as bool: 8x faster than over uint8
            self.grammar.remember(node, self._bits.copy(), ids)
        return ids if size >= self.vocab.size else ids[:np.searchsorted(ids, size)]

    def _read(self, token: int) -> None:
        """A token of the plain-text reasoning ("marker" start): the answer starts after "Answer:"."""
        if self.start == "marker":
            self.text += self.tokenizer.decode([token], skip_special_tokens=False)
            if self.text.rstrip(" ").endswith(MARKER):
                self._activate(None)
            self.text = self.text[-len(MARKER) - 8:]


def _speculated(logits: np.ndarray, decoding: Decoding,
                rng: np.random.Generator) -> tuple[int | None, np.ndarray | None]:
    """The token to try before masking (see AnswerMatcher): the one the masked draw is certain to agree with
    if it is allowed (greedy, or a single-token nucleus), a draw to accept or redraw (temperature alone: with
    the whole vocabulary's weights it was drawn from, for the redraw), or None (mask first)."""
    if decoding.temperature <= 0:
        return int(np.argmax(logits)), None
    top_k = decoding.top_k if 0 < decoding.top_k < logits.size else 0
    if top_k == 0 and decoding.top_p >= 1.0:
        ids, weights = distribution(logits, decoding)
        return draw(ids, weights, rng), (weights if ids is None else None)
    token = int(np.argmax(logits))
    best = float(logits[token])
    if not np.isfinite(best):
        return None, None
    if top_k == 1:
        return (token if np.count_nonzero(logits == best) == 1 else None), None
    if decoding.top_p < 1.0:
        share = 1.0 / np.exp((np.asarray(logits, np.float32) - best) / np.float32(decoding.temperature)).sum()
        return (token if share >= decoding.top_p + 1e-4 else None), None
    return None, None
