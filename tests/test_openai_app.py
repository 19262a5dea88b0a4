"""adaptr serve: the OpenAI-compatible API, driven by the official openai client."""

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from adaptr.registry import Registry

from helpers import START_S, client, expected, random_lora, running, serve_tiny, wait_for

B_SPEC = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "o_proj", "down_proj"]}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("http")
    with serve_tiny(root, [("a", 1), ("b", 2, B_SPEC)], max_adapters=4) as (reg, url, app):
        yield reg, root, url, client(url, timeout=60), app


def test_models_lists_base_and_adapters(served):
    _, _, _, client, _ = served
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "tiny" and {"a", "a@1", "b", "b@1"} <= set(ids)


def test_completions_and_chat_match_the_adapter_alone(served):
    reg, _, _, client, _ = served
    for ref in ("a", "b"):
        out = client.completions.create(model=ref, prompt="Hello there", max_tokens=6)
        assert out.choices[0].text == expected(reg, ref, "Hello there", 6)
        assert out.usage.completion_tokens <= 6 and out.model == ref
    bare = (
        client.completions.create(model="tiny", prompt="Hello there", max_tokens=6).choices[0].text
    )
    assert bare == expected(reg, None, "Hello there", 6) and bare != expected(
        reg, "a", "Hello there", 6
    )
    chat = client.chat.completions.create(
        model="b", messages=[{"role": "user", "content": "你好"}], max_tokens=6
    )
    assert chat.choices[0].message.content == expected(reg, "b", "你好", 6, chat=True)
    assert chat.choices[0].message.role == "assistant"


def test_streaming_equals_the_whole_answer(served):
    _, _, _, client, _ = served
    whole = client.completions.create(model="a", prompt="Stream me", max_tokens=8).choices[0].text
    parts = [
        c.choices[0].text
        for c in client.completions.create(model="a", prompt="Stream me", max_tokens=8, stream=True)
    ]
    assert "".join(parts) == whole
    whole = client.chat.completions.create(
        model="b", messages=[{"role": "user", "content": "hi"}], max_tokens=8
    ).choices[0]
    chunks = list(
        client.chat.completions.create(
            model="b", messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason
    assert whole.message.content == expected(served[0], "b", "hi", 8, chat=True)


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served):
    reg, _, url, client, _ = served
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="ghost", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="a", prompt="x", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="exceeds the context"):
        client.completions.create(model="a", prompt="x" * 600, max_tokens=2)
    r = httpx.post(
        f"{url}/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{url}/chat/completions", json={"model": "a", "messages": "hi"})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    # a client that disconnects mid-stream
    with httpx.stream(
        "POST",
        f"{url}/completions",
        json={"model": "a", "prompt": "go", "max_tokens": 40, "stream": True},
    ) as s:
        next(s.iter_lines())
    after = client.completions.create(model="a", prompt="still here", max_tokens=3)
    assert after.choices[0].text == expected(reg, "a", "still here", 3)


