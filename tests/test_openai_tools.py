"""Tool calls on adaptr serve's chat completions: tools checked and rendered as training
renders them, answers parsed into OpenAI tool_calls (hermes, llama3 JSON, mistral), streamed
as OpenAI's deltas; end to end with an adapter adaptr's trainer taught to call a tool."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import openai
import pytest

from adaptr.plugins.common import CHATML, LLAMA2, PLAIN
from adaptr.serving.openai.prepare import parse_messages
from adaptr.serving.openai.protocol import ParamError
from adaptr.serving.openai.tools import FORMATS, ToolStream, format_for, parse_tools, plan_for
from adaptr.tiny import CHAT_TEMPLATE

from helpers import post_raw

WEATHER = {"type": "function", "function": {"name": "get_weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}  # fmt: skip
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
PLAN = parse_tools({"tools": [WEATHER, TIME]})


def plan(fmt: str, **kw):
    return replace(PLAN, format=FORMATS[fmt], **kw)


PARIS = ("get_weather", {"city": "Paris"})
OSLO = ("get_weather", {"city": "Oslo"})
# (format, answer, content, calls): calls None = the whole answer stays content
DS = "<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>"  # fmt: skip


def ds(*calls: tuple[str, str]) -> str:
    """DeepSeek-V3's calls, as its template writes them."""
    body = "".join(f"{DS[1]}function{DS[2]}{n}\n```json\n{a}\n```{DS[3]}" for n, a in calls)
    return DS[0] + body + DS[4]


# fmt: off
CASES = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', None, [PARIS]),  # fmt: skip
    ("hermes", 'Let me look.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>', "Let me look.\n\n", [PARIS, OSLO]),  # fmt: skip
    ("hermes", ' <tool_call>{"name": "get_time", "arguments": {}}</tool_call>', None, [("get_time", {})]),  # fmt: skip
    ("hermes", '<tool_call>{"name": "get_time"}</tool_call>', None, [("get_time", {})]),  # no arguments: {}
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}</tool_call>', None, [PARIS]),  # fmt: skip
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}', None, [PARIS]),  # unterminated, whole
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": "Pa', None, None),  # a half call
    ("hermes", '<tool_call>{"name": get_weather}</tool_call>', None, None),  # not JSON
    ("hermes", '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', None, None),  # not a tool
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>', None, None),
    ("hermes", '<tool_call>{"name": "get_time", "arguments": {}, "x": 1}</tool_call>', None, None),
    ("hermes", '<tool_call>["get_time"]</tool_call>', None, None),
    ("hermes", 'ok <tool_call>{"name": "get_time", "arguments": {}}</tool_call> </tool_call>', None, None),  # fmt: skip
    ("hermes", '<tool_call>{"name": "get_time", "arguments": {}}</tool_call><tool_call>{"name": "x"', None, None),  # fmt: skip
    ("hermes", "It is sunny; no call needed.", None, None),
    ("hermes", "a < b and <tool", None, None),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [PARIS]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_weather", "parameters": {"city": "Oslo"}}', None, [PARIS, OSLO]),  # fmt: skip
    ("llama3_json", ' {"name": "get_time", "arguments": {}}', None, [("get_time", {})]),
    ("llama3_json", '{"answer": 42}', None, None),  # JSON that is not a call
    ("llama3_json", '{"name": "get_time", "parameters": {}} and more', None, None),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city"', None, None),
    ("llama3_json", 'The call is {"name": "get_time", "parameters": {}}', None, None),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]', None, [PARIS, ("get_time", {})]),  # fmt: skip
    ("mistral", 'Sure. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}]', "Sure. ", [OSLO]),  # fmt: skip
    ("mistral", '[{"name": "get_time", "arguments": {}}]', None, [("get_time", {})]),  # marker skipped
    ("mistral", '[TOOL_CALLS] [{"name": "get_time", "arguments": {}', None, None),
    ("mistral", '[TOOL_CALLS] {"name": "get_time", "arguments": {}}', None, None),
    ("mistral", "[1, 2] are numbers", None, None),
    ("deepseek_v3", ds(("get_weather", '{"city": "Paris"}')), None, [PARIS]),
    ("deepseek_v3", "Sure." + ds(("get_weather", '{"city": "Paris"}'), ("get_time", "{}")), "Sure.", [PARIS, ("get_time", {})]),
    ("deepseek_v3", ds(("get_time", "{}"))[: -len(DS[4])], None, [("get_time", {})]),  # no calls-end: whole
    ("deepseek_v3", ds(("get_time", "{x}")), None, None),
    ("deepseek_v3", ds(("get_time", "{}"))[:-30], None, None),  # a half call
    ("deepseek_v3", DS[0] + DS[4], None, None),
]
# fmt: on


