"""Structured output: a request's ``response_format`` as a grammar its row decodes under.

``json_object`` is any JSON object; ``json_schema`` is a JSON Schema (OpenAI's
``{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}``).
Both compile with llguidance (the engine vLLM and SGLang use) to a grammar over the
tokenizer's vocabulary (:func:`compile_format`, on the caller's thread; cached per
tokenizer by schema). Each request gets a :class:`Guide` (its matcher): before a constrained
row chooses a token, :func:`mask_rows` sets the logits of every token the grammar does not
allow next to -inf (EOS only where the grammar accepts), and the scheduler advances the
guide with each token it takes; the row stops (``"stop"``) when the grammar is complete.
Rows without a guide are untouched. The JSON is compact (no whitespace between tokens);
the schema is enforced whether ``strict`` is true or not (as vLLM does). A schema llguidance
cannot compile (an unknown ``$ref``, an unsupported keyword, a bad type) is refused with
the compiler's reason.

Only what the standard library has is imported here at module level: the protocol imports
this module on every request, llguidance and torch load on first use.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from adaptr.errors import InvalidInputError

CACHED_GRAMMARS = 256  # compiled grammars kept per tokenizer (least recently used dropped)
MAX_SCHEMA_CHARS = 256 * 1024
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_JSON_SCHEMA_KEYS = {"name", "schema", "strict", "description"}
JSON_OBJECT = json.dumps({"type": "object"})


@dataclass(frozen=True)
class ResponseFormat:
    """A structured answer asked for: ``kind`` ``json_object`` (any object) or
    ``json_schema`` (``schema``: the schema as compact JSON text, the cache key; its key order is the answer's)."""

    kind: str
    schema: str = JSON_OBJECT
    name: str | None = None
    strict: bool = False

    @classmethod
    def json_schema(cls, schema: dict, name: str | None = None, strict: bool = True) -> ResponseFormat:  # fmt: skip
        """A format from a JSON Schema (a dict)."""
        return cls("json_schema", _canonical(schema), name, strict)


def _canonical(schema: Any) -> str:
    try:
        text = json.dumps(schema, separators=(",", ":"), allow_nan=False)  # (key order kept)
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"the JSON schema is not JSON: {e}") from None
    if len(text) > MAX_SCHEMA_CHARS:
        raise InvalidInputError(f"the JSON schema is too long (at most {MAX_SCHEMA_CHARS} characters)")  # fmt: skip
    return text


def parse_response_format(value: Any) -> ResponseFormat | None:
    """OpenAI's ``response_format`` checked: None for text (or absent), else the format.
    Raises :class:`InvalidInputError` naming what is wrong (the field is the caller's)."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text" and set(value) == {"type"}:
        return None
    if kind == "json_object" and set(value) == {"type"}:
        return ResponseFormat("json_object")
    if kind != "json_schema":
        raise InvalidInputError(
            "'response_format' must be {'type': 'text'}, {'type': 'json_object'} or "
            "{'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}, 'strict': true}}"
        )
    if set(value) != {"type", "json_schema"} or not isinstance(value["json_schema"], dict):
        raise InvalidInputError(
            "'response_format' of type json_schema takes 'json_schema': {'name', 'schema', 'strict', 'description'} and nothing else"  # fmt: skip
        )
    spec = value["json_schema"]
    extra = sorted(str(k)[:60] for k in set(spec) - _JSON_SCHEMA_KEYS)
    if extra:
        raise InvalidInputError(
            f"'response_format.json_schema' does not take {', '.join(extra)} (it takes name, schema, strict, description)"  # fmt: skip
        )
    name, strict, schema = spec.get("name"), spec.get("strict"), spec.get("schema")
    if name is not None and not (isinstance(name, str) and _NAME.fullmatch(name)):
        raise InvalidInputError(
            "'response_format.json_schema.name' must be 1 to 64 letters, digits, '_' or '-'"
        )
    if strict is not None and not isinstance(strict, bool):
        raise InvalidInputError("'response_format.json_schema.strict' must be true or false")
    if spec.get("description") is not None and not isinstance(spec["description"], str):
        raise InvalidInputError("'response_format.json_schema.description' must be a string")
    if not isinstance(schema, (dict, bool)):
        raise InvalidInputError("'response_format.json_schema.schema' must be a JSON Schema (an object)")  # fmt: skip
    return ResponseFormat("json_schema", _canonical(schema), name, bool(strict))


# ------------------------------------------------------------------ compiling
class Grammar:
    """A compiled format: :meth:`guide` gives each request its own matcher."""

    def __init__(self, fmt: ResponseFormat, matcher: Any, words: int, vocab: int):
        self.format, self._proto, self.words, self.vocab = fmt, matcher, words, vocab

    def guide(self) -> Guide:
        """A fresh matcher at the grammar's start, for one request."""
        return Guide(self._proto.deep_copy(), self.words, self.vocab, self.format)