def test_switch_and_new_versions_are_picked_up_without_restart(served, cli):
    reg, root, _, client, _ = served
    before = (
        client.completions.create(model="a", prompt="Hello there", max_tokens=6).choices[0].text
    )
    base = reg.base_path("tiny")
    reg.add(
        "a",
        random_lora(base, root / "a2", 9, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        base="tiny",
    )
    after = client.completions.create(model="a", prompt="Hello there", max_tokens=6).choices[0].text
    assert after == expected(reg, "a@2", "Hello there", 6) and after != before
    assert (
        client.completions.create(model="a@1", prompt="Hello there", max_tokens=6).choices[0].text
        == before
    )
    reg.switch("b")
    assert client.completions.create(model="active", prompt="Hello there", max_tokens=6).choices[
        0
    ].text == expected(reg, "b", "Hello there", 6)
    reg.deactivate("tiny")
    assert client.completions.create(model="active", prompt="Hello there", max_tokens=6).choices[
        0
    ].text == expected(reg, None, "Hello there", 6)


def test_load_500_requests_from_8_clients(served):
    reg, _, url, _, app = served
    models = ["a@1", "b", "tiny", "a@1", "b"]
    prompts = [f"request {i}" for i in range(5)]
    want = {
        (m, p): expected(reg, None if m == "tiny" else m, p, 4)
        for m in set(models)
        for p in prompts
    }
    clients = [client(url) for _ in range(8)]  # timeout=START_S: 120 s

    def one(i):
        m, p = models[i % len(models)], prompts[(i // len(models)) % len(prompts)]
        text = clients[i % 8].completions.create(model=m, prompt=p, max_tokens=4).choices[0].text
        return text == want[(m, p)], (m, p, text)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, range(500)))
    wrong = [r[1] for r in results if not r[0]]
    assert len(results) == 500 and not wrong, wrong[:5]


def test_requests_queued_together_run_as_one_batch_across_models(served):
    reg, _, url, _, app = served
    batcher = app.state.context.scheduler
    models = ["a@1", "b", "tiny", "a@1", "b"]
    want = [expected(reg, None if m == "tiny" else m, f"together {i}", 4) for i, m in enumerate(models)]  # fmt: skip
    api = client(url)

    def one(i):
        return api.completions.create(model=models[i], prompt=f"together {i}", max_tokens=4)

    batcher.most_rows = batcher.most_models = 0
    start = batcher.submitted
    # the worker holds until all five are queued: they then start as one batch, whatever
    # the timing of their arrival
    batcher.hold()
    with ThreadPoolExecutor(len(models)) as pool:
        try:
            futures = [pool.submit(one, i) for i in range(len(models))]
            wait_for(lambda: batcher.submitted >= start + len(models), "5 requests to be queued")
        finally:
            batcher.release()
        texts = [f.result(timeout=START_S).choices[0].text for f in futures]
    assert texts == want
    assert (batcher.most_rows, batcher.most_models) == (5, 3)  # a@1, b@1 and the bare base


def test_serve_cli_refuses_an_unknown_base(cli):
    code, _, err = cli("serve", "--base", "nope")
    assert (
        code != 0
        and err.strip()
        == "error: unknown base 'nope': register it with `adaptr base add nope PATH`"
    )


def _stop_inside(text: str) -> tuple[str, str]:
    """A two-character stop string that first occurs a few characters into ``text``."""
    k = next(i for i in range(3, len(text) - 2) if text.find(text[i : i + 2]) == i)
    return text[k : k + 2], text[:k]


def test_stop_strings_end_the_answer_and_its_row_in_the_batch(served):
    _, _, _, client, app = served
    whole = client.completions.create(model="b", prompt="Stop me", max_tokens=12).choices[0].text
    stop, want = _stop_inside(whole)
    out = client.completions.create(model="b", prompt="Stop me", max_tokens=12, stop=[stop, "\x00"])
    assert out.choices[0].text == want and out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="b", prompt="Stop me", max_tokens=12, stop=stop, stream=True
    )
    parts = [(c.choices[0].text, c.choices[0].finish_reason) for c in streamed]
    assert "".join(t for t, _ in parts) == want and parts[-1][1] == "stop"
    assert (
        client.completions.create(model="b", prompt="Stop me", max_tokens=12, stop="\x00")
        .choices[0]
        .text
        == whole
    )  # a stop string that never comes changes nothing

    # the row stops at the stop string, not at max_tokens. Before each forward of the batch
    # the worker waits until the request has read every token sent so far (and so has seen
    # the stop string once it is complete): the count no longer depends on the timing. The
    # token that completes the stop string comes from forward k = completion_tokens; the
    # request then marks its row done, so the forward after it is the row's last.
    batcher = app.state.context.scheduler
    forwards = []

    def before_forward(module, args):
        jobs = list(batcher.current)
        forwards.append(jobs)
        for job in jobs:
            asyncio.run_coroutine_threadsafe(_read_up(job), job.loop).result(timeout=START_S)

    hook = batcher.server.model.register_forward_pre_hook(before_forward)
    try:
        out = client.completions.create(model="b", prompt="Stop me", max_tokens=300, stop=stop)
        # a batch after it: it starts once the stopped one has ended (one worker)
        client.completions.create(model="b", prompt="Stop me", max_tokens=1)
    finally:
        hook.remove()
    mine = [jobs for jobs in forwards if jobs and jobs[0] is forwards[0][0]]
    assert out.choices[0].text == want and out.choices[0].finish_reason == "stop"
    assert len(mine) <= out.usage.completion_tokens + 1 < 20, (len(mine), out.usage)


async def _read_up(job) -> None:
    """Returns once the request has taken every token put on its queue so far."""
    while not job.out.empty():
        await asyncio.sleep(0.001)


