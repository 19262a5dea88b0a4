"""Module-name patterns in adapter configs: refused unless matching them has a bound.

PEFT reads these config fields as regular expressions and matches them with Python's ``re``
(PEFT 0.17-0.21, ``check_target_module_exists``, ``get_pattern_key``,
``match_target_against_key``): ``target_modules`` and ``exclude_modules`` given as a string
(``re.fullmatch`` against every module name of the base), IA3's ``feedforward_modules`` as a
string (likewise), each ``modules_to_save`` entry (unescaped in ``(^|.*\\.)M($|\\..*)``),
each ``layers_pattern`` (in ``(?:^|.*?\\.)P\\.(?P<idx>\\d+)\\.``), and the keys of
``rank_pattern``, ``alpha_pattern`` and the other ``*_pattern`` mappings (in
``(.*\\.)?(K)$``; ``.*\\.K$`` for FourierFT / C3A; ``re.search`` for OSF). Entries of a
``target_modules`` list go unescaped into the ``modules_to_save`` form when PEFT ties
embeddings. (``trainable_token_indices``, ``target_parameters`` and list-valued
``exclude_modules`` are matched as name suffixes, not patterns.) adaptr matches the same
patterns the same way when it checks an adapter (:mod:`.adapter_dir`) and scales its layers
for serving.

``re`` backtracks and has no timeout: ``([a-z_.0-9]+)+q_proj`` takes exponential time in a
module name's length, and one such match holds the GIL: ``adaptr add`` hangs, ``generate``
hangs inside PEFT, and the server's batch worker stops for every client. So every pattern
is checked, before anything matches it, in two steps:

1. A static bound, on re's own parse of the very string PEFT compiles (:func:`cost`): an
   upper bound on the backtracking work as ``c * (n + 1) ** d`` for a name of ``n``
   characters, from how many ways each part of the pattern can match the same text (two
   repeats can share a split point only where their characters overlap; alternatives that
   differ early cannot both match). A repeat without an upper count over a part that can
   match in more than one way (``(x+)+``, ``(x*)*``, ``(a|a)*``, ``(\\w+\\.?)*``), or a
   backreference, has no polynomial bound; nor, in practice, one whose bound passes
   REF_STEPS on a REF_LENGTH-character name (``(.*a){12}``, nested counted repeats): both
   refused whatever the names, so no base with longer or odder names can make them hang
   later. The bound errs only upwards (checked by fuzzing it against re's real times).
2. What the bound does not already show to be cheap (STATIC_STEPS per name) on the names
   at hand (several ``.*`` in a row, as Unsloth's generated patterns have: polynomial,
   usually fast, not provably so) is matched by Python's own ``re`` against those names,
   the calls PEFT makes, in a child interpreter under a CPU-time limit (re checks for
   signals while it matches), and refused if it does not finish (:func:`_measure`).

Why not the ``regex`` package's ``timeout=``: it is another engine, and fast exactly where
``re`` is slow: it matched ``(a+)+b``, ``([a-z_.0-9]+)+q_proj`` and ``(a|a)*b`` on 25-40
characters in about a millisecond where ``re`` took seconds (measured here), so its timing
says nothing about PEFT's ``re.fullmatch``. Why not a timer in this process: Python runs
signal handlers on the main thread only, and the server matches on its batch worker.

:func:`check_patterns` is called by ``add``'s inspection with the adapter's own module
names as PEFT sees them (:func:`adapter_names`), and should be with the base's
(:func:`module_names_of`) when the base is known; :func:`check_stored_config` before PEFT sees
a stored config (serving, generate, eval), with the loaded model's real module names, for
versions stored before this check existed. Both cache what they found.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from adaptr.errors import InvalidAdapterError, brief

try:  # Python 3.11+
    from re import _constants as _sre
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre
    import sre_parse as _sre_parse

MAX_PATTERN = 1000  # characters of one pattern
STATIC_STEPS = 1e6  # a bound at most this per name needs no measuring (~10 ms)
CPU_BASE_S = 1.0  # measuring one pattern: this much CPU time, plus CPU_PER_NAME_S per name
CPU_PER_NAME_S = 1e-4  # (PEFT's own match of a module name takes a few microseconds)
REF_LENGTH, REF_STEPS = 32, 1e12  # refused whatever the names: over this on a short name
_SMALL_COUNT = 64  # a repeat count above this is bounded by the name's length instead
PREFIX = "base_model.model."  # PEFT's prefix of a saved adapter's keys (PeftModel's names)
HINT = 'list the module names instead (e.g. ["q_proj", "v_proj"])'
KEY_HINT = 'key it by module names (e.g. "q_proj" or "layers.0.self_attn.q_proj")'

# How PEFT builds the regex it matches from a field's value, and the re function it calls.
FULL = ("{}", "fullmatch")
SAVED = (r"(^|.*\.){}($|\..*)", "match")
LAYERS = (r"(?:^|.*?\.){}\.(?P<idx>\d+)\.", "match")
KEYED = (r"(.*\.)?({})$", "match")
_KEYED_BY_TYPE = {
    "FOURIERFT": (r".*\.{}$", "match"),
    "C3A": (r".*\.{}$", "match"),
    "OSF": ("{}", "search"),
}


@dataclass(frozen=True)
class Pattern:
    """One pattern of a config as PEFT matches it: ``label`` names it in messages,
    ``regex`` is what PEFT compiles, ``mode`` the ``re`` function it calls. ``strict``:
    PEFT matches it against every module name, so one that does not compile is refused
    (PEFT would raise) and one not provably cheap is measured; otherwise (a list entry PEFT
    reads as a pattern only when it ties embeddings, against a few names) only one without
    a polynomial bound is refused."""

    label: str
    pattern: str
    regex: str
    mode: str
    hint: str = HINT
    strict: bool = True


def pattern_fields(config: dict) -> list[Pattern]:
    """Every pattern in ``config`` that PEFT reads as a regular expression."""
    out: list[Pattern] = []

    def put(label, value, how, hint=HINT, strict=True):
        if isinstance(value, str):
            out.append(Pattern(label, value, how[0].format(value), how[1], hint, strict))

    targets = config.get("target_modules")
    if isinstance(targets, str) and targets.lower() != "all-linear":  # PEFT expands that one
        put("target_modules", targets, FULL)
    elif isinstance(targets, list):
        for t in targets:
            put("target_modules entry", t, SAVED, strict=False)
    for key in ("exclude_modules", "feedforward_modules"):
        put(key, config.get(key), FULL)
    saved = config.get("modules_to_save")
    for m in saved if isinstance(saved, list) else ():
        put("modules_to_save entry", m, SAVED)
    layers = config.get("layers_pattern")
    for p in [layers] if isinstance(layers, str) else layers if isinstance(layers, list) else ():
        put("layers_pattern", p, LAYERS)
    keyed = _KEYED_BY_TYPE.get(str(config.get("peft_type")).upper(), KEYED)
    for field, value in config.items():
        if isinstance(field, str) and field.endswith("_pattern") and isinstance(value, dict):
            for key in value:
                put(f"{field} key", key, keyed, KEY_HINT)
    return out


# ---------------------------------------------------------------------- the static bound
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


def guard(label: str, pattern: str, how: tuple[str, str] = FULL) -> str:
    """``pattern`` built into the regex PEFT matches (``how``: a template and a mode), once
    :func:`bounded`: for adaptr's own matching of a config's patterns."""
    p = Pattern(label, pattern, how[0].format(pattern), how[1])
    bounded(p)
    return p.regex


def bounded(p: Pattern, where: str = "") -> None:
    """Refuse ``p`` (InvalidAdapterError) unless it compiles and has a polynomial bound: the
    static half of :func:`check_patterns`, for code that matches patterns of a stored config
    (names unknown, thread-safe, cached)."""
    head = f"{where}: " if where else ""
    if len(p.pattern) > MAX_PATTERN:
        raise InvalidAdapterError(
            f"{head}{p.label} {brief(p.pattern)} is longer than {MAX_PATTERN} characters"
        )
    try:
        re.compile(p.regex)
        screen(p.regex, p.mode)
    except (re.error, RecursionError, OverflowError) as e:
        if not p.strict:
            return
        raise InvalidAdapterError(
            f"{head}{p.label} {brief(p.pattern)} is not a valid regular expression ({e}); "
            f"PEFT matches it with re: fix it or {p.hint}"
        ) from None
    except Unbounded as e:
        raise InvalidAdapterError(
            f"{head}{p.label} {brief(p.pattern)} cannot be matched in bounded time ({e}): "
            f"PEFT's re.{p.mode} would hang on it; {p.hint}"
        ) from None


# ---------------------------------------------------------------------- names PEFT matches
def module_names_of(tensor_names: Iterable[str]) -> set[str]:
    """The module names a model with these parameter (or state dict) names has: every
    ancestor of each, the root ``""`` included, as ``named_modules()`` lists them."""
    out = {""}
    for name in tensor_names:
        parts = name.split(".")
        for i in range(1, len(parts)):
            out.add(".".join(parts[:i]))
    return out


_WRAPPED = (".base_layer", ".lora_A.default", ".lora_B.default", ".lora_dropout.default")


def adapter_names(tensor_names: Iterable[str]) -> set[str]:
    """The module names PEFT may match an adapter's patterns against, from its weights'
    keys alone (no base at hand): each module path and its ancestors, with PEFT's wrappers
    of a LoRA layer (``…q_proj.base_layer``, ``…q_proj.lora_A.default``…) and in PeftModel's
    spelling too (``base_model.model.model.layers.0.self_attn.q_proj``)."""
    keys = [k.removeprefix(PREFIX) for k in tensor_names]
    names = module_names_of(keys)
    for k in keys:
        parts = k.split(".")
        for i, part in enumerate(parts):
            if part in ("lora_A", "lora_B", "lora_embedding_A", "lora_magnitude_vector"):
                names.update(".".join(parts[:i]) + w for w in _WRAPPED)
                break
    return names | {PREFIX + n if n else PREFIX[:-1] for n in names} | {"base_model"}


# ---------------------------------------------------------------------- the check
_cache: dict[tuple, str | None] = {}  # (patterns, names digest) -> refusal or None
_cache_lock = threading.Lock()


def check_patterns(
    config: dict,
    module_names: Iterable[str],
    where: str,
    *,
    stored: str | None = None,
) -> None:
    """Refuse (InvalidAdapterError, one line naming the field) a pattern of ``config`` that
    does not compile or cannot be matched in bounded time against ``module_names`` (the
    names PEFT will match it against). ``stored``: the ref of a stored version, for a
    message that says how to replace it."""
    fields = pattern_fields(config) if isinstance(config, dict) else []
    if not fields:
        return
    hint = f"; re-add {stored} with that fixed" if stored else ""
    for p in fields:
        try:
            bounded(p, where)
        except InvalidAdapterError as e:
            raise InvalidAdapterError(f"{e}{hint}") from None
    if not any(p.strict for p in fields):  # list entries: the static screen is enough
        return
    names = sorted({n for n in module_names if isinstance(n, str)})
    longest = max(map(len, names), default=0)
    slow = [p for p in fields if p.strict and steps(cost(p.regex, p.mode), longest) > STATIC_STEPS]
    if not slow:
        return
    key = (tuple((p.regex, p.mode) for p in slow), hash(tuple(names)), len(names))
    with _cache_lock:
        known = key in _cache
        found = _cache.get(key)
    if not known:
        found = _measure(slow, names)
        with _cache_lock:
            if len(_cache) > 512:
                _cache.clear()
            _cache[key] = found
    if found:
        raise InvalidAdapterError(f"{where}: {found}{hint}")


def check_stored_config(config: dict, module_names: Iterable[str], ref: str) -> None:
    """:func:`check_patterns` for a stored version (``ref``), before PEFT or adaptr matches
    its config against a loaded model's ``module_names`` (``n for n, _ in
    model.named_modules()``): versions stored before adaptr bounded patterns may hold one
    that would hang."""
    check_patterns(config, module_names, ref, stored=ref)


# The child: matches each pattern against every name with Python's re, under a CPU-time
# limit (ITIMER_VIRTUAL: the machine's load does not count), one JSON line per pattern.
_CHILD = r"""
import json, re, signal, sys
class Slow(Exception):
    pass
