"""Parameters of an OpenAI completion request, checked, and the ``stop`` strings' scanning.

Supported: ``max_tokens`` (or ``max_completion_tokens``), ``temperature`` (default 0:
greedy; else at least 0.01), ``top_p``, ``stop`` (up to 4 strings of at most 256
characters), ``stream``, ``stream_options.include_usage``, ``n`` (up to 16 choices per
prompt), ``seed`` (sampling with a seed is reproducible, alone or batched; choice j of
``n`` uses ``seed + j``), log-probabilities (completions: ``logprobs`` = how many
alternatives, 0-20, and ``echo`` for the prompt's; chat: ``logprobs`` true and
``top_logprobs`` 0-20), and vLLM's ``ignore_eos``, ``min_tokens`` and
``return_tokens_as_token_ids``. True/false fields take JSON booleans only (not 1 or
"no"). Accepted and ignored, as they do not change the answer: ``user``, ``metadata``,
``store``, ``service_tier``, ``safety_identifier``, ``prompt_cache_key``,
``stream_options.include_obfuscation``. Fields whose effect adaptr serve does not have are
accepted at the value that switches them off, as clients send them (``presence_penalty``
and ``frequency_penalty`` 0, vLLM's ``repetition_penalty`` 1, ``top_k`` -1 or 0, ``min_p``
0, ``logit_bias`` {}, ``best_of`` = ``n``, ``suffix`` "", completions: no tools; chat takes
``tools``, :mod:`adaptr.serving.openai.tools`; legacy ``functions`` none) and refused at any
other; so is a field this server does not know: nothing is silently dropped.
``response_format`` takes ``text``, ``json_object`` and ``json_schema``
(:mod:`adaptr.serving.constrain`: decoding constrained to the schema).
"""

from __future__ import annotations

from dataclasses import dataclass

from adaptr.errors import InvalidInputError
from adaptr.serving.constrain import ResponseFormat, parse_response_format
from adaptr.serving.requests import Sampling
from adaptr.serving.text import find_stop, held_back  # noqa: F401  (the engine's)

MAX_TOKENS = 4096
MAX_STOPS = 4
MAX_STOP_CHARS = 256  # held_back() is quadratic in a stop string's length, on every token
MIN_TEMPERATURE = 0.01  # below it the logits / temperature overflow: sampling breaks
MAX_LOGPROBS = 20  # alternatives per token (vLLM's default limit; OpenAI's is 5 / 20)
MAX_N = 16  # choices per prompt

