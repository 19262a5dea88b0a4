"""The OpenAI request parameters adaptr serve accepts, refuses, and its stop-string scanning."""

import pytest

from adaptr.serving.openai.protocol import ParamError, find_stop, held_back, parse_params
from adaptr.serving.requests import Sampling


def test_defaults_are_greedy_16_tokens_no_stop():
    p = parse_params({})
    assert (p.max_tokens, p.sampling, p.stop, p.stream, p.include_usage) == (
        16,
        Sampling(0.0, 1.0),
        (),
        False,
        False,
    )


def test_accepted_values():
    p = parse_params(
        {"max_completion_tokens": 7, "temperature": 0.7, "top_p": 0.9, "stop": "###", "n": 1,
         "stream": True, "stream_options": {"include_usage": True}, "seed": 3, "user": "u",
         "presence_penalty": 0, "logprobs": None, "response_format": {"type": "text"}}
    )  # fmt: skip
    assert p.max_tokens == 7 and p.sampling == Sampling(0.7, 0.9, 3)
    assert p.stop == ("###",) and p.stream and p.include_usage
    assert parse_params({"stop": ["a", "bc"], "max_tokens": 3}).stop == ("a", "bc")
    assert parse_params({"temperature": 0.01}).sampling == Sampling(0.01, 1.0)
    assert parse_params({"stop": "s" * 256}).stop == ("s" * 256,)
    # greedy ignores top_p, so greedy requests batch together whatever top_p they send
    assert parse_params({"temperature": 0, "top_p": 0.5}).sampling == Sampling(0.0, 1.0)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 5000}, "max_tokens"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 1e-300}, "temperature"),  # logits / 1e-300 overflow: sampling breaks
        ({"temperature": 0.009}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": float("-inf")}, "temperature"),
        ({"temperature": 1e308}, "temperature"),
        ({"temperature": 10**400}, "temperature"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_p": float("inf")}, "top_p"),
        ({"top_p": -1e-300}, "top_p"),
        ({"max_tokens": 10**30}, "max_tokens"),
        ({"max_tokens": float("nan")}, "max_tokens"),
        ({"max_tokens": 16.0}, "max_tokens"),
        ({"top_p": "abc"}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": 0}, "top_p"),
        ({"n": 17}, "n"),
        ({"n": 0}, "n"),
        ({"n": True}, "n"),
        ({"max_tokens": 0, "echo": False}, "max_tokens"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": 1.0}, "logprobs"),
        ({"echo": "yes"}, "echo"),
        ({"top_logprobs": 3}, "top_logprobs"),  # a chat parameter
        ({"foo": 1}, "foo"),  # nothing unknown is silently dropped
        ({"messages": []}, "messages"),  # a chat field on completions
        ({"repetition_penalty": 1.2}, "repetition_penalty"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"min_tokens": 17}, "min_tokens"),  # above max_tokens (16)
        ({"min_tokens": -1}, "min_tokens"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"return_tokens_as_token_ids": 1}, "return_tokens_as_token_ids"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"stop": ["a", 1]}, "stop"),
        ({"stop": "s" * 257}, "stop"),  # held_back() is quadratic in its length, every token
        ({"stream": "yes"}, "stream"),
        ({"stream_options": [1]}, "stream_options"),
        ({"logprobs": True}, "logprobs"),
        ({"best_of": 3}, "best_of"),
        ({"suffix": "end"}, "suffix"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": -1}, "frequency_penalty"),
        ({"logit_bias": {"50": 10}}, "logit_bias"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"response_format": {"type": "regex"}}, "response_format"),
        ({"response_format": {"type": "json_object"}, "min_tokens": 4}, "min_tokens"),
        ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos"),
    ],
)
def test_bad_or_unsupported_values_name_their_parameter(body, param):
    with pytest.raises(ParamError) as e:
        parse_params(body)
    assert e.value.param == param and f"'{param}'" in str(e.value)


def test_ignored_and_vllm_fields():
    p = parse_params({"user": "u", "metadata": {"a": "b"}, "store": False, "service_tier": "auto",
                      "tool_choice": "none", "ignore_eos": True, "min_tokens": 4})  # fmt: skip
    assert (p.ignore_eos, p.min_tokens) == (True, 4)
    with pytest.raises(ParamError) as e:
        parse_params({"prompt": "x"}, chat=True)
    assert e.value.param == "prompt"


def test_logprobs_echo_and_n():
    p = parse_params({"logprobs": 1, "echo": True, "max_tokens": 0, "n": 3, "seed": 5})
    assert (p.logprobs, p.echo, p.max_tokens, p.n, p.seed) == (1, True, 0, 3, 5)
    assert parse_params({"logprobs": 0}).logprobs == 0  # the chosen token's only
    assert parse_params({}).logprobs is None and not parse_params({}).echo
    chat = parse_params({"logprobs": True, "top_logprobs": 4}, chat=True)
    assert (chat.logprobs, chat.echo) == (4, False)
    assert parse_params({"logprobs": True}, chat=True).logprobs == 0
    assert parse_params({"logprobs": False, "top_logprobs": None}, chat=True).logprobs is None