def calls_of(parsed) -> list:
    return [(c.name, json.loads(c.arguments)) for c in parsed.calls]


@pytest.mark.parametrize("fmt, text, content, calls", CASES, ids=lambda v: str(v)[:50])
def test_parsers_on_real_answers(fmt, text, content, calls):
    parsed = plan(fmt).parse(text)
    if calls is None:  # nothing silent: what is not a valid call is content, whole
        assert parsed.calls == [] and parsed.content == text
        return
    assert calls_of(parsed) == calls and parsed.content == content
    assert all(c.id.startswith("call_") and len(c.id) == 29 for c in parsed.calls)
    assert len({c.id for c in parsed.calls}) == len(parsed.calls)
    assert plan(fmt).finish(parsed, "stop") == "tool_calls"
    assert plan(fmt).finish(parsed, "length") == "length"
    # tool_choice none never parses; parallel_tool_calls false takes one call only
    assert plan(fmt, choice="none").parse(text).content == text
    single = plan(fmt, parallel=False).parse(text)
    assert calls_of(single) == (calls if len(calls) == 1 else [])


@pytest.mark.parametrize("fmt, text, content, calls", CASES, ids=lambda v: str(v)[:50])
def test_streaming_gives_what_the_whole_answer_gives(fmt, text, content, calls):
    rng = random.Random(len(text))
    for sizes in ([1] * len(text), [rng.randint(1, 7) for _ in text]):
        stream, sent, i = ToolStream(plan(fmt)), "", 0
        for size in sizes:
            if i >= len(text):
                break
            sent += stream.feed(text[i : i + size])
            i += size
        rest, parsed = stream.end()
        whole = plan(fmt).parse(text)
        assert (sent + rest or None) == (whole.content or None)
        assert calls_of(parsed) == calls_of(whole)


def test_content_streams_until_a_call_may_begin():
    stream = ToolStream(plan("hermes"))
    assert stream.feed("Checking") == "Checking"
    assert stream.feed(" now <tool") == " now "  # may begin <tool_call>: held
    assert stream.feed("_call>{") == ""
    assert stream.feed('"name": "get_time"}</tool_call>') == ""
    rest, parsed = stream.end()
    assert rest == "" and calls_of(parsed) == [("get_time", {})]
    stream = ToolStream(plan("hermes"))
    assert stream.feed("a <to") == "a " and stream.feed("o many") == "<too many"


# fmt: off
@pytest.mark.parametrize(
    "body, param, said",
    [
        ({"tools": {}}, "tools", "must be a list"),
        ({"tools": [{"type": "function"}]}, "tools", "needs a 'name'"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools", "function tools"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools", "needs a 'name'"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "tools", "JSON Schema"),  # fmt: skip
        ({"tools": [{"type": "function", "function": {"name": "f", "args": {}}}]}, "tools", "'args' is not a function field"),  # fmt: skip
        ({"tools": [{"type": "function", "function": {"name": "f", "strict": True}}]}, "tools", "constrained decoding"),  # fmt: skip
        ({"tools": [WEATHER, WEATHER]}, "tools", "same function name"),
        ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice", "'required'"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "not among"),  # fmt: skip
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"}}, "tool_choice", "{'type': 'function'"),  # fmt: skip
        ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
        ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice", "not among"),
        ({"tools": [WEATHER], "parallel_tool_calls": 1}, "parallel_tool_calls", "true or false"),
    ],
    ids=repr,
)
# fmt: on
def test_bad_tools_name_their_parameter(body, param, said):
    with pytest.raises(ParamError) as e:
        parse_tools(body)
    assert e.value.param == param and said in str(e.value)


def test_tool_choices():
    assert parse_tools({}) is None and parse_tools({"tools": [], "tool_choice": "none"}) is None
    named = parse_tools({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})  # fmt: skip
    assert (named.choice, named.name) == ("function", "get_weather")
    assert parse_tools({"tools": [WEATHER]}).choice == "auto"
    assert parse_tools({"tools": [WEATHER], "parallel_tool_calls": False}).parallel is False


def test_formats_follow_the_template():
    assert format_for(CHATML).name == "hermes" and format_for(PLAIN).name == "hermes"
    assert format_for(LLAMA2).name == "mistral"  # the llama family declares it
    llama31 = "{{- '<|python_tag|>' }}{{- '{\"name\": \"' + f.name + '\", \"parameters\": ' }}"
    assert format_for(llama31).name == "llama3_json"
    assert format_for(CHAT_TEMPLATE) is None
    assert format_for("{{ '" + DS[0] + "' }}").name == "deepseek_v3"


def test_a_plugin_family_declares_its_tool_format(register_plugin):
    from adaptr import ModelFamily, hookimpl
    from adaptr.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="tool_format must be a format's name"):
        ModelFamily(name="bad", model_types=["bad"], target_modules=["q"], tool_format="no such")
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ tools }}"

    class Plugin:
        @hookimpl
        def adaptr_register_families(self, register):
            register(ModelFamily(name="mine", model_types=["mine"], target_modules=["q"],
                                 chat_template=template, tool_format="llama3_json"))  # fmt: skip
            register(ModelFamily(name="odd", model_types=["odd"], target_modules=["q"],
                                 chat_template=template + " ", tool_format="unknown_one"))  # fmt: skip

    register_plugin(Plugin(), "tool-format-test")
    assert format_for(template).name == "llama3_json"  # declared, though the template shows no sign
    with pytest.raises(ParamError, match="cannot parse") as e:
        format_for(template + " ")
    assert e.value.param == "tools"


