"""Structured output in the engine (adaptr.serving.constrain): with a random tiny model every
constrained answer is JSON that validates against its schema, beside unconstrained rows
that get exactly what they get alone; through the scheduler and AdapterServer's API."""

import json

import jsonschema
import pytest
import torch

from adaptr.errors import InvalidInputError
from adaptr.registry import Registry
from adaptr.serving import AdapterServer
from adaptr.serving.constrain import (
    GrammarError,
    ResponseFormat,
    compile_format,
    parse_response_format,
)
from adaptr.tiny import save_tiny_base

from helpers import LORA, random_lora

WAIT_S = 120
PROMPTS = ["Hello there", "你好", "Quote: Knowledge", "x"]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}
AS_SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}  # fmt: skip
LOGPROB_TOL = 1e-5  # float32 log-softmax of the same logits


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("constrain")
    base = save_tiny_base(root / "base", "llama", initializer_range=0.2)
    reg = Registry(root / "home")
    reg.add_base("tiny", base)
    reg.add("a", random_lora(base, root / "a", 1, **LORA), base="tiny")
    server = AdapterServer(reg, "tiny")
    yield server
    assert server.scheduler.close(WAIT_S)


def valid(text: str, schema: dict = PERSON) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


# ------------------------------------------------------------------ parsing
@pytest.mark.parametrize(
    "value, kind",
    [(None, None), ({"type": "text"}, None), ({"type": "json_object"}, "json_object"),
     (AS_SCHEMA, "json_schema")],
)  # fmt: skip
def test_response_formats_parse(value, kind):
    fmt = parse_response_format(value)
    assert (fmt.kind if fmt else None) == kind
    if kind == "json_schema":
        assert fmt.name == "person" and fmt.strict and json.loads(fmt.schema) == PERSON


@pytest.mark.parametrize(
    "value, says",
    [
        ({"type": "regex"}, "'response_format' must be"),
        ("json", "'response_format' must be"),
        ({"type": "json_object", "schema": {}}, "'response_format' must be"),
        ({"type": "json_schema"}, "takes 'json_schema'"),
        ({"type": "json_schema", "json_schema": {"schema": PERSON, "x": 1}}, "does not take x"),
        ({"type": "json_schema", "json_schema": {"name": "a b", "schema": PERSON}}, "name"),
        ({"type": "json_schema", "json_schema": {"schema": PERSON, "strict": "yes"}}, "strict"),
        ({"type": "json_schema", "json_schema": {"name": "p"}}, "schema"),
    ],
)
def test_bad_response_formats_say_what_is_wrong(value, says):
    with pytest.raises(InvalidInputError, match=says):
        parse_response_format(value)


@pytest.mark.parametrize(
    "schema, says",
    [({"type": "strin"}, "Invalid type"), ({"$ref": "#/$defs/nope"}, "nope")],
)
def test_a_schema_that_cannot_compile_says_why(server, schema, says):
    with pytest.raises(InvalidInputError, match=f"cannot be compiled.*{says}"):
        compile_format(server.tokenizer, 260, ResponseFormat.json_schema(schema))
    with pytest.raises(InvalidInputError, match="cannot be compiled"):
        server.generate(["x"], response_format=ResponseFormat.json_schema(schema))


def test_compiled_grammars_are_cached_by_schema(server):
    one = compile_format(server.tokenizer, 260, ResponseFormat.json_schema(PERSON, "a"))
    again = compile_format(server.tokenizer, 260, ResponseFormat.json_schema(PERSON, "b", False))
    assert one is again
    assert one is not compile_format(server.tokenizer, 260, ResponseFormat("json_object"))


# ------------------------------------------------------------------- engine
def test_mixed_batch_constrained_rows_validate_and_the_others_are_unchanged(server):
    alone = {(p, a): server.generate([p], [a], max_new_tokens=24)[0] for p in PROMPTS[:2] for a in (None, "a")}  # fmt: skip
    scheduler = server.scheduler
    scheduler.hold()  # all start in one batch
    try:
        free = [server.submit(p, a, max_new_tokens=24) for (p, a) in alone]
        bound = [
            server.submit(p, a, max_new_tokens=200, response_format=AS_SCHEMA)
            for p in PROMPTS for a in (None, "a")
        ]  # fmt: skip
    finally:
        scheduler.release()
    for r in free + bound:
        r.wait(WAIT_S)
    assert scheduler.most_rows >= len(free) + len(bound)  # they ran as one batch
    assert [r.text for r in free] == list(alone.values())
    answers = [valid(r.text) for r in bound]
    assert all(r.finish == "stop" for r in bound)
    assert len({json.dumps(a) for a in answers}) > 1  # the adapters and prompts differ
    assert list(answers[0]) == list(PERSON["properties"])  # the schema's key order


