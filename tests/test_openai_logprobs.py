"""adaptr serve's log-probabilities (completions with echo, chat), token-id and batched
prompts, ``n`` choices and model retrieval, against PEFT computed directly.

Log-probabilities are compared with PEFT's log-softmax within 1e-4 (absolute; float32)."""

import httpx
import openai
import pytest

from helpers import client, serve_tiny

TOL = 1e-4
SPEC = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "down_proj"]}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("logprobs")
    with serve_tiny(root, [("a", 1, SPEC), ("b", 2, SPEC)], max_adapters=4) as (reg, url, app):
        yield reg, url, client(url, timeout=120)


def reference(reg, ref):
    """(model, tokenizer) of ``ref`` alone with PEFT (None: the bare base)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adaptr import inference

    if ref is not None:
        model, tok, _ = inference.load(reg, [ref])
        return model.eval(), tok
    path = reg.base_path("tiny")
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def peft_logprobs(model, ids: list[int]):
    """Log-softmax of every position's logits for the sequence ``ids``: ``[len, vocab]``."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)


def greedy(model, tok, ids: list[int], n: int) -> list[int]:
    """The ``n`` greedy tokens after ``ids`` (stopping after an EOS, which is kept)."""
    out = list(ids)
    for _ in range(n):
        token = int(peft_logprobs(model, out)[-1].argmax())
        out.append(token)
        if token == tok.eos_token_id:
            break
    return out[len(ids) :]


