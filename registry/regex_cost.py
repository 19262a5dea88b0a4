"""A static upper bound on the backtracking work of Python's ``re`` on a pattern (see
:mod:`.patterns` for why and how it is used): ``c * (n + 1) ** d`` for a name of ``n``
characters, from re's own parse of the pattern; :class:`Unbounded` where there is none."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

try:  # Python 3.11+
    from re import _constants as _sre
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre
    import sre_parse as _sre_parse

REF_LENGTH, REF_STEPS = 32, 1e12  # refused whatever the names: over this on a short name
_SMALL_COUNT = 64  # a repeat count above this is bounded by the name's length instead


class Unbounded(Exception):
    """A pattern whose backtracking work has no polynomial bound; the message says why."""


_OP = {name: getattr(_sre, name, object()) for name in (
    "LITERAL", "NOT_LITERAL", "ANY", "IN", "AT", "BRANCH", "SUBPATTERN", "MAX_REPEAT",
    "MIN_REPEAT", "POSSESSIVE_REPEAT", "ATOMIC_GROUP", "ASSERT", "ASSERT_NOT", "GROUPREF",
    "GROUPREF_EXISTS", "RANGE", "NEGATE", "CATEGORY", "AT_END", "AT_END_STRING",
)}  # fmt: skip
_CHAR_OPS = (_OP["LITERAL"], _OP["NOT_LITERAL"], _OP["ANY"], _OP["IN"])
_REPEATS = (_OP["MAX_REPEAT"], _OP["MIN_REPEAT"])
_IGNORECASE = re.IGNORECASE.value
_ALL_ASCII = frozenset(range(128))


@dataclass(frozen=True)
class _Chars:
    """What characters a part may start with: the ASCII ones exactly (``ascii``), any past
    ASCII (``wide``, not told apart: two wide sets are taken to overlap), the end of the
    text (``end``)."""

    ascii: frozenset = frozenset()
    wide: bool = False
    end: bool = False

    def __or__(self, other: _Chars) -> _Chars:
        return _Chars(self.ascii | other.ascii, self.wide or other.wide, self.end or other.end)

    def meets(self, other: _Chars) -> bool:
        return bool(
            self.ascii & other.ascii or (self.wide and other.wide) or (self.end and other.end)
        )


_NONE = _Chars()
_ANYTHING = _Chars(_ALL_ASCII, True, True)
_END = _Chars(end=True)


def _category(name: str) -> tuple[frozenset, frozenset]:
    """(ASCII characters a category may hold in any mode, those it holds in every mode)."""
    chars = [chr(c) for c in range(128)]
    if "DIGIT" in name:
        may = must = {c for c in chars if c.isdigit()}
    elif "SPACE" in name:
        may, must = {c for c in chars if c.isspace()}, set(" \t\n\r\f\v")
    elif "WORD" in name:
        may = must = {c for c in chars if c.isalnum() or c == "_"}
    elif "LINEBREAK" in name:
        may, must = set("\n\r\x0b\x0c\x1c\x1d\x1e"), {"\n"}
    else:  # unknown: anything may be in it, nothing surely is
        may, must = set(chars), set()
    may, must = frozenset(map(ord, may)), frozenset(map(ord, must))
    if "NOT" in name:
        return _ALL_ASCII - must, _ALL_ASCII - may
    return may, must


def _char_set(op, av, flags: int) -> _Chars:
    """The characters one character item (a literal, ``.``, a class) may match."""
    if op is _OP["ANY"]:
        return _Chars(_ALL_ASCII, True)
    items = [(_OP["LITERAL"], av)] if op in (_OP["LITERAL"], _OP["NOT_LITERAL"]) else av
    negate = op is _OP["NOT_LITERAL"]
    may, must, wide = set(), set(), False
    fold = bool(flags & _IGNORECASE)
    for iop, iav in items:
        if iop is _OP["NEGATE"]:
            negate = True
        elif iop is _OP["LITERAL"] or iop is _OP["RANGE"]:
            lo, hi = (iav, iav) if iop is _OP["LITERAL"] else iav
            span = set(range(lo, min(hi, 127) + 1))
            may |= span
            must |= span
            wide = wide or hi >= 128
        elif iop is _OP["CATEGORY"]:
            m, s = _category(str(iav))
            may |= m
            must |= s
            wide = True
        else:  # what the parser does not put in a class: assume the worst
            may |= _ALL_ASCII
            wide = True
    if fold:  # (?i): the other case too; past ASCII, case folding reaches further (K, ſ)
        may |= {ord(chr(c).swapcase()) for c in may if chr(c).isalpha()}
        wide = wide or any(chr(c).isalpha() for c in may)
    if negate:
        return _Chars(frozenset(_ALL_ASCII - must), True)
    return _Chars(frozenset(may), wide)


# Polynomials in N = n + 1 (n: a name's length) as (log of the coefficient, degree): upper
# bounds on a count of steps; the degree is infinite for what has no polynomial bound.
_ONE = (0.0, 0.0)
_N = (0.0, 1.0)
_INF = (0.0, math.inf)


def _add(a, b):
    hi, lo = (a, b) if a[0] >= b[0] else (b, a)
    return (hi[0] + math.log1p(math.exp(lo[0] - hi[0])), max(a[1], b[1]))


def _mul(a, b):
    return (a[0] + b[0], a[1] + b[1])


def _times(k: float, a):
    return (a[0] + math.log(max(k, 1)), a[1])


def _power(a, k: int):
    return (a[0] * k, a[1] * k) if k else _ONE


def _is_one(a) -> bool:
    return a[0] <= 1e-12 and a[1] == 0


def _count(k: int):
    """A number of choices up to ``k``: a constant when small, else at most N."""
    return _N if k > _SMALL_COUNT else (math.log(max(k, 1)), 0.0)


@dataclass(frozen=True)
class _Follow:
    """What may come right after a part: its first characters, and whether trying it where
    that character is not among them fails at once (no lookaround to run first)."""

    chars: _Chars
    cheap: bool = True


@dataclass(frozen=True)
class _Info:
    first: _Chars  # what it may start with
    nullable: bool  # whether it may match the empty string
    ways: tuple  # how many times it may hand on to what follows, from one start
    work: tuple  # its own steps from one start, not counting what follows


def _first(items, flags: int) -> tuple[_Chars, bool, bool]:
    """(first characters of a sequence, whether it may match empty, whether the zero-width
    items before its first character are all cheap anchors)."""
    chars, cheap = _NONE, True
    for op, av in items:
        f, nullable, c = _first_item(op, av, flags)
        chars, cheap = chars | f, cheap and c
        if not nullable:
            return chars, False, cheap
    return chars, True, cheap


def _first_item(op, av, flags: int) -> tuple[_Chars, bool, bool]:
    if op in _CHAR_OPS:
        return _char_set(op, av, flags), False, True
    if op is _OP["AT"]:
        if av is _OP["AT_END"]:  # $: the end, or a last newline
            return _Chars(frozenset({10}), False, True), False, True
        if av is _OP["AT_END_STRING"]:
            return _END, False, True
        return _NONE, True, True
    if op in (_OP["ASSERT"], _OP["ASSERT_NOT"]):
        return _NONE, True, False
    if op is _OP["SUBPATTERN"]:
        return _first(av[-1], _flags(flags, av))
    if op is _OP["ATOMIC_GROUP"]:
        return _first(av, flags)
    if op in (*_REPEATS, _OP["POSSESSIVE_REPEAT"]):
        lo, hi, body = av
        if hi == 0:
            return _NONE, True, True
        f, nullable, cheap = _first(body, flags)
        return f, nullable or lo == 0, cheap
    if op is _OP["BRANCH"]:
        chars, nullable, cheap = _NONE, False, True
        for alt in av[1]:
            f, n, c = _first(alt, flags)
            chars, nullable, cheap = chars | f, nullable or n, cheap and c
        return chars, nullable, cheap
    return _ANYTHING, True, False


def _flags(flags: int, av) -> int:
    """The flags inside a group ``(?i:…)``."""
    if len(av) == 4:
        _, add, remove, _ = av
        return (flags | (add or 0)) & ~(remove or 0)
    return flags


def _seq(items, follow: _Follow, flags: int, depth: int) -> _Info:
    """A sequence: its ways multiply; each part's work counts once per way to reach it."""
    if depth > 200:
        raise Unbounded("it is nested too deeply")
    items = list(items)
    follows = [follow] * len(items)
    after = follow
    for i in range(len(items) - 1, -1, -1):
        follows[i] = after
        f, nullable, cheap = _first_item(*items[i], flags)
        after = _Follow(f | after.chars, cheap and after.cheap) if nullable else _Follow(f, cheap)
    ways, work = _ONE, _ONE
    for (op, av), fol in zip(items, follows, strict=True):
        info = _item(op, av, fol, flags, depth + 1)
        work = _add(work, _mul(ways, info.work))
        ways = _mul(ways, info.ways)
    first, nullable, _ = _first(items, flags)
    return _Info(first, nullable, ways, work)