def test_tool_history_is_normalised_as_training_has_it():
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}  # fmt: skip
    got = parse_messages([
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call], "refusal": None},
        {"role": "tool", "tool_call_id": "call_1", "content": "12 C"},
    ])  # fmt: skip
    assert got[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}, "id": "call_1"}]}  # fmt: skip
    assert got[2] == {"role": "tool", "content": "12 C", "tool_call_id": "call_1", "name": "get_weather"}  # fmt: skip
    from adaptr.data.chat import message

    trained = message({"role": "assistant", "content": None, "tool_calls": [call]}, "m", "assistant")
    assert trained == got[1]  # the same message training renders


def test_required_and_named_prefill_the_call_as_the_template_writes_it():
    from adaptr.tiny import make_tokenizer

    tok = make_tokenizer()
    messages = [{"role": "user", "content": "weather?"}]

    def render(template):
        return lambda m, tools, gen: tok.apply_chat_template(
            m, tools=tools, chat_template=template, tokenize=False, add_generation_prompt=gen
        )

    named = parse_tools({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})  # fmt: skip
    p, prompt = plan_for(named, render(CHATML), messages, CHATML)
    assert p.opening == '<tool_call>\n{"name": "get_weather", "arguments": '
    assert prompt.endswith("<|im_start|>assistant\n" + p.opening)
    assert calls_of(p.parse('{"city": "Paris"}}\n</tool_call>')) == [PARIS]
    assert p.parse("no idea").content == p.opening + "no idea"  # not a call: content, opening too
    required = parse_tools({"tools": [WEATHER, TIME], "tool_choice": "required"})
    p, _ = plan_for(required, render(LLAMA2), messages, LLAMA2)
    assert p.opening == ' [TOOL_CALLS] [{"name": "'
    assert calls_of(p.parse('get_time", "arguments": {}}]')) == [("get_time", {})]
    with pytest.raises(ParamError, match="ignores 'tools'") as e:
        plan_for(parse_tools({"tools": [WEATHER]}), render(CHAT_TEMPLATE), messages, CHAT_TEMPLATE)
    assert e.value.param == "tools"


# ---------------------------------------------------------------- end to end
QUESTION = [{"role": "user", "content": "Weather in Paris?"}]
# fmt: off
TRAINED = {
    "messages": QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},  # fmt: skip
        {"role": "tool", "tool_call_id": "c1", "content": "18C"},
        {"role": "assistant", "content": "18C."},
    ],
    "tools": [WEATHER],
}
# fmt: on


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    """A tiny LLaMA with adapter ``tooly`` trained by adaptr's trainer (plain template,
    hermes calls) to call get_weather for Paris, then answer the result; served over HTTP."""
    from adaptr.registry import Registry
    from adaptr.serving import AdapterServer
    from adaptr.serving.openai.app import create_app
    from adaptr.tiny import save_tiny_base
    from adaptr.training.trainer import train

    from helpers import client, running

    root = tmp_path_factory.mktemp("tools")
    base = save_tiny_base(root / "base", "llama", initializer_range=0.2)
    reg = Registry(root / "home")
    reg.add_base("tiny", base)
    data, template = root / "tools.jsonl", root / "plain.jinja"
    data.write_text(json.dumps(TRAINED) + "\n")
    template.write_text(PLAIN)
    train({"name": "tooly", "base": {"path": "tiny"}, "data": {"path": str(data), "format": "messages"},
           "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"},
           "sft": {"max_steps": 60, "per_device_train_batch_size": 1, "learning_rate": 2e-2,
                   "lr_scheduler_type": "constant", "gradient_checkpointing": False,
                   "chat_template_path": str(template)}},
          registry=reg, progress=False)  # fmt: skip
    app = create_app(AdapterServer(reg, "tiny"))
    with running(app) as url:
        yield url, client(url), app


