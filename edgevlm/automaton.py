"""A regular expression's states over text: what is left to match after a piece of an answer, so that answers
reaching the same state by different text share what was computed there (the masks a regex or choice
constraint remembers, edgevlm.constraints._Grammar).

The pattern is read by Python's own parser (re._parser), and only the syntax on which it and llguidance (Rust's
regex crate) agree is taken: literals, `.`, classes of literals and ranges, groups, alternation and repeats,
and escapes of punctuation, \\n and \\t. Anything else (\\d \\w \\s, anchors, flags, look-around,
back-references, class set operations, `{,n}`, other escapes) gives None, and the answer's states are then
keyed by its tokens. A state is the set of positions of the pattern's automaton (Thompson's construction) the
text so far can be at, with the bytes of a character not yet whole (a token may end inside one); built lazily,
a character at a time, and bounded: past MAX_MOVES moves or MAX_HELD positions in its states a new state is
None too.
"""

from __future__ import annotations

import bisect
import codecs
import re

try:  # Python's own regex parser (private, in 3.11-3.13): without it, no automaton
    from re import _constants as sre
    from re import _parser
except ImportError:
    _parser = None

MAX_POSITIONS = 1024  # the automaton's size at most (a bounded repeat is that many copies of its body)
MAX_HELD = 65_536  # positions in its states together at most (~3 MB)
MAX_MOVES = 16_384  # (state, class) moves worked out at most (~1.5 MB kept); past it a new one is None
_ESCAPED = frozenset("\\.+*?()|[]{}^$#&-~nt")  # what may follow a backslash
_NOT_TAKEN = ("[[", "&&", "--", "~~", "{,")  # read otherwise by Rust's regex (nested classes, set operations)

State = tuple[frozenset, bytes]  # the positions, and the bytes of an unfinished UTF-8 character


class _Unsupported(Exception):
    pass


def automaton(parts: list[str]) -> Automaton | None:
    """The automaton of `parts`' patterns one after another, or None where one is outside the syntax taken."""
    if _parser is None or sum(map(len, parts)) > MAX_POSITIONS:
        return None
    try:
        return Automaton([_parsed(part) for part in parts])
    except (_Unsupported, re.error, RecursionError, OverflowError, ValueError):
        return None


def _parsed(pattern: str):
    if any(text in pattern for text in _NOT_TAKEN):
        raise _Unsupported
    escaped = False
    for char in pattern:
        if escaped and char not in _ESCAPED:
            raise _Unsupported
        escaped = not escaped and char == "\\"
    parsed = _parser.parse(pattern)
    if parsed.state.flags & ~sre.SRE_FLAG_UNICODE:
        raise _Unsupported
    return parsed


