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
import re
import subprocess
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from adaptr.errors import InvalidAdapterError, brief

MAX_PATTERN = 1000  # characters of one pattern
STATIC_STEPS = 1e6  # a bound at most this per name needs no measuring (~10 ms)
CPU_BASE_S = 1.0  # measuring one pattern: this much CPU time, plus CPU_PER_NAME_S per name
CPU_PER_NAME_S = 1e-4  # (PEFT's own match of a module name takes a few microseconds)
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
    from adaptr.registry.regex_cost import Unbounded, screen  # the read commands never need it

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
    from adaptr.registry.regex_cost import cost, steps

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