def _item(op, av, follow: _Follow, flags: int, depth: int) -> _Info:
    if op in _CHAR_OPS:
        return _Info(_char_set(op, av, flags), False, _ONE, _ONE)
    if op is _OP["AT"]:
        f, nullable, _ = _first_item(op, av, flags)
        return _Info(f, nullable, _ONE, _ONE)
    if op in (_OP["ASSERT"], _OP["ASSERT_NOT"]):  # atomic in re: its own search, once
        body = _seq(av[1], _Follow(_ANYTHING), flags, depth)
        return _Info(_NONE, True, _ONE, _add(body.work, body.ways))
    if op is _OP["SUBPATTERN"]:
        return _seq(av[-1], follow, _flags(flags, av), depth)
    if op is _OP["ATOMIC_GROUP"]:
        body = _seq(av, _Follow(_ANYTHING), flags, depth)
        return _Info(body.first, body.nullable, _ONE, _add(body.work, body.ways))
    if op is _OP["POSSESSIVE_REPEAT"]:
        lo, hi, body = av
        inner = _repeat(lo, hi, body, _Follow(_ANYTHING), flags, depth, atomic=True)
        return _Info(inner.first, inner.nullable, _ONE, _add(inner.work, inner.ways))
    if op in _REPEATS:
        return _repeat(*av, follow, flags, depth)
    if op is _OP["BRANCH"]:
        return _branch(av[1], follow, flags, depth)
    if op in (_OP["GROUPREF"], _OP["GROUPREF_EXISTS"]):
        raise Unbounded("a backreference: matching those can take exponential time")
    raise Unbounded(f"it uses {op}, which adaptr does not bound")