@pytest.mark.parametrize(
    "body, param",
    [
        ({"logprobs": 2}, "logprobs"),  # a flag in chat
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"echo": True}, "echo"),  # completions only
    ],
)
def test_chat_log_probability_parameters(body, param):
    with pytest.raises(ParamError) as e:
        parse_params(body, chat=True)
    assert e.value.param == param and f"'{param}'" in str(e.value)


def test_find_stop_takes_the_earliest():
    assert find_stop("abc###def\n\n", ("\n\n", "###")) == 3
    assert find_stop("abc", ("x",)) is None and find_stop("abc", ()) is None


def test_held_back_is_the_longest_tail_that_may_begin_a_stop():
    assert held_back("hello #", ("###",)) == 1
    assert held_back("hello ##", ("###", "#!")) == 2
    assert held_back("hello", ("###",)) == 0
    assert held_back("ab", ("abc",)) == 2
    assert held_back("xab", ("abab",)) == 2
    assert held_back("anything", ()) == 0


@pytest.mark.parametrize(
    "body, param",
    [
        ({"stream_options": {"include_usage": "no"}}, "stream_options.include_usage"),
        ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
        ({"stream_options": {"include_usage": "false"}}, "stream_options.include_usage"),
        ({"stream_options": {"include_obfuscation": 0}}, "stream_options.include_obfuscation"),
        ({"stream_options": {"usage_stats": 1}}, "stream_options.usage_stats"),
        ({"stream_options": False}, "stream_options"),
        ({"stream": 1}, "stream"),
        ({"stream": 0}, "stream"),
        ({"stream": "false"}, "stream"),
        ({"echo": 0}, "echo"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"ignore_eos": "false"}, "ignore_eos"),
        ({"return_tokens_as_token_ids": "true"}, "return_tokens_as_token_ids"),
        ({"store": "yes"}, "store"),
        ({"parallel_tool_calls": 1}, "parallel_tool_calls"),
        ({"parallel_tool_calls": 0}, "parallel_tool_calls"),
        ({"user": 5}, "user"),
        ({"metadata": {"a": 1}}, "metadata"),
    ],
    ids=repr,
)
def test_true_false_fields_take_json_booleans_only(body, param):
    with pytest.raises(ParamError) as e:
        parse_params(body)
    assert e.value.param == param and f"'{param}'" in str(e.value)


@pytest.mark.parametrize("value", [1, 0, "yes", "true", "no"])
def test_chat_logprobs_is_a_json_boolean(value):
    with pytest.raises(ParamError) as e:
        parse_params({"logprobs": value}, chat=True)
    assert e.value.param == "logprobs"


def test_booleans_and_nulls_are_taken():
    p = parse_params({"stream": True, "stream_options": {"include_usage": False}})
    assert p.stream and not p.include_usage
    p = parse_params({"stream": False, "stream_options": None, "echo": None, "ignore_eos": False,
                      "store": True})  # fmt: skip
    assert not p.stream and not p.include_usage and not p.echo and not p.ignore_eos
    assert not parse_params({"stream_options": {"include_obfuscation": True}}).include_usage


# what clients send always: vLLM's benchmark repetition_penalty 1.0, OpenAI's own defaults
NEUTRAL = [
    {"repetition_penalty": 1}, {"repetition_penalty": 1.0}, {"top_k": -1}, {"top_k": 0},
    {"frequency_penalty": 0}, {"frequency_penalty": 0.0}, {"frequency_penalty": -0.0},
    {"presence_penalty": 0}, {"presence_penalty": 0.0}, {"min_p": 0}, {"min_p": 0.0},
    {"logit_bias": {}}, {"logit_bias": None}, {"best_of": 1}, {"best_of": None},
    {"best_of": 3, "n": 3}, {"suffix": ""}, {"tools": []}, {"tool_choice": "auto"},
    {"parallel_tool_calls": False}, {"top_k": None, "min_p": None, "repetition_penalty": None},
]  # fmt: skip


@pytest.mark.parametrize("body", NEUTRAL, ids=repr)
def test_neutral_values_of_unsupported_fields_are_accepted(body):
    p = parse_params({"max_tokens": 4, **body})
    assert p.sampling == Sampling(0.0, 1.0) and p.n == body.get("n", 1)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"repetition_penalty": 1.1}, "repetition_penalty"),
        ({"repetition_penalty": True}, "repetition_penalty"),  # true == 1 in Python, not in JSON
        ({"repetition_penalty": "1"}, "repetition_penalty"),
        ({"top_k": 40}, "top_k"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": False}, "top_k"),
        ({"frequency_penalty": False}, "frequency_penalty"),
        ({"frequency_penalty": 0.1}, "frequency_penalty"),
        ({"presence_penalty": "0"}, "presence_penalty"),
        ({"min_p": 0.05}, "min_p"),
        ({"logit_bias": {"50": 0}}, "logit_bias"),
        ({"logit_bias": []}, "logit_bias"),
        ({"best_of": 2}, "best_of"),
        ({"best_of": 1, "n": 2}, "best_of"),
        ({"best_of": True}, "best_of"),
        ({"best_of": 1.0}, "best_of"),
        ({"suffix": False}, "suffix"),
        ({"tools": {}}, "tools"),
    ],
    ids=repr,
)
def test_other_values_of_unsupported_fields_are_refused(body, param):
    with pytest.raises(ParamError) as e:
        parse_params(body)
    assert e.value.param == param and f"'{param}'" in str(e.value)
    assert "not supported" in str(e.value)