def test_sampling_with_top_p_stays_valid_and_a_seed_reproduces_it(server):
    kw = dict(max_new_tokens=200, do_sample=True, temperature=1.0, top_p=0.9, response_format=AS_SCHEMA)  # fmt: skip
    first = server.generate(PROMPTS, ["a", None, "a", None], seed=7, **kw)
    for text in first:
        valid(text)
    assert server.generate(PROMPTS, ["a", None, "a", None], seed=7, **kw) == first


def test_log_probabilities_stay_the_models(server):
    from adaptr.serving.requests import Request

    ids = server.tokenizer("Hello there").input_ids
    grammar = compile_format(server.tokenizer, 260, parse_response_format(AS_SCHEMA))
    req = Request(ids, "a", 200, logprobs=2, keep_logits=True, constraint=grammar.guide())
    server.enqueue([req])
    req.wait(WAIT_S)
    valid(req.text)
    assert len(req.token_logprobs) == len(req.logits) == req.completion_tokens
    for entry, logits in zip(req.token_logprobs, req.logits, strict=True):
        model = torch.log_softmax(logits, -1)
        assert abs(entry.logprob - float(model[entry.token])) < LOGPROB_TOL
        assert entry.top[0][0] == int(model.argmax())  # the model's best, allowed or not


def test_max_tokens_too_small_ends_with_length_and_a_prefix(server):
    whole = server.submit("你好", "a", max_new_tokens=200, response_format=AS_SCHEMA).wait(WAIT_S)
    cut = server.submit("你好", "a", max_new_tokens=8, response_format=AS_SCHEMA).wait(WAIT_S)
    assert whole.finish == "stop" and cut.finish == "length"
    assert whole.tokens[:8] == cut.tokens and whole.text.startswith(cut.text)
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut.text)


def test_json_object_gives_an_object(server):
    fmt = {"type": "json_object"}
    for adapter in (None, "a"):
        req = server.submit("x", adapter, max_new_tokens=64, response_format=fmt).wait(WAIT_S)
        assert req.finish == "stop" and isinstance(json.loads(req.text), dict)
    long = server.submit("Hello there", max_new_tokens=32, response_format=fmt).wait(WAIT_S)
    assert long.text.startswith("{")  # (a random model's string may outrun max_tokens)


def test_stream_and_chat_take_a_response_format(server):
    pieces = list(server.stream("Quote: Knowledge", "a", max_new_tokens=200, response_format=AS_SCHEMA))  # fmt: skip
    assert len(pieces) > 1
    valid("".join(pieces))
    chat = server.chat([[{"role": "user", "content": "hi"}]], max_new_tokens=200, response_format=AS_SCHEMA)  # fmt: skip
    valid(chat[0])


def test_response_format_with_static_generate_arguments_is_refused(server):
    with pytest.raises(InvalidInputError, match="response_format runs through the scheduler"):
        server.generate(["x"], response_format=AS_SCHEMA, num_beams=2)
    assert server.generate(["x"], response_format=None, max_new_tokens=4) == server.generate(["x"], max_new_tokens=4)  # fmt: skip


def test_a_grammar_that_fails_while_generating_fails_only_its_request(server):
    endless = ResponseFormat.json_schema({"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]})  # fmt: skip
    alone = server.generate(["abc"], max_new_tokens=16)[0]
    server.scheduler.hold()
    try:
        failing = server.submit("x", "a", max_new_tokens=16, response_format=endless)
        plain = server.submit("abc", max_new_tokens=16)
    finally:
        server.scheduler.release()
    with pytest.raises(GrammarError, match="could not be followed") as e:
        failing.wait(WAIT_S)
    assert e.value.param == "response_format"
    assert plain.wait(WAIT_S).text == alone


def test_a_bpe_tokenizer_with_merges_gives_valid_json(tmp_path):
    """Tokens of several characters (quotes, digits and letters merged), as real vocabularies
    have: the masks are still exactly what the schema allows."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from adaptr.tiny import SPECIAL_TOKENS, make_tokenizer

    text = [json.dumps({"name": f"n{i}x", "age": i % 150, "tags": ["x", "y"][: i % 3], "ok": i % 2 == 0}) for i in range(400)]  # fmt: skip
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|pad|>")  # fmt: skip
    tok.chat_template = make_tokenizer().chat_template
    assert max(len(t) for t in tok.get_vocab()) > 3  # merged tokens
    base = save_tiny_base(tmp_path / "base", "llama", initializer_range=0.2, vocab_size=len(tok) + 8)  # fmt: skip
    tok.save_pretrained(base)
    reg = Registry(tmp_path / "home")
    reg.add_base("bpe", base)
    server = AdapterServer(reg, "bpe")
    try:
        answers = server.generate(PROMPTS, max_new_tokens=120, response_format=AS_SCHEMA)
        for text in answers:
            valid(text)
    finally:
        assert server.scheduler.close(WAIT_S)