class Automaton:
    """States (`start`, `after`) of parsed patterns one after another. Safe across threads without a lock:
    what it remembers is added once (dict.setdefault), and a race can only overshoot a bound a little."""

    def __init__(self, patterns):
        self.eps: list[list[int]] = []  # per position: the positions reached without reading
        self.read: list[tuple | None] = []  # per position: (ranges, negated, next position), or None
        start = position = self._position()
        for pattern in patterns:
            first, last = self._sequence(pattern)
            self.eps[position].append(first)
            position = last
        self.final = position
        # Characters every position reads alike are one class (the letters of [a-z] not in a literal): a move is
        # worked out once per class. A class is the index of the first boundary above the character.
        self._bounds = sorted({edge for step in self.read if step for lo, hi in step[0] for edge in (lo, hi + 1)})
        self._states: dict[frozenset, frozenset] = {}  # each state once
        self._held = 0
        self._moves: dict[tuple[frozenset, int], frozenset | None] = {}  # by (state, the character's class)
        self.start: State = (self._state(self._closure([start])), b"")

    def after(self, state: State, data: bytes) -> State | None:
        """The state after `data` (UTF-8, possibly ending inside a character), or None where no text that
        begins so matches."""
        positions, pending = state
        if not pending and data.isascii():  # a character per byte
            chars, rest = data, b""
        else:
            decoder = codecs.getincrementaldecoder("utf-8")()
            try:
                chars = map(ord, decoder.decode(pending + data))
            except UnicodeDecodeError:
                return None
            rest = decoder.getstate()[0]
        for char in chars:
            positions = self._move(positions, char)
            if positions is None:
                return None
        return positions, rest

    def accepts(self, state: State) -> bool:
        return not state[1] and self.final in state[0]

    def _move(self, positions: frozenset, char: int) -> frozenset | None:
        key = (positions, bisect.bisect_right(self._bounds, char))
        if key in self._moves:
            return self._moves[key]
        if len(self._moves) >= MAX_MOVES:  # its work is bounded: past this, no new state
            return None
        reached = [step[2] for p in positions if (step := self.read[p]) is not None
                   and any(lo <= char <= hi for lo, hi in step[0]) != step[1]]
        return self._moves.setdefault(key, self._state(self._closure(reached)) if reached else None)

    def _state(self, positions: frozenset) -> frozenset | None:
        """The one instance of a state, or None past MAX_HELD (a race between threads can overshoot it)."""
        known = self._states.get(positions)
        if known is None:
            if self._held + len(positions) > MAX_HELD:
                return None
            self._held += len(positions)
            known = self._states.setdefault(positions, positions)
        return known

    def _closure(self, positions) -> frozenset:
        seen, stack = set(positions), list(positions)
        while stack:
            for p in self.eps[stack.pop()]:
                if p not in seen:
                    seen.add(p)
                    stack.append(p)
        return frozenset(seen)

    # ---------------------------------------------------------------- Thompson's construction
    def _position(self) -> int:
        if len(self.eps) >= MAX_POSITIONS:
            raise _Unsupported
        self.eps.append([])
        self.read.append(None)
        return len(self.eps) - 1

    def _sequence(self, items) -> tuple[int, int]:
        first = last = self._position()
        for op, arg in items:
            start, end = self._item(op, arg)
            self.eps[last].append(start)
            last = end
        return first, last

    def _chars(self, ranges, negated: bool) -> tuple[int, int]:
        start, end = self._position(), self._position()
        self.read[start] = (tuple(ranges), negated, end)
        return start, end

    def _item(self, op, arg) -> tuple[int, int]:
        if op is sre.LITERAL:
            return self._chars([(arg, arg)], False)
        if op is sre.NOT_LITERAL:
            return self._chars([(arg, arg)], True)
        if op is sre.ANY:
            return self._chars([(10, 10)], True)  # not DOTALL: anything but "\n", as in Rust
        if op is sre.IN:
            negated, ranges = False, []
            for kind, value in arg:
                if kind is sre.NEGATE:
                    negated = True
                elif kind is sre.LITERAL:
                    ranges.append((value, value))
                elif kind is sre.RANGE:
                    ranges.append(value)
                else:
                    raise _Unsupported
            return self._chars(ranges, negated)
        if op is sre.BRANCH:
            start, end = self._position(), self._position()
            for alternative in arg[1]:
                first, last = self._sequence(alternative)
                self.eps[start].append(first)
                self.eps[last].append(end)
            return start, end
        if op is sre.SUBPATTERN:
            _, add_flags, del_flags, body = arg
            if add_flags or del_flags:
                raise _Unsupported
            return self._sequence(body)
        if op in (sre.MAX_REPEAT, sre.MIN_REPEAT):  # lazy or greedy: the same text matches
            least, most, body = arg
            start = last = self._position()
            for _ in range(least):
                first, end = self._sequence(body)
                self.eps[last].append(first)
                last = end
            if most == sre.MAXREPEAT:
                first, end = self._sequence(body)
                self.eps[last].append(first)
                self.eps[end].append(last)
                return start, last
            done = self._position()
            for _ in range(most - least):
                first, end = self._sequence(body)
                self.eps[last] += [first, done]
                last = end
            self.eps[last].append(done)
            return start, done
        raise _Unsupported