def test_stream_usage_and_openai_error_params(served):
    _, _, url, client, _ = served
    whole = client.chat.completions.create(
        model="a", messages=[{"role": "user", "content": "count"}], max_tokens=5
    )
    chunks = list(
        client.chat.completions.create(
            model="a",
            messages=[{"role": "user", "content": "count"}],
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == (
        whole.choices[0].message.content
    )
    for extra, param in [({"n": 17}, "n"), ({"top_p": "abc"}, "top_p"), ({"logprobs": 21}, "logprobs"),
                         ({"logprobs": True}, "logprobs"), ({"echo": 1}, "echo"),
                         ({"top_logprobs": 2}, "top_logprobs"), ({"prompt": [[1], []]}, "prompt"),
                         ({"prompt": [10**9]}, "prompt"), ({"n": 16, "prompt": ["a"] * 9}, "n"),
                         ({"presence_penalty": 1.0}, "presence_penalty"), ({"stop": [1]}, "stop")]:  # fmt: skip
        r = httpx.post(f"{url}/completions", json={"model": "a", "prompt": "x", **extra})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == param, (extra, error)
        assert error["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="a", prompt="x", max_tokens=2, n=30)
    assert e.value.body["param"] == "n"
    for extra, param in [({"echo": True}, "echo"), ({"logprobs": 2}, "logprobs"),
                         ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                         ({"top_logprobs": 2}, "top_logprobs")]:  # fmt: skip
        r = httpx.post(f"{url}/chat/completions", json={"model": "a", "messages": [{"role": "user", "content": "x"}], **extra})  # fmt: skip
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == param, (extra, error)


def _add_dora(reg, root) -> None:
    """A DoRA adapter (served by PEFT, in a batch of its own), added once per module."""
    if not any(v.name == "dora" for v in reg.list()):
        dora = random_lora(
            reg.base_path("tiny"), root / "dora", 5, r=2, target_modules=["q_proj"], use_dora=True
        )
        reg.add("dora", dora, base="tiny")


def _recording_jobs(batcher):
    """``job(adapter)``: a scheduler request for "Hello there" (6 greedy tokens) that records
    its events in ``.items`` instead of answering a client."""
    from adaptr.serving.requests import Request

    prompt_ids = batcher.server.tokenizer("Hello there").input_ids

    def job(adapter):
        items: list = []
        j = Request(prompt_ids, adapter, 6, on_event=items.append)
        j.items = items
        return j

    return job


def _run_together(batcher, jobs) -> None:
    """Queue ``jobs`` while the scheduler holds (they are taken in order), then let them run."""
    batcher.hold()
    try:
        for j in jobs:
            batcher.submit(j)
    finally:
        batcher.release()
    for j in jobs:
        assert j.done.wait(START_S), "a request did not finish"


def test_an_adapter_that_cannot_load_fails_only_its_own_requests(served):
    reg, root, _, _, app = served
    batcher = app.state.context.scheduler
    _add_dora(reg, root)
    job = _recording_jobs(batcher)
    # a@1 loads; "gone@1" was resolved by a request, then removed before it ran
    jobs = [job("a@1"), job("gone@1"), job(None), job("dora@1"), job("a@1")]
    _run_together(batcher, jobs)
    kinds = [[k for k, _ in j.items] for j in jobs]
    assert kinds[1] == ["error"] and "gone" in str(jobs[1].items[0][1])
    for j, ref in ((jobs[0], "a@1"), (jobs[2], None), (jobs[3], "dora@1"), (jobs[4], "a@1")):
        assert j.items[-1][0] == "end" and "error" not in [k for k, _ in j.items]
        text = "".join(v for k, v in j.items if k == "text")
        assert text == expected(reg, ref, "Hello there", 6), ref
    assert batcher.server.served_by_peft() == ["dora@1"]


def test_a_job_cancelled_while_an_earlier_part_runs_is_dropped_not_generated(served):
    """Requests that cannot join the running batch (an adapter PEFT runs apart, or a retry
    one at a time after one failed to load) wait: one whose client leaves meanwhile is
    dropped before it joins, never loaded and prefilled."""
    reg, root, _, _, app = served
    batcher = app.state.context.scheduler
    _add_dora(reg, root)
    job = _recording_jobs(batcher)
    cases = [
        ([job("a@1"), job("gone@1"), job("b@1")], 2),  # "gone@1" fails: retried one at a time
        ([job("a@1"), job("dora@1")], 1),  # DoRA waits for a@1's rows to leave
    ]
    for jobs, gone in cases:
        forwards = []

        def before_forward(module, args, jobs=jobs, gone=gone, forwards=forwards):
            forwards.append(list(batcher.current))
            jobs[gone].cancel()  # its client leaves while the first request runs

        dropped = batcher.dropped
        hook = batcher.server.model.register_forward_pre_hook(before_forward)
        try:
            _run_together(batcher, jobs)
        finally:
            hook.remove()
        assert forwards and [id(j) for j in forwards[0]] == [id(jobs[0])], forwards[:1]
        assert jobs[0].items[-1][0] == "end" and "error" not in [k for k, _ in jobs[0].items]
        assert batcher.dropped == dropped + 1, [j.adapter for j in jobs]
        assert not any(j is jobs[gone] for f in forwards for j in f), "the dropped job ran"
        assert jobs[gone].items == [("end", "cancelled")], jobs[gone].items


def test_an_apps_threads_end_with_it(tiny_llama, tmp_path):
    from adaptr.serving import AdapterServer
    from adaptr.serving.openai.app import create_app

    reg = Registry(tmp_path / "home")
    reg.add_base("tiny", tiny_llama)
    app = create_app(AdapterServer(reg, "tiny"))
    with running(app) as url:
        client(url).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        threads = [app.state.context.scheduler.thread, *app.state.context.workers._threads]
        assert len(threads) > 1 and all(t.is_alive() for t in threads), threads
    assert not any(t.is_alive() for t in threads), threads


def test_apps_on_one_server_share_its_scheduler_and_outlive_each_other(tiny_llama, tmp_path):
    """Every caller of a server goes through its one scheduler; an app that stops closes it,
    and the next caller (another app, generate) gets a fresh one only once the old one has
    drained, so two workers never share the slots."""
    from adaptr.serving import AdapterServer
    from adaptr.serving.openai.app import create_app

    reg = Registry(tmp_path / "home")
    reg.add_base("tiny", tiny_llama)
    server = AdapterServer(reg, "tiny")
    first, second = create_app(server), create_app(server)
    ask = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    with running(second) as url2:
        with running(first) as url1:
            assert first.state.context.scheduler is second.state.context.scheduler
            assert client(url1).completions.create(**ask).choices[0].text
        old = first.state.context.scheduler
        assert old.closed and not old.thread.is_alive()
        assert client(url2).completions.create(**ask).choices[0].text  # on a fresh one
        assert server.scheduler is not old and not server.scheduler.closed
    assert len(server.generate(["hi"], max_new_tokens=2)) == 1


def test_a_closing_scheduler_drains_before_the_servers_next_one_starts(tiny_llama, tmp_path):
    from adaptr.serving import AdapterServer

    reg = Registry(tmp_path / "home")
    reg.add_base("tiny", tiny_llama)
    server = AdapterServer(reg, "tiny")
    long = server.submit("hi", max_new_tokens=48)
    old = server.scheduler
    old.close(0)  # closing: it takes no more, and finishes what it took
    assert len(server.generate(["hi"], max_new_tokens=2)) == 1  # on the next one
    assert not old.thread.is_alive() and server.scheduler is not old
    assert long.wait(0).finish is not None  # finished by the one it was given to


def test_an_error_while_streaming_is_an_openai_shaped_event(served, monkeypatch):
    _, _, url, _, app = served

    def fail(job):  # the batch fails at once: its error reaches the stream
        job.loop.call_soon_threadsafe(job.out.put_nowait, (job.index, "error", RuntimeError("boom"), 0))  # fmt: skip

    monkeypatch.setattr(app.state.context.scheduler, "submit", fail)
    body = {"model": "a", "prompt": "x", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{url}/completions", json=body, timeout=START_S) as s:
        assert s.status_code == 200
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    error = json.loads(events[-1])["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == "server_error" and "boom" in error["message"]


def test_the_neutral_values_clients_always_send_are_accepted(served):
    """vLLM's benchmark client sends repetition_penalty 1.0 on every request; OpenAI clients
    send their defaults: the values that switch a field off are taken, over the openai
    client (its own parameters and extra_body) and as raw JSON."""
    reg, _, url, api, _ = served
    want = expected(reg, "a", "Hello there", 4)
    out = api.completions.create(
        model="a", prompt="Hello there", max_tokens=4, frequency_penalty=0, presence_penalty=0,
        logit_bias={}, best_of=1, extra_body={"repetition_penalty": 1.0, "top_k": -1, "min_p": 0},
    )  # fmt: skip
    assert out.choices[0].text == want
    chat = api.chat.completions.create(
        model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
        frequency_penalty=0.0, presence_penalty=0.0, logit_bias={},
        extra_body={"repetition_penalty": 1, "top_k": 0, "min_p": 0.0, "best_of": 1},
    )  # fmt: skip
    assert chat.choices[0].message.content == expected(reg, "a", "hi", 4, chat=True)
    for extra in [{"repetition_penalty": 1}, {"repetition_penalty": 1.0}, {"top_k": -1},
                  {"top_k": 0}, {"frequency_penalty": 0}, {"presence_penalty": 0.0},
                  {"min_p": 0}, {"logit_bias": {}}, {"logit_bias": None}, {"best_of": 1},
                  {"best_of": 2, "n": 2}]:  # fmt: skip
        r = httpx.post(f"{url}/completions", json={"model": "a", "prompt": "Hello there", "max_tokens": 4, **extra}, timeout=START_S)  # fmt: skip
        assert r.status_code == 200, (extra, r.text)
        assert [c["text"] for c in r.json()["choices"]] == [want] * extra.get("n", 1), extra
    # vLLM's benchmark client's completions request, as it sends it
    bench = {"model": "a", "prompt": "Hello there", "repetition_penalty": 1.0, "max_tokens": 4,
             "logprobs": None, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", f"{url}/completions", json=bench, timeout=START_S) as s:
        assert s.status_code == 200
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: {")]
    chunks = [json.loads(e) for e in events]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == want
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


def test_other_values_and_non_booleans_are_400_naming_the_field(served):
    _, _, url, api, _ = served
    for extra, param in [({"repetition_penalty": 1.2}, "repetition_penalty"),
                         ({"repetition_penalty": True}, "repetition_penalty"),
                         ({"top_k": 40}, "top_k"), ({"min_p": 0.1}, "min_p"),
                         ({"frequency_penalty": 0.5}, "frequency_penalty"),
                         ({"presence_penalty": False}, "presence_penalty"),
                         ({"best_of": 2}, "best_of"), ({"logit_bias": {"5": 1}}, "logit_bias"),
                         ({"stream": 1}, "stream"), ({"echo": 0}, "echo"),
                         ({"ignore_eos": "false"}, "ignore_eos"),
                         ({"stream": True, "stream_options": {"include_usage": "no"}},
                          "stream_options.include_usage")]:  # fmt: skip
        r = httpx.post(f"{url}/completions", json={"model": "a", "prompt": "x", **extra}, timeout=START_S)  # fmt: skip
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == param, (extra, error)
        assert error["type"] == "invalid_request_error" and f"'{param}'" in error["message"]
    with pytest.raises(openai.BadRequestError) as e:
        api.completions.create(model="a", prompt="x", max_tokens=2, extra_body={"top_k": 40})
    assert e.value.body["param"] == "top_k"
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(
            model="a", messages=[{"role": "user", "content": "x"}], max_tokens=2, stream=True,
            stream_options={"include_usage": "no"},  # type: ignore[typeddict-item]
        )  # fmt: skip
    assert e.value.body["param"] == "stream_options.include_usage"
    r = httpx.post(f"{url}/chat/completions", json={"model": "a", "messages": [{"role": "user", "content": "x"}], "logprobs": 1}, timeout=START_S)  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"


def test_chat_names_answers_sent_back_and_what_is_refused(served, monkeypatch):
    """``name`` reaches the chat template as a message key (as vLLM passes it); an answer
    sent back as the openai client dumps it is taken; tool-call history a template does not
    render and images are refused saying what is supported."""
    reg, _, url, api, app = served
    tokenizer = app.state.context.server.tokenizer
    seen = []
    template = tokenizer.apply_chat_template

    def recording(messages, **kwargs):
        seen.append(messages)
        return template(messages, **kwargs)

    monkeypatch.setattr(tokenizer, "apply_chat_template", recording)
    out = api.chat.completions.create(
        model="a", messages=[{"role": "user", "content": "hi", "name": "alice"}], max_tokens=4
    )
    assert seen[-1] == [{"role": "user", "content": "hi", "name": "alice"}]
    assert out.choices[0].message.content == expected(reg, "a", "hi", 4, chat=True)
    history = [{"role": "user", "content": "hi"}, out.choices[0].message.model_dump(),
               {"role": "user", "content": "more"}]  # fmt: skip
    again = api.chat.completions.create(model="a", messages=history, max_tokens=2)
    assert again.choices[0].finish_reason in ("length", "stop")
    assert seen[-1][1] == {"role": "assistant", "content": out.choices[0].message.content}
    tool_call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    for messages, said in [
        ([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [tool_call]},
          {"role": "tool", "tool_call_id": "c1", "content": "42"}],
         "the chat template drops the assistant's tool_calls"),  # the tiny template does
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],  # fmt: skip
         "image content parts are not supported: adaptr serves text models"),
    ]:  # fmt: skip
        with pytest.raises(openai.BadRequestError) as e:
            api.chat.completions.create(model="a", messages=messages, max_tokens=2)
        assert e.value.body["param"] == "messages" and said in e.value.body["message"], e.value.body