def alarm(*_):
    raise Slow
timer = hasattr(signal, "setitimer") and hasattr(signal, "SIGVTALRM")
if timer:
    signal.signal(signal.SIGVTALRM, alarm)
data = json.load(sys.stdin)
names = data["names"]
for i, regex, mode, budget in data["jobs"]:
    match, name = getattr(re.compile(regex), mode), None
    try:
        if timer:
            signal.setitimer(signal.ITIMER_VIRTUAL, budget)
        for name in names:
            match(name)
        if timer:
            signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        print(json.dumps([i, None]), flush=True)
    except Slow:
        print(json.dumps([i, name]), flush=True)
"""


def _measure(patterns: Sequence[Pattern], names: list[str]) -> str | None:
    """Match ``patterns`` with Python's re against ``names`` in a child interpreter; the
    refusal of the first that did not finish in its CPU time, or None."""
    budget = CPU_BASE_S + CPU_PER_NAME_S * len(names)
    jobs = [[i, p.regex, p.mode, budget] for i, p in enumerate(patterns)]
    payload = json.dumps({"jobs": jobs, "names": names})
    wall = 5 * budget * len(jobs) + 30  # a backstop only: the child keeps its own time
    try:
        proc = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _CHILD],
            input=payload,
            capture_output=True,
            text=True,
            timeout=wall,
        )
        out, crashed = proc.stdout, proc.returncode != 0
    except subprocess.TimeoutExpired as e:  # the child's own timer did not stop it
        out, crashed = e.stdout or "", False
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
    except OSError:  # no interpreter to run
        out, crashed = "", True
    done: dict[int, str | None] = {}
    for line in out.splitlines():
        try:
            i, name = json.loads(line)
            done[int(i)] = name
        except (ValueError, TypeError):
            continue
    for i, p in enumerate(patterns):
        if i in done and done[i] is None or i not in done and crashed:
            continue  # finished; or not measured (the static screen refused the unbounded)
        at = f" at {brief(done[i], 60)}" if done.get(i) is not None else ""
        return (
            f"{p.label} {brief(p.pattern)} cannot be matched in bounded time against the "
            f"module names (re.{p.mode} took over {budget:.2g} s of CPU{at}, as PEFT's "
            f"would); {p.hint}"
        )
    return None