def _chat(api, **kw):
    return api.chat.completions.create(model="tooly", messages=QUESTION, tools=[WEATHER], max_tokens=80, **kw)  # fmt: skip


def _streamed(api, **kw) -> tuple[str | None, list[dict], str]:
    """A streamed answer rebuilt as the openai client's accumulation does it (by index)."""
    content, calls, reason = "", {}, None
    for chunk in api.chat.completions.create(model="tooly", messages=QUESTION, tools=[WEATHER], max_tokens=80, stream=True, **kw):  # fmt: skip
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for tc in delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                if tc.id:
                    assert (
                        slot["id"] is None and tc.type == "function"
                    )  # first delta: id, type, name
                    slot["id"], slot["name"] = tc.id, tc.function.name
                slot["arguments"] += tc.function.arguments or ""
            reason = choice.finish_reason or reason
    return content or None, [calls[k] for k in sorted(calls)], reason


def test_an_adapter_trained_on_tool_calls_calls_the_tool(tool_server):
    url, api, _ = tool_server
    out = _chat(api)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {
        "city": "Paris"
    }
    assert choice.message.content is None
    content, calls, reason = _streamed(api)
    assert (content, reason) == (None, "tool_calls")
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert calls[0]["id"].startswith("call_")
    # the openai client's own stream helper rebuilds the same call
    with api.chat.completions.stream(model="tooly", messages=QUESTION, tools=[WEATHER], max_tokens=80) as s:  # fmt: skip
        final = s.get_final_completion()
    (again,) = final.choices[0].message.tool_calls
    assert (again.function.name, json.loads(again.function.arguments)) == (
        "get_weather",
        {"city": "Paris"},
    )


def test_tool_choice_none_answers_in_content_and_named_prefills(tool_server):
    url, api, _ = tool_server
    out = _chat(api, tool_choice="none").choices[0]
    assert out.finish_reason != "tool_calls" and out.message.tool_calls is None
    assert "<tool_call>" in out.message.content  # what it wrote, unparsed
    named = _chat(
        api, tool_choice={"type": "function", "function": {"name": "get_weather"}}
    ).choices[0]
    assert (
        named.finish_reason == "tool_calls"
        and named.message.tool_calls[0].function.name == "get_weather"
    )
    required = _chat(api, tool_choice="required").choices[0]
    assert [json.loads(c.function.arguments) for c in required.message.tool_calls] == [
        {"city": "Paris"}
    ]


def test_agent_loop_call_then_result_then_answer(tool_server, monkeypatch):
    url, api, app = tool_server
    tokenizer = app.state.context.server.tokenizer
    seen = []
    template = tokenizer.apply_chat_template

    def recording(messages, **kwargs):
        out = template(messages, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(tokenizer, "apply_chat_template", recording)
    first = _chat(api).choices[0].message
    call = first.tool_calls[0]
    history = QUESTION + [first.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": "18C"}]  # fmt: skip
    second = api.chat.completions.create(
        model="tooly", messages=history, tools=[WEATHER], max_tokens=8
    )
    # the prompt the server built: the call and its result, as training rendered them
    prompt = seen[-1]
    assert (
        'Assistant: <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
        in prompt
    )
    assert prompt.endswith("Tool: 18C\n\nAssistant:")
    answer = second.choices[0]
    assert answer.message.tool_calls is None and answer.message.content.strip() == "18C."


def test_bad_tools_and_templates_that_drop_them_are_400(tool_server):
    url, api, _ = tool_server
    for kw, param in [({"tools": [{"type": "function"}]}, "tools"),
                      ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}}, "tool_choice"),
                      ({"tool_choice": "required"}, "tool_choice")]:  # fmt: skip
        with pytest.raises(openai.BadRequestError) as e:
            api.chat.completions.create(model="tooly", messages=QUESTION, max_tokens=2, **kw)
        assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body
    # the bare base renders with the tiny tokenizer's own template, which ignores tools
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="tiny", messages=QUESTION, tools=[WEATHER], max_tokens=2)
    assert e.value.body["param"] == "tools" and "ignores 'tools'" in e.value.body["message"]
    history = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}]  # fmt: skip
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="tiny", messages=history, max_tokens=2)
    assert (
        e.value.body["param"] == "messages"
        and "drops the assistant's tool_calls" in e.value.body["message"]
    )
    r = post_raw(
        url, "/completions", json.dumps({"model": "tooly", "prompt": "x", "tools": [WEATHER]})
    )
    assert (
        r.status_code == 400 and r.json()["error"]["param"] == "tools"
    )  # completions take no tools
