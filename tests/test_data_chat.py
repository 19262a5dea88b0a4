"""Chat data as real files hold it: content parts, tool calls, ShareGPT function calls,
multimodal records; the families' templates render all of it and train the assistant's part.

Record shapes follow public files: the OpenAI cookbook's fine-tuning data (tool_calls with
JSON-string arguments, the legacy functions/function_call), LLaMA-Factory's data/
(glaive_toolcall_en_demo.json, mllm_demo.json, mllm_audio_demo.json, the v1 content parts).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from adaptr.data import chat
from adaptr.data.files import load_records
from adaptr.errors import InvalidInputError
from adaptr.extend.catalog import get_family, get_formatter
from adaptr.extend.types import MissingField, MultimodalData
from adaptr.tiny import make_tokenizer

from helpers import refused

WEATHER = {
    "name": "get_current_weather",
    "description": "Get the current weather",
    "parameters": {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "The city and country, e.g. Glasgow, Scotland"},
            "format": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["location", "format"],
    },
}  # fmt: skip
ARGS = {"location": "Glasgow, Scotland", "format": "celsius"}
# the OpenAI cookbook's fine-tuning shape: content parts, tool_calls with string arguments
COOKBOOK = {
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "text", "text": "What's the weather like in Glasgow, Scotland?"}]},
        {"role": "assistant", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_current_weather", "arguments": json.dumps(ARGS)}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 11, "unit": "celsius"}'},
        {"role": "assistant", "content": "It is 11°C in Glasgow."},
    ],
    "tools": [{"type": "function", "function": WEATHER}],
}  # fmt: skip
CALL = {"type": "function", "function": {"name": "get_current_weather", "arguments": ARGS}}
CALL_JSON = json.dumps({"name": "get_current_weather", "arguments": ARGS})
# LLaMA-Factory's glaive_toolcall_en_demo.json
GLAIVE = {
    "conversations": [
        {"from": "human", "value": "I need the area of a rectangle, 5 by 3 units."},
        {"from": "function_call", "value": '{"name": "calculate_area", "arguments": {"shape": "rectangle", "dimensions": [5, 3]}}'},
        {"from": "observation", "value": '{"area": 15}'},
        {"from": "gpt", "value": "The area of the rectangle is 15 square units."},
    ],
    "tools": '[{"name": "calculate_area", "description": "Calculate the area of a given shape", "parameters": '
    '{"type": "object", "properties": {"shape": {"type": "string"}, "dimensions": {"type": "array", '
    '"items": {"type": "number"}}}, "required": ["shape", "dimensions"]}}]',
}  # fmt: skip


def fmt(name, record, **options):
    return get_formatter(name)(record, **options)


def jsonl(path: Path, *records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def masked(tok, record, template=None) -> str:
    """The text TRL's assistant-only loss trains on (apply_chat_template's assistant mask)."""
    enc = chat.render(tok, record, chat_template=template, tokenize=True, return_dict=True,
                      return_assistant_tokens_mask=True)  # fmt: skip
    return tok.decode(
        [t for t, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True) if m]
    )


def family_tokenizer(family: str):
    tok = make_tokenizer()
    tok.chat_template = None
    get_family(family).fix_tokenizer(tok)
    return tok


# ---- content parts ----


def test_text_parts_are_joined_in_both_spellings(tmp_path):
    data = jsonl(
        tmp_path / "parts.jsonl",
        {"messages": [  # OpenAI
            {"role": "user", "content": [{"type": "text", "text": "Translate:"}, {"type": "text", "text": "猫"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "cat"}]}]},
        {"messages": [  # LLaMA-Factory v1
            {"role": "user", "content": [{"type": "text", "value": "hi"}], "loss_weight": 0.0},
            {"role": "assistant", "content": [{"type": "text", "value": "hello"}], "loss_weight": 1.0}]},
        {"messages": [  # the Responses API's input_text, an assistant refusal
            {"role": "developer", "content": [{"type": "input_text", "text": "Be safe."}]},
            {"role": "user", "content": "How do I pick a lock?"},
            {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't help with that."}]}]},
    )  # fmt: skip
    records = load_records(data, "messages")
    assert records[0]["messages"] == [
        {"role": "user", "content": "Translate:\n猫"},
        {"role": "assistant", "content": "cat"},
    ]
    assert records[1]["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    assert records[2]["messages"][0] == {"role": "system", "content": "Be safe."}
    assert records[2]["messages"][2]["content"] == "I can't help with that."
    assert not any("'type'" in m["content"] for r in records for m in r["messages"])


@pytest.mark.parametrize(
    "content, match",
    [
        (
            [{"type": "reasoning", "value": "hmm"}],
            "'reasoning' part, which adaptr does not train yet",
        ),
        ([{"type": "thinking_blocks", "value": "hmm"}], "'thinking_blocks' part; only text parts"),
        ([{"type": "text"}], "is a 'text' part without a 'text' (or 'value') string"),
        ([{"text": "no type"}], "must be a part with a 'type'"),
        ({"unexpected": "object"}, "must be a part with a 'type'"),
    ],
)
def test_parts_that_cannot_train_name_the_part(content, match):
    rec = {
        "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "x"}]
    }
    with pytest.raises(MissingField, match=re.escape(match)) as e:
        fmt("messages", rec)
    assert "messages[0].content" in str(e.value)


# ---- multimodal: refused in one line, naming what was found ----


@pytest.mark.parametrize(
    "record, found",
    [
        # LLaMA-Factory mllm_demo.json: images beside the messages
        ({"messages": [{"role": "user", "content": "Who are they?"},
                       {"role": "assistant", "content": "Kane and Gretzka."}],
          "images": ["mllm_demo_data/1.jpg"]}, "the record's 'images' field holds 1 image"),
        # mllm_audio_demo.json: an <audio> placeholder and audios
        ({"messages": [{"role": "user", "content": "<audio>What's that sound?"},
                       {"role": "assistant", "content": "Glass shattering."}],
          "audios": ["mllm_demo_data/1.mp3", "mllm_demo_data/2.wav"]}, "the record's 'audios' field holds 2 audios"),
        # a placeholder alone (the media list dropped by some converter)
        ({"messages": [{"role": "user", "content": "<image>Describe it."},
                       {"role": "assistant", "content": "A cat."}]}, "messages[0].content holds the placeholder <image>"),
        # OpenAI parts
        ({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is in this image?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]},
            {"role": "assistant", "content": "A cat."}]}, "messages[0].content[1] is an image part (type 'image_url')"),
        ({"messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "UklGR...", "format": "wav"}}]},
            {"role": "assistant", "content": "Hello."}]}, "is an audio part (type 'input_audio')"),
        # LLaMA-Factory v1 parts
        ({"messages": [{"role": "user", "content": [{"type": "video_url", "value": "1.mp4"}]},
                       {"role": "assistant", "content": [{"type": "text", "value": "A goal."}]}]},
         "is a video part (type 'video_url')"),
    ],
)  # fmt: skip
def test_multimodal_records_are_refused(tmp_path, record, found):
    data = jsonl(tmp_path / "mm.jsonl", {"messages": [{"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": "hello"}]}, record)  # fmt: skip
    with pytest.raises(InvalidInputError) as e:
        load_records(data, "messages")
    message = str(e.value)
    assert message.startswith(f"{data} line 2: multimodal training is not supported")
    assert found in message and "\n" not in message


def test_sharegpt_and_alpaca_refuse_media_too():
    with pytest.raises(MultimodalData, match="'images' field holds 1 image"):
        fmt("sharegpt", {"conversations": [{"from": "human", "value": "<image>Who?"},
                                           {"from": "gpt", "value": "Muller."}], "images": ["2.jpg"]})  # fmt: skip
    with pytest.raises(
        MultimodalData, match=re.escape("conversations[0].value holds the placeholder <video>")
    ):
        fmt("sharegpt", {"conversations": [{"from": "human", "value": "<video>What?"},
                                           {"from": "gpt", "value": "A goal."}]})  # fmt: skip
    with pytest.raises(MultimodalData, match="'videos' field holds 1 video"):
        fmt("alpaca", {"instruction": "Describe", "output": "x", "videos": ["1.mp4"]})


def test_placeholders_can_be_kept_as_text_and_empty_media_lists_pass():
    html = {"messages": [{"role": "user", "content": "Which tag embeds a clip?"},
                         {"role": "assistant", "content": "The <video> element."}], "images": []}  # fmt: skip
    with pytest.raises(MultimodalData, match="placeholders=keep"):
        fmt("messages", html)
    out = fmt("messages", html, placeholders="keep")
    assert out["messages"][1]["content"] == "The <video> element."
    with pytest.raises(MissingField, match="option must be refuse or keep"):
        fmt("messages", html, placeholders="drop")


# ---- tool calls ----


def test_openai_tool_calls_train_as_structure():
    out = fmt("messages", COOKBOOK)
    assert out["messages"][1] == {
        "role": "user",
        "content": "What's the weather like in Glasgow, Scotland?",
    }
    assert out["messages"][2] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{**CALL, "id": "call_1"}],
    }
    # the result is named after its call (templates that show names need it)
    assert out["messages"][3] == {"role": "tool", "content": '{"temperature": 11, "unit": "celsius"}',
                                  "tool_call_id": "call_1", "name": "get_current_weather"}  # fmt: skip
    assert json.loads(out["tools"]) == [{"type": "function", "function": WEATHER}]
    flat = fmt(
        "messages", {**COOKBOOK, "tools": [{"type": "function", **WEATHER}]}
    )  # Responses API
    assert json.loads(flat["tools"]) == [{"type": "function", "function": WEATHER}]
    with pytest.raises(
        MissingField, match=re.escape("'tools[0]' must be a function schema with a 'name'")
    ):
        fmt("messages", {**COOKBOOK, "tools": ["get_current_weather"]})


def test_legacy_functions_and_parallel_calls():
    legacy = {  # OpenAI's earlier fine-tuning format
        "messages": [
            {"role": "user", "content": "What is the weather in San Francisco?"},
            {"role": "assistant", "function_call": {"name": "get_current_weather",
                                                    "arguments": '{"location": "San Francisco, USA", "format": "celsius"}'}},
            {"role": "function", "name": "get_current_weather", "content": "21"},
            {"role": "assistant", "content": "21°C.", "weight": 1},
        ],
        "functions": [WEATHER],
    }  # fmt: skip
    out = fmt("messages", legacy)
    assert (
        out["messages"][1]["tool_calls"][0]["function"]["arguments"]["location"]
        == "San Francisco, USA"
    )
    assert out["messages"][2] == {"role": "tool", "content": "21", "name": "get_current_weather"}
    assert json.loads(out["tools"])[0]["function"]["name"] == "get_current_weather"
    parallel = {"messages": [
        {"role": "user", "content": "Weather and time in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}},
            {"id": "b", "type": "function", "function": {"name": "clock", "arguments": ""}}]},
        {"role": "tool", "content": "snow"}, {"role": "tool", "content": "09:00"},
        {"role": "assistant", "content": "Snowing at 09:00."}]}  # fmt: skip
    out = fmt("messages", parallel)
    assert [m.get("name") for m in out["messages"][2:4]] == ["weather", "clock"]
    assert out["messages"][1]["tool_calls"][1]["function"]["arguments"] == {}


def test_llama_factory_v1_tool_call_parts():
    rec = {"messages": [
        {"role": "user", "content": [{"type": "text", "value": "Weather in Glasgow?"}], "loss_weight": 0.0},
        {"role": "assistant", "content": [{"type": "tool_call", "value": CALL_JSON}], "loss_weight": 1.0},
        {"role": "tool", "content": [{"type": "text", "value": "11"}], "loss_weight": 0.0},
        {"role": "assistant", "content": [{"type": "text", "value": "11°C."}], "loss_weight": 1.0}],
        "tools": json.dumps([WEATHER])}  # fmt: skip
    out = fmt("messages", rec)
    assert out["messages"][1] == {"role": "assistant", "content": "", "tool_calls": [CALL]}
    assert out["messages"][2]["name"] == "get_current_weather"
    assert json.loads(out["tools"]) == [{"type": "function", "function": WEATHER}]


@pytest.mark.parametrize(
    "message, match",
    [
        ({"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{oops"}}]},
         "messages[1].tool_calls[0].arguments' is not valid JSON"),
        ({"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "[1, 2]"}}]},
         "messages[1].tool_calls[0].arguments' must be a JSON object"),
        ({"role": "assistant", "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]},
         "messages[1].tool_calls[0].name' is missing"),
        ({"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]},
         "is a user message with tool calls"),
        ({"role": "assistant", "content": "skip me", "weight": 0}, "messages[1].weight' is 0 (do not learn this turn)"),
        ({"role": "assistant"}, "needs 'role' and 'content'"),
    ],
)  # fmt: skip
def test_bad_tool_calls_name_the_field(message, match):
    rec = {
        "messages": [
            {"role": "user", "content": "hi"},
            message,
            {"role": "assistant", "content": "ok"},
        ]
    }
    with pytest.raises(MissingField, match=re.escape(match)):
        fmt("messages", rec)


def test_sharegpt_function_call_and_observation_map_to_openai_shape(tmp_path):
    plain = {"conversations": [{"from": "human", "value": "Define photoshop."},
                               {"from": "gpt", "value": "An image editor."}], "tools": "[]"}  # fmt: skip
    data = jsonl(tmp_path / "glaive.jsonl", plain, {**GLAIVE, "system": "You can call tools."})
    first, second = load_records(data, "sharegpt")
    assert first == {"messages": [{"role": "user", "content": "Define photoshop."},
                                  {"role": "assistant", "content": "An image editor."}]}  # fmt: skip
    assert second["messages"] == [
        {"role": "system", "content": "You can call tools."},
        {"role": "user", "content": "I need the area of a rectangle, 5 by 3 units."},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": "calculate_area", "arguments": {"shape": "rectangle", "dimensions": [5, 3]}}}]},
        {"role": "tool", "content": '{"area": 15}', "name": "calculate_area"},
        {"role": "assistant", "content": "The area of the rectangle is 15 square units."},
    ]  # fmt: skip
    tools = json.loads(second["tools"])
    assert tools[0]["type"] == "function" and tools[0]["function"]["name"] == "calculate_area"
    bad = {
        "conversations": [
            {"from": "human", "value": "x"},
            {"from": "function_call", "value": "area(5, 3)"},
        ]
    }
    with pytest.raises(MissingField, match=re.escape("conversations[1].value' is not valid JSON")):
        fmt("sharegpt", bad)


def test_tool_records_survive_arrow_with_json_for_mixed_types():
    """Arguments and tool schemas differ per record; Arrow merges their keys (filling nulls)
    unless mixed types become JSON, which round-trips each record exactly."""
    from datasets import Dataset

    add = {"messages": [{"role": "user", "content": "2+3?"},
                        {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                            "name": "add", "arguments": '{"a": 2, "b": "3"}'}}]},
                        {"role": "tool", "content": "5"}, {"role": "assistant", "content": "5."}]}  # fmt: skip
    records = [fmt("messages", COOKBOOK), fmt("messages", add), fmt("sharegpt", GLAIVE),
               fmt("messages", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})]  # fmt: skip
    ds = Dataset.from_list(records, on_mixed_types="use_json")
    for i, rec in enumerate(records):
        row = {k: v for k, v in ds[i].items() if v is not None}
        assert row == rec, i


# ---- missing fields say how to map them ----


def test_missing_field_says_how_to_map_it(tmp_path):
    data = jsonl(tmp_path / "d.jsonl", {"conversation": [{"role": "user", "content": "hi"}]})
    with pytest.raises(InvalidInputError) as e:
        load_records(data, "messages")
    assert (
        "line 1: field 'messages' is missing (the messages format needs messages; map another field with --format-option field=NAME)"
        in str(e.value)
    )
    fmt_ = get_formatter("messages")
    try:
        fmt_.format({"conversation": []}, **fmt_.options)
    except MissingField as err:
        assert fmt_.explain(err) == (
            "field 'messages' is missing (the messages format needs messages; "
            "map another field with --format-option field=NAME)"
        )
    with pytest.raises(
        MissingField, match="'dialog' is empty; map another field with --format-option field=NAME"
    ):
        fmt("sharegpt", {"dialog": " "}, field="dialog")
    with pytest.raises(
        MissingField,
        match="'completion' is missing; map another field with --format-option completion_field=NAME",
    ):
        fmt("prompt-completion", {"prompt": "p"})
    with pytest.raises(MissingField) as e:  # alpaca has no option naming its fields
        fmt("alpaca", {"instruction": "i"})
    assert str(e.value) == "field 'output' is missing" and e.value.hint is None
    with pytest.raises(MissingField) as e:  # not a missing field: no mapping hint
        fmt("messages", {"messages": [{"role": "user", "content": "hi"}]})
    assert str(e.value) == "field 'messages' has no assistant turn to learn from"


# ---- the families' templates: tools rendered, assistant text and tool calls trained ----

ARGS_JSON = json.dumps(ARGS, ensure_ascii=False)
LOSS = {
    "qwen": f'<tool_call>\n{{"name": "get_current_weather", "arguments": {ARGS_JSON}}}\n</tool_call><|im_end|>'
    "It is 11°C in Glasgow.<|im_end|>",
    "llama": f' [TOOL_CALLS] [{{"name": "get_current_weather", "arguments": {ARGS_JSON}}}] <|endoftext|>'
    " It is 11°C in Glasgow. <|endoftext|>",
    "deepseek": f'<tool_call>{{"name": "get_current_weather", "arguments": {ARGS_JSON}}}</tool_call><|endoftext|>'
    "It is 11°C in Glasgow.<|endoftext|>",
}  # fmt: skip
LOSS["gpt-neox"] = LOSS["deepseek"]


@pytest.mark.parametrize("family", sorted(LOSS))
def test_family_templates_render_tools_and_train_calls(family):
    from trl.chat_template_utils import (
        is_chat_template_prefix_preserving,
        is_chat_template_stop_token_trained,
        supports_tool_calling,
    )

    tok = family_tokenizer(family)
    rec = fmt("messages", COOKBOOK)
    text = chat.render(tok, rec)
    assert (
        WEATHER["description"] in text and '{"temperature": 11' in text
    )  # the tools and the result
    assert masked(tok, rec) == LOSS[family]  # exactly the assistant's calls and answer
    chat.check_template(tok, rec)
    chat.check_template(tok, fmt("sharegpt", GLAIVE))
    assert supports_tool_calling(tok) and is_chat_template_prefix_preserving(tok)
    assert is_chat_template_stop_token_trained(tok)


def test_chatml_lays_out_tools_as_qwen2_5_does():
    tok = family_tokenizer("qwen")
    text = chat.render(tok, fmt("messages", COOKBOOK), add_generation_prompt=True)
    assert text.startswith(
        "<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n\nYou may call one or more functions"
    )
    assert f"<tools>\n{json.dumps({'type': 'function', 'function': WEATHER})}\n</tools>" in text
    assert (
        "<|im_start|>assistant\n<tool_call>\n"
        f'{{"name": "get_current_weather", "arguments": {ARGS_JSON}}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"temperature": 11, "unit": "celsius"}\n</tool_response><|im_end|>\n'
    ) in text
    assert text.endswith("It is 11°C in Glasgow.<|im_end|>\n<|im_start|>assistant\n")


def test_trl_tokenization_masks_exactly_the_assistant_part(tmp_path):
    """SFTTrainer's own tokenization of a mixed dataset: the labels are the assistant text and
    tool calls, nothing of the system, user, tools or tool results."""
    import warnings

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from adaptr.tiny import make_model

    tok = family_tokenizer("qwen")
    plain = {
        "messages": [
            {"role": "user", "content": "Say hi."},
            {"role": "assistant", "content": "Hi!"},
        ]
    }
    records = [fmt("messages", COOKBOOK), fmt("sharegpt", GLAIVE), fmt("messages", plain)]
    ds = Dataset.from_list(records, on_mixed_types="use_json")
    args = SFTConfig(output_dir=str(tmp_path / "out"), assistant_only_loss=True, report_to="none",
                     use_cpu=True, bf16=False, max_steps=1, disable_tqdm=True, max_length=None)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = SFTTrainer(
            model=make_model("qwen2"), args=args, train_dataset=ds, processing_class=tok
        )
    got = [tok.decode([t for t in row["labels"] if t != -100]) for row in trainer.train_dataset]
    assert got == [
        LOSS["qwen"],
        '<tool_call>\n{"name": "calculate_area", "arguments": {"shape": "rectangle", "dimensions": [5, 3]}}'
        "\n</tool_call><|im_end|>The area of the rectangle is 15 square units.<|im_end|>",
        "Hi!<|im_end|>",
    ]


# ---- a template that cannot train the record is a clear one-line error ----

DROPS_TOOL_RESULTS = (
    "{% for m in messages %}{% if m['role'] != 'tool' %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}"
    "{% for c in m['tool_calls'] or [] %}{{ c.function | tojson }}{% endfor %}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}{% endif %}{% endfor %}"
    "{% for t in tools or [] %}{{ t | tojson }}{% endfor %}"
)
CALLS_OUTSIDE_LOSS = DROPS_TOOL_RESULTS.replace(
    "{% if m['role'] != 'tool' %}", "{% if true %}"
).replace(
    "{{ m['content'] }}{% for c in m['tool_calls'] or [] %}{{ c.function | tojson }}{% endfor %}<|im_end|>{% endgeneration %}",
    "{{ m['content'] }}<|im_end|>{% endgeneration %}{% for c in m['tool_calls'] or [] %}{{ c.function | tojson }}{% endfor %}",
)
NAMES_ONLY = DROPS_TOOL_RESULTS.replace("{% if m['role'] != 'tool' %}", "{% if true %}").replace(
    "{{ c.function | tojson }}", "{{ c.function.name }}"
)
LOSS_ON_ALL = "{% generation %}" + DROPS_TOOL_RESULTS.replace("{% if m['role'] != 'tool' %}", "{% if true %}").replace(
    "{% generation %}", "").replace("{% endgeneration %}", "") + "{% endgeneration %}"  # fmt: skip


@pytest.mark.parametrize(
    "template, aol, match",
    [
        (None, False, "the chat template ignores the 'tools' list"),  # adaptr.tiny's plain ChatML
        (None, True, "the chat template ignores the 'tools' list"),  # no markers: turns found by rendering
        (DROPS_TOOL_RESULTS, True, "the chat template drops the content of message 4 (tool)"),
        (NAMES_ONLY, True, "drops the arguments of the tool calls of message 3"),
        (CALLS_OUTSIDE_LOSS, True, "leave the tool calls of message 3 (assistant) out of the loss"),
        (LOSS_ON_ALL, True, "put message 1 (system) into the loss"),
        ("{{ raise_exception('Tool role not supported') }}", False, "cannot render this conversation (TemplateError: Tool role not supported)"),
    ],
)  # fmt: skip
def test_templates_that_cannot_train_tools_are_refused(template, aol, match):
    tok = make_tokenizer()
    if template:
        tok.chat_template = template
    with pytest.raises(InvalidInputError) as e:
        chat.check_template(tok, fmt("messages", COOKBOOK), assistant_only_loss=aol)
    assert match in str(e.value) and "\n" not in str(e.value)


def test_check_templates_picks_records_that_show_each_kind_of_turn():
    tok = make_tokenizer()  # renders plain chats, ignores tools
    plain = fmt(
        "messages",
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    )
    chat.check_templates(tok, [plain] * 3, assistant_only_loss=False)
    chat.check_templates(tok, [plain], assistant_only_loss=True)  # no markers: found by rendering
    with pytest.raises(
        InvalidInputError, match="^record 3: the chat template ignores the 'tools' list"
    ):
        chat.check_templates(
            tok, [plain, plain, fmt("messages", COOKBOOK)], assistant_only_loss=False
        )
    tok.chat_template = None
    with pytest.raises(InvalidInputError, match="has no chat template"):
        chat.check_template(tok, plain)


# ---- the CLI ----


def test_train_refuses_a_multimodal_file_in_one_line(cli, home, tmp_path, tiny_llama):
    data = tmp_path / "mllm_demo.json"
    data.write_text(json.dumps([{"messages": [{"content": "<image>Who are they?", "role": "user"},
                                              {"content": "Kane and Gretzka.", "role": "assistant"}],
                                 "images": ["mllm_demo_data/1.jpg"]}]))  # fmt: skip
    refused(cli, home, None, "train", "--base", str(tiny_llama), "--data", str(data), "--format", "messages",
            "--name", "mm", match="record 1: multimodal training is not supported")  # fmt: skip
    code, out, _ = cli("formatters", "--json")
    listed = {f["name"]: f for f in json.loads(out)["formatters"]}
    assert code == 0 and listed["messages"]["options"] == {
        "field": "messages",
        "placeholders": "refuse",
    }
    assert not any("seeds" in f["description"] for f in listed.values())


# ---- per-turn loss switches: honoured as "every assistant turn is learned", else refused ----

DATA = Path(__file__).parent / "data"


def two_turns(**switches) -> dict:
    return {"messages": [{"role": "user", "content": "What's the capital of France?"},
                         {"role": "assistant", "content": "Paris", **switches},
                         {"role": "user", "content": "Can you be more sarcastic?"},
                         {"role": "assistant", "content": "Paris, as if everyone doesn't know that already."}]}  # fmt: skip


@pytest.mark.parametrize(
    "switches, match",
    [
        ({"weight": "0"}, "'messages[1].weight' must be 0 or 1 (OpenAI's values: learn the turn or not), got '0'"),
        ({"weight": False}, "'messages[1].weight' must be 0 or 1 (OpenAI's values: learn the turn or not), got False"),
        ({"weight": 0.5}, "'messages[1].weight' must be 0 or 1 (OpenAI's values: learn the turn or not), got 0.5"),
        ({"weight": 1.0}, "'messages[1].weight' must be 0 or 1"),  # OpenAI's weight is an integer
        ({"loss_weight": 0.5}, "'messages[1].loss_weight' must be 0 or 1 (LLaMA-Factory's values"),
        ({"weight": 0}, "'messages[1].weight' is 0 (do not learn this turn), which adaptr cannot honour"),
        ({"train": False}, "'messages[1].train' is false (do not learn this turn), which adaptr cannot honour"),
        ({"train": "false"}, "'messages[1].train' must be true or false (axolotl's per-turn switch), got 'false'"),
        ({"train_detail": [{"begin_offset": 0, "end_offset": 3, "train": False}]},
         "'messages[1].train_detail' (axolotl's per-character loss spans) cannot be honoured"),
    ],
)  # fmt: skip
def test_loss_switches_are_honoured_or_refused_naming_the_message(switches, match):
    with pytest.raises(MissingField, match=re.escape(match)):
        fmt("messages", two_turns(**switches))
    with pytest.raises(
        MissingField, match=re.escape(match.replace("messages[1]", "conversations[1]"))
    ):
        fmt("sharegpt", {"conversations": [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"],
                                            **{k: v for k, v in m.items() if k not in ("role", "content")}}
                                           for m in two_turns(**switches)["messages"]]})  # fmt: skip


def test_switches_that_agree_with_what_trains_pass():
    assert fmt("messages", two_turns(weight=1)) == fmt("messages", two_turns())
    assert fmt("messages", two_turns(train=True)) == fmt("messages", two_turns())
    user_on = {
        "messages": [
            {"role": "user", "content": "hi", "weight": 1},
            {"role": "assistant", "content": "yo"},
        ]
    }
    with pytest.raises(
        MissingField,
        match=re.escape(
            "'messages[0].weight' is 1 on a user message: adaptr learns assistant turns only"
        ),
    ):
        fmt("messages", user_on)  # fmt: skip
    user_on["messages"][0] = {"role": "user", "content": "hi", "train": True}
    with pytest.raises(
        MissingField, match=re.escape("'messages[0].train' is true on a user message")
    ):
        fmt("messages", user_on)


def test_openai_weights_and_axolotl_train_files():
    with pytest.raises(InvalidInputError) as e:  # line 2 asks not to learn "William Shakespeare"
        load_records(DATA / "openai_weights.jsonl", "messages")
    assert (
        "openai_weights.jsonl line 2: field 'messages[2].weight' is 0 (do not learn this turn)"
        in str(e.value)
    )
    with pytest.raises(InvalidInputError) as e:
        load_records(DATA / "axolotl_train_false.jsonl", "messages")
    assert "axolotl_train_false.jsonl line 2: field 'messages[1].train' is false" in str(e.value)
    first = fmt(
        "messages", json.loads((DATA / "axolotl_train_false.jsonl").read_text().splitlines()[0])
    )
    assert [set(m) for m in first["messages"]] == [{"role", "content"}] * 5  # the switches agreed


# ---- a speaker's name is kept, and a template that does not show it is refused ----

NAMED = json.loads((DATA / "openai_names.jsonl").read_text())
NAMES_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}{% if m['name'] %} {{ m['name'] }}{% endif %}{{ '\\n' }}"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_names_are_kept_and_a_template_that_drops_them_is_refused(cli, home, tiny_llama, tmp_path):
    out = fmt("messages", NAMED)
    assert [m.get("name") for m in out["messages"]] == [
        None,
        "example_user",
        "example_assistant",
        None,
        None,
    ]
    tok = make_tokenizer()
    with pytest.raises(InvalidInputError) as e:
        chat.check_template(tok, out)
    assert str(e.value).startswith(
        "the chat template ignores the name 'example_user' of message 2 (system), so the model would not see who speaks"
    )
    tok.chat_template = NAMES_TEMPLATE
    chat.check_template(tok, out, assistant_only_loss=False)
    assert "<|im_start|>system example_user\n" in chat.render(tok, out)
    data = DATA / "openai_names.jsonl"
    refused(cli, home, None, "train", "--base", str(tiny_llama), "--data", str(data), "--format", "messages",
            "--name", "n", "--preview", match="record 1: the chat template ignores the name 'example_user' of message 2")  # fmt: skip
    template = tmp_path / "names.jinja"
    template.write_text(NAMES_TEMPLATE)
    code, shown, err = cli("train", "--base", str(tiny_llama), "--data", str(data), "--format", "messages",
                           "--name", "n", "--preview", "--set", f"sft.chat_template_path={template}")  # fmt: skip
    assert code == 0, err
    assert "<|im_start|>system example_assistant\nThings working well together" in shown
    with pytest.raises(
        MissingField, match=re.escape("'messages[0].name' must be a speaker's name, got 7")
    ):
        fmt("messages", {"messages": [{"role": "user", "content": "hi", "name": 7}, {"role": "assistant", "content": "yo"}]})  # fmt: skip


def test_float_content_is_refused_except_as_a_tool_result():
    rec = {
        "messages": [{"role": "user", "content": "Price?"}, {"role": "assistant", "content": 1.5}]
    }
    with pytest.raises(
        MissingField, match=re.escape("'messages[1].content' is the number 1.5, not text")
    ):
        fmt("messages", rec)
    rec["messages"][1:] = [{"role": "assistant", "tool_calls": [{"function": {"name": "price", "arguments": "{}"}}]},
                           {"role": "tool", "content": 1.5}, {"role": "assistant", "content": "1.50 euros."}]  # fmt: skip
    assert fmt("messages", rec)["messages"][2]["content"] == "1.5"