# fields whose effect adaptr serve does not have: a request may send them only at the value
# that means "off" (clients such as vLLM's benchmark send them always), or null.
# (field, (its neutral values, as JSON types: 0 and 0.0 alike, never false), shown as)
_NEUTRAL: dict[str, tuple[tuple, str]] = {
    "suffix": (("",), '""'),
    "presence_penalty": ((0,), "0"),
    "frequency_penalty": ((0,), "0"),
    "repetition_penalty": ((1,), "1"),  # vLLM's
    "top_k": ((-1, 0), "-1 or 0"),  # vLLM's
    "min_p": ((0,), "0"),  # vLLM's
    "logit_bias": (({},), "{}"),
    "tools": (([],), "[]"),
    "functions": (([],), "[]"),
    "tool_choice": (("none", "auto"), "'none' or 'auto'"),  # (without tools, both mean none)
    "function_call": (("none", "auto"), "'none' or 'auto'"),
    "parallel_tool_calls": ((True, False), "true or false"),
}
TOOL_FIELDS = {"tools", "tool_choice", "parallel_tool_calls"}  # checked by tools.parse_tools
# what the endpoints read; IGNORED do not change the answer
TAKEN = {
    "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream",
    "stream_options", "stop", "seed", "logprobs", "top_logprobs", "echo", "response_format",
    "ignore_eos", "min_tokens", "return_tokens_as_token_ids", "best_of",
}  # fmt: skip
IGNORED = {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"}
_STRINGS = ("user", "service_tier", "safety_identifier", "prompt_cache_key")  # (IGNORED's types)
STREAM_OPTIONS = {"include_usage", "include_obfuscation"}  # (obfuscation padding: not sent)


class ParamError(InvalidInputError):
    """A request parameter with a bad value; ``param`` names it (OpenAI's error field)."""

    def __init__(self, param: str, message: str, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass(frozen=True)
class RequestParams:
    """What a completion request asks of the generation."""

    max_tokens: int
    sampling: Sampling  # greedy is Sampling(0.0, 1.0, seed), whatever top_p was sent
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    n: int = 1
    logprobs: int | None = None  # alternatives per token; None: no log-probabilities
    echo: bool = False  # completions: the prompt comes first (text and log-probabilities)
    ignore_eos: bool = False  # generate max_tokens whatever comes
    min_tokens: int = 0  # before these many tokens no EOS and no stop string
    as_ids: bool = False  # log-probabilities name tokens token_id:N
    response_format: ResponseFormat | None = None  # JSON output (None: text)

    @property
    def seed(self) -> int | None:
        """The first choice's seed (choice j's is ``seed + j``); None: unseeded."""
        return self.sampling.seed


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise ParamError(key, f"'{key}' must be a number between {low:g} and {high:g}")
    return float(value)


def _integer(body: dict, key: str, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is not None and (
        not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high
    ):
        raise ParamError(key, f"'{key}' must be an integer between {low} and {high}")
    return value


def _flag(body: dict, key: str, what: str = "", name: str | None = None) -> bool:
    """A true/false field (a JSON boolean: not 1, "no" or "false"); null or absent is false.
    ``name``: the field as errors name it (``stream_options.include_usage``)."""
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        name = name or key
        raise ParamError(name, f"'{name}' must be true or false{what}")
    return bool(value)


def _is_int(value) -> bool:  # noqa: ANN001
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value) -> str:  # noqa: ANN001
    """A value's JSON type (an integer and a float are both numbers; a boolean is not one)."""
    if isinstance(value, bool):
        return "boolean"
    return "number" if isinstance(value, (int, float)) else type(value).__name__


def _same(value, off) -> bool:  # noqa: ANN001
    """Whether ``value`` is ``off`` as JSON has it: 0 and 0.0 are, false and 0 are not."""
    return _kind(value) == _kind(off) and value == off


def _ignored_types(body: dict) -> None:
    """IGNORED fields do not change the answer, but they are still what OpenAI says they are."""
    for key in _STRINGS:
        if body.get(key) is not None and not isinstance(body[key], str):
            raise ParamError(key, f"'{key}' must be a string")
    _flag(body, "store")
    metadata = body.get("metadata")
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise ParamError("metadata", "'metadata' must be an object of string values")


def _logprobs(body: dict, chat: bool) -> tuple[int | None, bool]:
    """(alternatives per token or None, echo): completions' ``logprobs`` is a count and
    ``echo`` a flag; chat's ``logprobs`` is a flag and ``top_logprobs`` the count."""
    echo = _flag(body, "echo")
    if chat:
        if echo:
            raise ParamError("echo", "'echo' is a completions parameter; leave it out of chat")
        on = _flag(body, "logprobs", " (chat)")
        top = _integer(body, "top_logprobs", 0, MAX_LOGPROBS)
        if top is not None and not on:
            raise ParamError("top_logprobs", "'top_logprobs' needs 'logprobs': true")
        return (top or 0) if on else None, False
    if body.get("top_logprobs") is not None:
        raise ParamError(
            "top_logprobs", "'top_logprobs' is a chat parameter; completions take 'logprobs': N"
        )
    return _integer(body, "logprobs", 0, MAX_LOGPROBS), echo


def parse_params(body: dict, chat: bool = False) -> RequestParams:
    """Check ``body``'s generation parameters; :class:`ParamError` names the first bad one."""
    main = "messages" if chat else "prompt"
    for key in body:
        if key not in TAKEN and key not in IGNORED and key not in _NEUTRAL and key != main:
            shown = key[:60] if isinstance(key, str) else repr(key)
            raise ParamError(
                shown, f"'{shown}' is not a parameter adaptr serve takes; leave it out"
            )
    logprobs, echo = _logprobs(body, chat)
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    max_tokens = 16 if max_tokens is None else max_tokens
    least = 0 if echo else 1  # 0 with echo: the prompt scored, nothing generated
    if (
        not isinstance(max_tokens, int)
        or isinstance(max_tokens, bool)
        or not least <= max_tokens <= MAX_TOKENS
    ):
        raise ParamError(
            "max_tokens",
            f"'max_tokens' must be an integer between {least} and {MAX_TOKENS}"
            + ("" if echo else " (0 only with 'echo')"),
        )
    temperature = _number(body, "temperature", 0.0, 0, 2)
    if 0 < temperature < MIN_TEMPERATURE:
        raise ParamError(
            "temperature",
            f"'temperature' must be 0 (greedy) or between {MIN_TEMPERATURE:g} and 2",
        )
    top_p = _number(body, "top_p", 1.0, 0, 1)
    if top_p == 0:
        raise ParamError("top_p", "'top_p' must be above 0 (use temperature 0 for greedy)")
    n = _integer(body, "n", 1, MAX_N) or 1
    for key, (off, shown) in _NEUTRAL.items():
        if chat and key in TOOL_FIELDS:  # chat takes tools (adaptr.serving.openai.tools)
            continue
        if body.get(key) is not None and not any(_same(body[key], o) for o in off):
            raise ParamError(
                key, f"'{key}' is not supported by adaptr serve: send {shown} (off) or leave it out"
            )
    best_of = body.get("best_of")
    if best_of is not None and not (_is_int(best_of) and best_of == n):
        raise ParamError(
            "best_of",
            f"'best_of' is not supported by adaptr serve: send n ({n}) or leave it out",
        )
    _ignored_types(body)
    try:
        response_format = parse_response_format(body.get("response_format"))
    except InvalidInputError as e:
        raise ParamError("response_format", str(e)) from None
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else stop or ()
    if (
        not isinstance(stops, (list, tuple))
        or len(stops) > MAX_STOPS
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)
    ):
        raise ParamError(
            "stop",
            f"'stop' must be a non-empty string or a list of up to {MAX_STOPS}, "
            f"each at most {MAX_STOP_CHARS} characters",
        )
    seed = body.get("seed")
    if seed is not None and (
        not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63
    ):
        raise ParamError("seed", "'seed' must be an integer between 0 and 2**63 - 1")
    ignore_eos = _flag(body, "ignore_eos")
    if ignore_eos and response_format is not None:
        raise ParamError("ignore_eos", "'ignore_eos' cannot be combined with a JSON 'response_format'")  # fmt: skip
    min_tokens = _integer(body, "min_tokens", 0, max_tokens) or 0
    if min_tokens and response_format is not None:  # the grammar ends the answer, not a count
        raise ParamError("min_tokens", "'min_tokens' cannot be combined with a JSON 'response_format'")  # fmt: skip
    as_ids = _flag(body, "return_tokens_as_token_ids")
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise ParamError("stream_options", "'stream_options' must be an object")
    for key in options:
        if key not in STREAM_OPTIONS:
            shown = key[:60] if isinstance(key, str) else repr(key)
            raise ParamError(
                f"stream_options.{shown}",
                f"'stream_options.{shown}' is not supported by adaptr serve; it takes include_usage",
            )
    include_usage = _flag(options, "include_usage", name="stream_options.include_usage")
    _flag(options, "include_obfuscation", name="stream_options.include_obfuscation")
    # temperature 0 (the default here, unlike OpenAI's 1) is greedy and deterministic
    sampling = Sampling(0.0, 1.0, seed) if temperature == 0 else Sampling(temperature, top_p, seed)
    return RequestParams(
        max_tokens, sampling, tuple(stops), stream, include_usage,
        n, logprobs, echo, ignore_eos, min_tokens, as_ids, response_format,
    )  # fmt: skip