@pytest.mark.parametrize("ref", ["a", "b", None])
def test_completion_logprobs_equal_peft(served, ref):
    reg, _, api = served
    model, tok = reference(reg, ref)
    prompt = "Hello there"
    ids = tok(prompt).input_ids
    want = greedy(model, tok, ids, 5)
    lp = peft_logprobs(model, ids + want)
    out = api.completions.create(model=ref or "tiny", prompt=prompt, max_tokens=5, logprobs=3)
    got = out.choices[0].logprobs
    assert got.tokens == [tok.decode([t]) for t in want]
    for k, token in enumerate(want):
        row = lp[len(ids) + k - 1]
        assert got.token_logprobs[k] == pytest.approx(float(row[token]), abs=TOL)
        top_values, top_ids = row.topk(3)
        top = got.top_logprobs[k]
        seen = set()
        for t, v in zip(top_ids.tolist(), top_values.tolist(), strict=True):
            text = tok.decode([t])
            if text not in seen:  # a text's first (likeliest) token is the one shown
                assert top[text] == pytest.approx(v, abs=TOL)
            seen.add(text)
        assert max(top.values()) == pytest.approx(got.token_logprobs[k], abs=TOL)  # greedy
    offsets = got.text_offset
    assert offsets[0] == 0 and offsets[1:] == [
        offsets[i] + len(got.tokens[i]) for i in range(len(offsets) - 1)
    ]
    # vLLM's return_tokens_as_token_ids: tokens named by id, none collapsing in the top 3
    named = api.completions.create(
        model=ref or "tiny", prompt=prompt, max_tokens=5, logprobs=3,
        extra_body={"return_tokens_as_token_ids": True},
    ).choices[0].logprobs  # fmt: skip
    assert named.tokens == [f"token_id:{t}" for t in want] and named.text_offset == offsets
    assert named.token_logprobs == got.token_logprobs
    assert all(len(top) == 3 for top in named.top_logprobs)  # the chosen one is among the 3


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_scores_the_prompt_like_peft(served, max_tokens):
    """What lm-evaluation-harness's local-completions sends for loglikelihood: token ids,
    echo, logprobs=1, max_tokens=1 (or 0: the prompt only)."""
    reg, url, _ = served
    model, tok = reference(reg, "a")
    ids = tok("The registry stores adapters").input_ids
    lp = peft_logprobs(model, ids)
    body = {"model": "a", "prompt": [ids], "echo": True, "logprobs": 1,
            "max_tokens": max_tokens, "temperature": 0, "seed": 1234}  # fmt: skip
    r = httpx.post(f"{url}/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    got = choice["logprobs"]
    assert len(got["token_logprobs"]) == len(ids) + max_tokens
    assert got["token_logprobs"][0] is None and got["top_logprobs"][0] is None
    for j in range(1, len(ids)):
        assert got["token_logprobs"][j] == pytest.approx(float(lp[j - 1, ids[j]]), abs=TOL)
        best = float(lp[j - 1].max())
        assert max(got["top_logprobs"][j].values()) == pytest.approx(best, abs=TOL)
    if max_tokens:
        token = int(lp[-1].argmax())  # the generated one, EOS or not
        assert got["token_logprobs"][-1] == pytest.approx(float(lp[-1, token]), abs=TOL)
    assert choice["text"].startswith(tok.decode(ids, skip_special_tokens=True))


def test_n_choices_share_one_scoring_of_their_prompt(served):
    """echo + logprobs with n: the prompt is scored once (by its first choice), every choice
    shows it; streamed too."""
    reg, url, api = served
    model, tok = reference(reg, "a")
    ids = tok("Scored once").input_ids
    lp = peft_logprobs(model, ids)
    kw = dict(model="a", prompt="Scored once", max_tokens=2, logprobs=0, echo=True, n=3)
    firsts = [c.logprobs.token_logprobs[: len(ids)] for c in api.completions.create(**kw).choices]
    assert firsts[0] == firsts[1] == firsts[2] and firsts[0][0] is None
    for j in range(1, len(ids)):
        assert firsts[0][j] == pytest.approx(float(lp[j - 1, ids[j]]), abs=TOL)
    streamed = [[], [], []]
    for chunk in api.completions.create(stream=True, **kw):
        c = chunk.choices[0]
        if c.logprobs:
            streamed[c.index] += c.logprobs.token_logprobs
    assert [s[: len(ids)] for s in streamed] == firsts


def test_stream_logprobs_and_echo_add_up_to_the_whole(served):
    _, _, api = served
    kw = dict(model="b", prompt="Once upon a time", max_tokens=8, logprobs=2, echo=True)
    whole = api.completions.create(**kw).choices[0]
    chunks = list(api.completions.create(stream=True, **kw))
    text = "".join(c.choices[0].text for c in chunks)
    parts = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert text == whole.text
    for key in ("tokens", "token_logprobs", "text_offset"):
        assert [x for p in parts for x in getattr(p, key)] == getattr(whole.logprobs, key), key


def test_chat_logprobs_equal_peft_streamed_or_not(served):
    reg, _, api = served
    model, tok = reference(reg, "b")
    messages = [{"role": "user", "content": "Say something"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False).input_ids
    want = greedy(model, tok, ids, 6)
    lp = peft_logprobs(model, ids + want)
    kw = dict(model="b", messages=messages, max_tokens=6, logprobs=True, top_logprobs=2)
    whole = api.chat.completions.create(**kw).choices[0]
    content = whole.logprobs.content
    assert [c.token for c in content] == [tok.decode([t]) for t in want]
    for k, (c, token) in enumerate(zip(content, want, strict=True)):
        assert c.logprob == pytest.approx(float(lp[len(ids) + k - 1, token]), abs=TOL)
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token  # greedy
        assert bytes(c.bytes) == c.token.encode()
    streamed = [
        e.model_dump()
        for chunk in api.chat.completions.create(stream=True, **kw)
        if chunk.choices and chunk.choices[0].logprobs
        for e in chunk.choices[0].logprobs.content
    ]
    assert streamed == [c.model_dump() for c in content]
    named = (
        api.chat.completions.create(extra_body={"return_tokens_as_token_ids": True}, **kw)
        .choices[0]
        .logprobs.content
    )
    assert [c.token for c in named] == [f"token_id:{t}" for t in want]
    assert [c.bytes for c in named] == [c.bytes for c in content]


def test_token_prompts_prompt_lists_and_n(served):
    reg, _, api = served
    _, tok = reference(reg, None)
    one = api.completions.create(model="a", prompt="Hello there", max_tokens=6).choices[0].text
    ids = tok("Hello there").input_ids
    other = api.completions.create(model="a", prompt="Good night", max_tokens=6).choices[0].text
    for prompt in (ids, [ids]):
        out = api.completions.create(model="a", prompt=prompt, max_tokens=6)
        assert [c.text for c in out.choices] == [one]
    out = api.completions.create(
        model="a", prompt=["Hello there", "Good night"], max_tokens=6, n=2, logprobs=0
    )
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == [one, one, other, other]  # greedy: n alike
    assert out.usage.prompt_tokens == len(ids) + len(tok("Good night").input_ids)
    # the generated tokens, an EOS that ended a choice counted (as vLLM does): one logprob each
    assert out.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in out.choices) > 0
    # sampled with a seed: choice j is what n=1 gives with seed + j
    kw = dict(model="b", prompt="Once", max_tokens=8, temperature=1.0)
    many = api.completions.create(n=3, seed=7, **kw).choices
    alone = [api.completions.create(seed=7 + j, **kw).choices[0].text for j in range(3)]
    assert [c.text for c in many] == alone and len(set(alone)) > 1
    # streamed, the chunks carry each choice's index
    chunks = list(api.completions.create(n=2, seed=7, stream=True, **kw))
    texts = ["", ""]
    for c in chunks:
        texts[c.choices[0].index] += c.choices[0].text
    assert texts == alone[:2]
    ends = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    assert len(ends) == 2


def test_model_retrieval_and_unknown_routes_are_openai_shaped(served):
    _, url, api = served
    assert api.models.retrieve("a@1").id == "a@1"
    assert api.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as e:
        api.models.retrieve("nope@3")
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"
    root = url.removesuffix("/v1")
    for method, path, status in [("GET", "/v1/nowhere", 404), ("GET", "/v1/completions", 405),
                                 ("DELETE", "/v1/models", 405), ("GET", "/docs", 404),
                                 ("GET", "/openapi.json", 404)]:  # fmt: skip
        r = httpx.request(method, f"{root}{path}", timeout=30)
        error = r.json()["error"]
        assert r.status_code == status and error["type"] == "invalid_request_error", r.text
        assert set(error) == {"message", "type", "param", "code"}