class Guide:
    """One request's place in its grammar: the tokens it allows next, advanced by
    :meth:`accept`; :attr:`finished` once nothing can follow (the row ends there)."""

    def __init__(self, matcher: Any, words: int, vocab: int, fmt: ResponseFormat):
        self.matcher, self.words, self.vocab, self.format = matcher, words, vocab, fmt

    def accept(self, token: int) -> bool:
        """Advance by ``token``; False when the grammar does not allow it."""
        return bool(self.matcher.consume_token(token))

    @property
    def accepting(self) -> bool:
        """Whether what it has is complete (an EOS may end it)."""
        return bool(self.matcher.is_accepting())

    @property
    def finished(self) -> bool:
        """Whether the grammar is complete and allows nothing more."""
        return bool(self.matcher.is_stopped())

    @property
    def error(self) -> str:
        """Why the matcher failed (its parser's limits hit, say); empty while it has not."""
        return self.matcher.get_error() if self.matcher.is_error() else ""

    def failure(self, token: int) -> GrammarError:
        """The error a request gets when its grammar failed, or refused ``token``."""
        why = (self.error.strip().splitlines() or [""])[0][:300] or f"token {token} not allowed"
        return GrammarError(
            f"the JSON schema could not be followed while generating ({why}); "
            "simplify it (fewer recursive or open-ended parts)"
        )


class GrammarError(InvalidInputError):
    """A schema the engine could not follow (a 400 naming ``response_format``)."""

    param = "response_format"


class _Compiler:
    """One tokenizer's bridge to llguidance and its compiled grammars (by format)."""

    def __init__(self, tokenizer: Any, vocab: int):
        import llguidance.hf

        try:
            self.lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        except ValueError as e:  # (a slow tokenizer)
            raise InvalidInputError(f"structured output needs a fast tokenizer: {e}") from None
        self.vocab = vocab  # the logits' width
        self.words = (max(vocab, self.lltok.vocab_size) + 31) // 32
        self.cache: OrderedDict[ResponseFormat, Grammar] = OrderedDict()
        self.lock = threading.Lock()

    def compile(self, fmt: ResponseFormat) -> Grammar:
        key = ResponseFormat(fmt.kind, fmt.schema)  # (name and strict do not change it)
        with self.lock:
            if key in self.cache:
                self.cache.move_to_end(key)
                return self.cache[key]
        from llguidance import LLMatcher

        try:
            grammar = LLMatcher.grammar_from_json_schema(
                fmt.schema, defaults={"whitespace_flexible": False}
            )
        except ValueError as e:
            raise InvalidInputError(f"the JSON schema cannot be compiled: {e}") from None
        failed, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.lltok)
        if failed:
            raise InvalidInputError(f"the JSON schema cannot be compiled: {messages[0]}")
        matcher = LLMatcher(self.lltok, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidInputError(f"the JSON schema cannot be compiled: {matcher.get_error()}")
        compiled = Grammar(fmt, matcher, self.words, self.vocab)
        with self.lock:
            self.cache[key] = compiled
            while len(self.cache) > CACHED_GRAMMARS:
                self.cache.popitem(last=False)
        return compiled


_compilers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def compile_format(tokenizer: Any, vocab: int, fmt: ResponseFormat) -> Grammar:
    """``fmt`` compiled for ``tokenizer`` and logits of width ``vocab`` (cached); raises
    :class:`InvalidInputError` with the compiler's reason when it cannot be."""
    with _compilers_lock:
        by_vocab = _compilers.setdefault(tokenizer, {})
        compiler = by_vocab.get(vocab)
    if compiler is None:  # (built outside the lock: about a second for a large vocabulary)
        compiler = _Compiler(tokenizer, vocab)
        with _compilers_lock:
            compiler = by_vocab.setdefault(vocab, compiler)
    return compiler.compile(fmt)


# -------------------------------------------------------------------- masking
_bits: dict = {}  # device -> the 32 bit positions, int32


def mask_rows(choose: Any, logits: Any, rows: Sequence[tuple[int, Guide, Collection[int]]]) -> None:
    """Set, in ``choose`` (``[batch, vocab]``, not ``logits``), -inf on each guided row's
    tokens its grammar does not allow next; ``rows``: (row index, its guide, its EOS ids).
    EOS keeps the model's logit (from ``logits``) where the grammar accepts, else -inf.
    The masks are computed off the GIL in this thread, one row after another: llguidance's
    thread pool (LLExecutor) competes with torch's threads for the cores, and made decoding
    3x slower on a 2-core box where this way costs 1.2x (bench/constrained.py)."""
    import torch

    if not rows:
        return
    words = rows[0][1].words
    bitmask = torch.empty((len(rows), words), dtype=torch.int32)
    start = bitmask.data_ptr()
    for k, (_, guide, _) in enumerate(rows):  # (off the GIL, one after another)
        guide.matcher.unsafe_compute_mask_ptr(start + k * words * 4, words * 4)
    device, vocab = choose.device, choose.shape[-1]
    shifts = _bits.get(device)
    if shifts is None:
        shifts = _bits[device] = torch.arange(32, dtype=torch.int32, device=device)
    bits = (bitmask.to(device).unsqueeze(-1) >> shifts) & 1
    allowed = bits.view(len(rows), -1)[:, :vocab].bool()
    for k, (_, guide, _) in enumerate(rows):
        if guide.matcher.is_error():  # (its limits hit: left as it is, the row fails at accept)
            allowed[k] = True
    if allowed.shape[1] < vocab:  # (logits wider than the grammar's vocabulary: padding ids)
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]))
    index = torch.tensor([i for i, _, _ in rows], device=device)
    masked = choose.index_select(0, index).masked_fill_(~allowed, float("-inf"))
    for k, (i, guide, eos) in enumerate(rows):
        ends = [t for t in eos if 0 <= t < vocab]  # (-1: "never ends", no token)
        if ends:
            masked[k, ends] = logits[i, ends] if guide.accepting else float("-inf")
    choose.index_copy_(0, index, masked)
