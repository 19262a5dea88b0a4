"""Chat ``messages`` as adaptr serve takes them: role, text content, name and tool calls;
legacy function calls, images and audio refused with what is supported, and no field dropped silently."""

import pytest

from adaptr.serving.openai.prepare import parse_messages
from adaptr.serving.openai.protocol import ParamError

TOOL_CALL = {"id": "call_1", "type": "function",
             "function": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}  # fmt: skip


def refusal(messages) -> str:
    with pytest.raises(ParamError) as e:
        parse_messages(messages)
    assert e.value.param == "messages"
    return str(e.value)


def test_role_content_and_name_reach_the_template():
    got = parse_messages([{"role": "system", "content": "be brief"},
                     {"role": "user", "content": "hi", "name": "alice"},
                     {"role": "user", "content": [{"type": "text", "text": "a"},
                                                  {"type": "text", "text": "b"}]}])  # fmt: skip
    assert got == [{"role": "system", "content": "be brief"},
                   {"role": "user", "content": "hi", "name": "alice"},
                   {"role": "user", "content": "a\nb"}]  # fmt: skip


def test_an_answer_sent_back_as_the_openai_client_dumps_it_is_taken():
    dumped = {"role": "assistant", "content": "hello", "refusal": None, "annotations": None,
              "audio": None, "function_call": None, "tool_calls": None}  # fmt: skip
    assert (
        parse_messages([dumped, {**dumped, "tool_calls": [], "annotations": []}])
        == [{"role": "assistant", "content": "hello"}] * 2
    )


def test_tool_call_history_is_taken():
    got = parse_messages([{"role": "user", "content": "weather?"},
                          {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
                          {"role": "tool", "content": "12 C", "tool_call_id": "call_1"}])  # fmt: skip
    assert got[1]["tool_calls"][0]["function"] == {"name": "weather", "arguments": {"city": "Oslo"}}
    assert got[2] == {"role": "tool", "content": "12 C", "tool_call_id": "call_1", "name": "weather"}


@pytest.mark.parametrize(
    "message, said",
    [
        ({"role": "assistant", "content": "", "function_call": TOOL_CALL["function"]}, "legacy function calling"),  # fmt: skip
        ({"role": "function", "name": "weather", "content": "12 C"}, "legacy function calling"),
        ({"role": "user", "content": "12 C", "tool_call_id": "call_1"}, "'tool_call_id' belongs on a 'tool' message"),  # fmt: skip
        ({"role": "user", "content": "x", "tool_calls": [TOOL_CALL]}, "'tool_calls' belongs on an assistant message"),  # fmt: skip
        ({"role": "tool", "content": "12 C"}, "needs the 'tool_call_id'"),
        ({"role": "assistant", "content": None, "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{x"}}]}, "is not valid JSON"),  # fmt: skip
        ({"role": "assistant", "content": None, "tool_calls": {"id": "c"}}, "must be a list"),
    ],
    ids=repr,
)
def test_bad_tool_call_history_is_refused_saying_so(message, said):
    message_text = refusal([{"role": "user", "content": "weather?"}, message])
    assert "messages[1]" in message_text and said in message_text


@pytest.mark.parametrize(
    "part, kind",
    [
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, "image"),
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "audio"),
        ({"type": "file", "file": {"file_id": "f"}}, "file"),
    ],
    ids=repr,
)
def test_media_parts_are_refused_saying_text_only(part, kind):
    message_text = refusal([{"role": "user", "content": [{"type": "text", "text": "see"}, part]}])
    assert f"{kind} content parts are not supported: adaptr serves text models" in message_text


@pytest.mark.parametrize(
    "message, said",
    [
        ({"role": "user", "content": "hi", "foo": 1}, "'foo' is not a message field"),
        ({"role": "user", "content": "hi", "name": 7}, "'name' must be a non-empty string"),
        ({"role": "user", "content": "hi", "name": ""}, "'name' must be a non-empty string"),
        (
            {"role": "assistant", "content": "x", "refusal": "no"},
            "'refusal' is not a message field",
        ),
        ({"role": "assistant", "content": "x", "audio": {"id": "a"}}, "'audio' is not supported"),
        ({"role": "user", "content": [{"type": "text", "text": "x", "extra": 1}]}, "nothing else"),
        (
            {"role": "user", "content": [{"type": "refusal", "refusal": "no"}]},
            "refusal content parts",
        ),
        ({"role": "user", "content": None}, "'content' must be a string or a list of text parts"),
        ({"role": "user"}, "'content' must be a string or a list of text parts"),
        ({"content": "hi"}, "a string 'role'"),
    ],
    ids=repr,
)
def test_no_field_is_dropped_silently(message, said):
    assert said in refusal([message])
