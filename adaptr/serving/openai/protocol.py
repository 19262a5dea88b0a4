"""Parameters of an OpenAI completion request, checked, and the ``stop`` strings' scanning.

Supported: ``max_tokens`` (or ``max_completion_tokens``), ``temperature`` (default 0:
greedy; else at least 0.01), ``top_p``, ``stop`` (up to 4 strings of at most 256
characters), ``stream``, ``stream_options.include_usage``, ``n`` (up to 16 choices per
prompt), ``seed`` (sampling with a seed is reproducible, alone or batched; choice j of
``n`` uses ``seed + j``), log-probabilities (completions: ``logprobs`` = how many
alternatives, 0-20, and ``echo`` for the prompt's; chat: ``logprobs`` true and
``top_logprobs`` 0-20), and vLLM's ``ignore_eos``, ``min_tokens`` and
``return_tokens_as_token_ids``. Accepted and
ignored, as they do not change the answer: ``user``, ``metadata``, ``store``,
``service_tier``, ``safety_identifier``, ``prompt_cache_key``. Anything that would change
the answer and is not supported (penalties, ``logit_bias``, ``best_of``, ``suffix``,
tools, a non-text ``response_format``) is refused, and so is a field this server does not
know: nothing is silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import InvalidInputError

MAX_TOKENS = 4096
MAX_STOPS = 4
MAX_STOP_CHARS = 256  # held_back() is quadratic in a stop string's length, on every token
MIN_TEMPERATURE = 0.01  # below it the logits / temperature overflow: sampling breaks
MAX_LOGPROBS = 20  # alternatives per token (vLLM's default limit; OpenAI's is 5 / 20)
MAX_N = 16  # choices per prompt

# (field, the value that means "off"): a request may send these only switched off
_UNSUPPORTED = {
    "best_of": (None, 1),
    "suffix": (None, ""),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),  # (without tools, both mean none)
    "function_call": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False),
}
# what the endpoints read; IGNORED do not change the answer
TAKEN = {
    "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream",
    "stream_options", "stop", "seed", "logprobs", "top_logprobs", "echo", "response_format",
    "ignore_eos", "min_tokens", "return_tokens_as_token_ids",
}  # fmt: skip
IGNORED = {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"}


class ParamError(InvalidInputError):
    """A request parameter with a bad value; ``param`` names it (OpenAI's error field)."""

    def __init__(self, param: str, message: str, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass(frozen=True)
class RequestParams:
    """What a completion request asks of the generation."""

    max_tokens: int
    sampling: tuple  # (do_sample, temperature, top_p): requests batch together when equal
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    seed: int | None = None
    n: int = 1
    logprobs: int | None = None  # alternatives per token; None: no log-probabilities
    echo: bool = False  # completions: the prompt comes first (text and log-probabilities)
    ignore_eos: bool = False  # generate max_tokens whatever comes
    min_tokens: int = 0  # before these many tokens no EOS and no stop string
    as_ids: bool = False  # log-probabilities name tokens token_id:N


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


def _flag(body: dict, key: str, what: str = "") -> bool:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise ParamError(key, f"'{key}' must be true or false{what}")
    return bool(value)


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
        if key not in TAKEN and key not in IGNORED and key not in _UNSUPPORTED and key != main:
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
    for key, off in _UNSUPPORTED.items():
        if key in body and body[key] not in off:
            raise ParamError(key, f"'{key}' is not supported by adaptr serve; leave it out")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise ParamError("response_format", "only 'response_format': {'type': 'text'} is supported")
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
    min_tokens = _integer(body, "min_tokens", 0, max_tokens) or 0
    as_ids = _flag(body, "return_tokens_as_token_ids")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise ParamError("stream", "'stream' must be true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ParamError("stream_options", "'stream_options' must be an object")
    # temperature 0 (the default here, unlike OpenAI's 1) is greedy and deterministic
    sampling = (False, 0.0, 1.0) if temperature == 0 else (True, temperature, top_p)
    return RequestParams(
        max_tokens, sampling, tuple(stops), stream, bool(options.get("include_usage")), seed,
        n, logprobs, echo, ignore_eos, min_tokens, as_ids,
    )  # fmt: skip


def find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest of ``stops`` begins in ``text``, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` could begin a stop string (not sent yet)."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest
