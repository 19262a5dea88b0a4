"""adaptr serve's structured output through the official openai client: response_format
json_schema (strict) and json_object, streamed or not, per adapter, beside plain requests,
and the client's own ``parse`` with a pydantic model."""

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pydantic
import pytest

from helpers import client, post_raw, serve_tiny

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}
STRICT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}  # fmt: skip
QUESTIONS = ["Who is it?", "你好", "Describe x", "abc"]


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=10)
    age: int = pydantic.Field(ge=0, le=150)
    ok: bool


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("structured")
    with serve_tiny(root, [("a", 1), ("b", 2)], max_adapters=4) as (reg, url, app):
        yield url, client(url, timeout=120)


def ask(c, model, question, **kw):
    return c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], **kw
    )


def test_strict_schema_answers_validate_per_adapter_beside_plain_requests(served):
    _, c = served
    plain = {(m, q): ask(c, m, q, max_tokens=12).choices[0].message.content
             for m in ("tiny", "a") for q in QUESTIONS[:2]}  # fmt: skip
    jobs = [(m, q, STRICT) for m in ("tiny", "a", "b") for q in QUESTIONS]
    jobs += [(m, q, None) for (m, q) in plain]
    with ThreadPoolExecutor(len(jobs)) as pool:  # all at once: they share batches
        answers = list(pool.map(
            lambda j: ask(c, j[0], j[1], max_tokens=120 if j[2] else 12,
                          **({"response_format": j[2]} if j[2] else {})), jobs,
        ))  # fmt: skip
    for (model, _, fmt), answer in zip(jobs, answers, strict=True):
        choice = answer.choices[0]
        if fmt is None:
            continue
        assert choice.finish_reason == "stop", (model, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    got = [a.choices[0].message.content for (_, _, f), a in zip(jobs, answers, strict=True) if f is None]  # fmt: skip
    assert got == list(plain.values())


def test_streamed_deltas_join_into_valid_json(served):
    _, c = served
    stream = ask(c, "a", "Describe x", max_tokens=120, response_format=STRICT, stream=True)
    pieces, finish = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop" and sum(1 for p in pieces if p) > 1
    jsonschema.validate(json.loads("".join(pieces)), PERSON)


def test_the_clients_parse_with_a_pydantic_model(served):
    _, c = served
    for model in ("tiny", "b"):
        answer = c.chat.completions.parse(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=120,
            response_format=Person,
        )  # fmt: skip
        parsed = answer.choices[0].message.parsed
        assert isinstance(parsed, Person) and 0 <= parsed.age <= 150


def test_json_object_on_chat_and_completions_and_n_choices(served):
    _, c = served
    chat = ask(c, "a", "abc", max_tokens=120, n=3, temperature=1.0, seed=3,
               response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object", "properties": {"k": {"enum": [1, 2, 3]}}, "required": ["k"], "additionalProperties": False}}})  # fmt: skip
    assert [json.loads(ch.message.content)["k"] in (1, 2, 3) for ch in chat.choices] == [True] * 3
    done = c.completions.create(
        model="tiny", prompt="x", max_tokens=64, extra_body={"response_format": {"type": "json_object"}}
    )  # fmt: skip
    text = done.choices[0].text
    assert text.startswith("{")
    if done.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_max_tokens_too_small_finishes_with_length(served):
    _, c = served
    answer = ask(c, "a", "hi", max_tokens=5, response_format=STRICT)
    assert answer.choices[0].finish_reason == "length"
    assert answer.choices[0].message.content.startswith("{")  # incomplete JSON, as OpenAI's


@pytest.mark.parametrize(
    "fmt, says",
    [
        (
            {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "strin"}}},
            "cannot be compiled",
        ),  # fmt: skip
        (
            {"type": "json_schema", "json_schema": {"name": "p", "schema": {"$ref": "#/nope"}}},
            "cannot be compiled",
        ),  # fmt: skip
        ({"type": "regex"}, "'response_format' must be"),
        ({"type": "json_schema", "json_schema": {"name": "p", "schema": 3}}, "schema"),
    ],
)
def test_bad_or_uncompilable_formats_are_400_naming_response_format(served, fmt, says):
    _, c = served
    with pytest.raises(openai.BadRequestError) as e:
        ask(c, "a", "hi", max_tokens=8, response_format=fmt)
    assert e.value.body["param"] == "response_format" and says in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        ask(c, "a", "hi", max_tokens=8, response_format=STRICT, extra_body={"ignore_eos": True})
    assert e.value.body["param"] == "ignore_eos"


def test_a_schema_too_complex_to_follow_is_400_naming_response_format(served):
    url, _ = served
    deep = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}  # endless
    body = {"model": "a", "prompt": "x", "max_tokens": 8,
            "response_format": {"type": "json_schema", "json_schema": {"name": "d", "schema": deep}}}  # fmt: skip
    reply = post_raw(url, "/completions", json.dumps(body))
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "response_format" and "could not be followed" in error["message"]
