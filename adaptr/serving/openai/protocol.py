"""Parameters of an OpenAI completion request, checked, and the ``stop`` strings' scanning.

Supported: ``max_tokens`` (or ``max_completion_tokens``), ``temperature`` (default 0:
greedy; else at least 0.01), ``top_p``, ``stop`` (up to 4 strings of at most 256
characters), ``stream``, ``stream_options.include_usage``, ``n`` = 1, ``seed`` (sampling with a seed is
reproducible, alone or batched). Accepted and ignored: ``user``. Anything that would change the answer and is not supported
(``logprobs``, penalties, ``logit_bias``, ``echo``, ``best_of``, ``suffix``, tools, a
non-text ``response_format``) is refused rather than silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import InvalidInputError

MAX_TOKENS = 4096
MAX_STOPS = 4
MAX_STOP_CHARS = 256  # held_back() is quadratic in a stop string's length, on every token
MIN_TEMPERATURE = 0.01  # below it the logits / temperature overflow: sampling breaks

# (field, the value that means "off"): a request may send these only switched off
_UNSUPPORTED = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
}


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


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise ParamError(key, f"'{key}' must be a number between {low:g} and {high:g}")
    return float(value)


def parse_params(body: dict) -> RequestParams:
    """Check ``body``'s generation parameters; :class:`ParamError` names the first bad one."""
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    max_tokens = 16 if max_tokens is None else max_tokens
    if (
        not isinstance(max_tokens, int)
        or isinstance(max_tokens, bool)
        or not 1 <= max_tokens <= MAX_TOKENS
    ):
        raise ParamError(
            "max_tokens", f"'max_tokens' must be an integer between 1 and {MAX_TOKENS}"
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
    n = body.get("n")
    if n is not None and (n != 1 or isinstance(n, bool)):
        raise ParamError("n", "'n' must be 1: send one request per completion")
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
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise ParamError("stream", "'stream' must be true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ParamError("stream_options", "'stream_options' must be an object")
    # temperature 0 (the default here, unlike OpenAI's 1) is greedy and deterministic
    sampling = (False, 0.0, 1.0) if temperature == 0 else (True, temperature, top_p)
    return RequestParams(
        max_tokens, sampling, tuple(stops), stream, bool(options.get("include_usage")), seed
    )


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