def _repeat(lo, hi, body, follow: _Follow, flags: int, depth: int, atomic=False) -> _Info:
    unbounded = hi >= _sre.MAXREPEAT
    if hi == 0:
        return _Info(_NONE, True, _ONE, _ONE)
    first, body_nullable, body_cheap = _first(body, flags)
    nullable = lo == 0 or body_nullable
    iterations = _N if unbounded or hi > _SMALL_COUNT else _count(hi)
    choices = _N if unbounded else _count(hi - lo + 1)
    if len(body) == 1 and body[0][0] in _CHAR_OPS:  # x*, [a-z]+, .*? : one character a step
        # where what follows cannot start with one of its characters, it can end at one place
        forced = follow.cheap and not first.meets(follow.chars)
        return _Info(first, nullable, _ONE if forced else choices, iterations)
    b = _seq(body, _Follow(first | follow.chars, body_cheap and follow.cheap), flags, depth)
    if atomic:  # each iteration is the first match of the body: no backtracking into it
        return _Info(first, nullable, _ONE, _mul(iterations, _add(b.work, b.ways)))
    if _is_one(b.ways):  # one way per iteration: the choice is only where to stop
        forced = follow.cheap and not body_nullable and not first.meets(follow.chars)
        return _Info(first, nullable, _ONE if forced else choices, _mul(iterations, b.work))
    if unbounded:
        raise Unbounded(
            "a repeat over a part that can match the same text in more than one way, "
            "as in (x+)+ or (a|a)*"
        )
    # up to hi iterations, each of b.ways ways: sum of b.ways ** k for k from lo to hi
    ways = _times(hi - lo + 1, _power(b.ways, hi))
    work = _times(hi, _mul(_power(b.ways, hi - 1), b.work))
    return _Info(first, nullable, ways, work)


def _prefix(items, flags: int, limit: int = 16) -> list[_Chars]:
    """The character sets of a sequence's first characters, as far as each is one character
    of the text (literals, classes, fixed counts of them), at most ``limit``."""
    out: list[_Chars] = []
    for op, av in items:
        if len(out) >= limit:
            break
        if op in _CHAR_OPS:
            out.append(_char_set(op, av, flags))
        elif op is _OP["SUBPATTERN"]:
            inner = _prefix(av[-1], _flags(flags, av), limit - len(out))
            out += inner
            if not _simple(av[-1]):
                break
        elif op in _REPEATS and av[0] == av[1] and len(av[2]) == 1 and av[2][0][0] in _CHAR_OPS:
            out += [_char_set(*av[2][0], flags)] * min(av[0], limit - len(out))
        elif op is _OP["AT"] and av not in (_OP["AT_END"], _OP["AT_END_STRING"]):
            continue  # zero-width: the next character is the next item's
        else:
            break
    return out


def _simple(items) -> bool:
    return all(
        op in _CHAR_OPS
        or op is _OP["SUBPATTERN"]
        and _simple(av[-1])
        or op in _REPEATS
        and av[0] == av[1]
        and len(av[2]) == 1
        and av[2][0][0] in _CHAR_OPS
        for op, av in items
    )


def _branch(alts, follow: _Follow, flags: int, depth: int) -> _Info:
    """Alternatives that differ at some character cannot both match from one place: the
    ways of one are added only to those of the alternatives it may overlap."""
    infos = [_seq(alt, follow, flags, depth) for alt in alts]
    prefixes = [_prefix(alt, flags) for alt in alts]

    def apart(i: int, j: int) -> bool:
        return any(not a.meets(b) for a, b in zip(prefixes[i], prefixes[j], strict=False))

    ways = _ONE
    for i, info in enumerate(infos):
        total = info.ways
        for j, other in enumerate(infos):
            if j != i and not apart(i, j):
                total = _add(total, other.ways)
        ways = (max(ways[0], total[0]), max(ways[1], total[1]))  # bounds both
    work = _ONE
    for info in infos:
        work = _add(work, info.work)
    first = _NONE
    for info in infos:
        first = first | info.first
    return _Info(first, any(i.nullable for i in infos), ways, work)


@lru_cache(maxsize=4096)
def cost(regex: str, mode: str = "fullmatch") -> tuple[float, float]:
    """An upper bound on re's backtracking steps for one name of ``n`` characters, as
    ``(log c, d)`` for ``c * (n + 1) ** d``; raises :class:`Unbounded` for a pattern with no
    polynomial bound, ``re.error`` for one that does not compile."""
    try:
        parsed = _sre_parse.parse(regex)
        flags = parsed.state.flags
        follow = _Follow(_END if mode == "fullmatch" else _ANYTHING)
        top = _seq(parsed, follow, flags, 0)
    except RecursionError:
        raise Unbounded("it is nested too deeply") from None
    if mode == "fullmatch":  # each way to reach the end is checked against the text's end
        return _add(top.work, top.ways)
    # match / search: the first way to reach the end is the match; search tries every start
    return _mul(top.work, _N) if mode == "search" else top.work


def steps(bound: tuple[float, float], n: int) -> float:
    """The bound for a name of ``n`` characters."""
    log = bound[0] + bound[1] * math.log(n + 1) if bound[1] else bound[0]
    return math.exp(log) if log < 700 else math.inf


@lru_cache(maxsize=4096)
def screen(regex: str, mode: str) -> None:
    """Raise Unbounded for a pattern re cannot match in polynomial time, or whose bound for
    a name of REF_LENGTH characters passes REF_STEPS (nested counted repeats such as
    ``((a|ab){0,3}){1,4}``: bounded on paper, hours on a short name); cached."""
    if steps(cost(regex, mode), REF_LENGTH) > REF_STEPS:
        raise Unbounded(
            f"its backtracking can take over {REF_STEPS:.0e} steps on a {REF_LENGTH}-character name"
        )
