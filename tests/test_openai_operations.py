"""adaptr serve's operator routes: /health, /metrics (parsed with prometheus-client's
parser), GET /v1/adapters, vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter,
pinning, and the API key on them; `adaptr serve --pin` at start."""

import threading

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adaptr.registry import Registry

from helpers import START_S, client, expected, refused, serve_tiny, wait_for, write_adapter

KEY = "sk-ops-51c0"
AUTH = {"Authorization": f"Bearer {KEY}"}
OTHERS = ("b", "c", "d", "e")  # 2 x max_adapters adapters beside "a"


@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    root = tmp_path_factory.mktemp("http-ops")
    adapters = [("a", 1), *((name, i + 2) for i, name in enumerate(OTHERS))]
    with serve_tiny(root, adapters, max_adapters=2, api_key=KEY) as (reg, url, app):
        yield reg, url, app


def scrape(url: str) -> dict:
    """``{(sample name, frozenset of its labels): value}`` of GET /metrics."""
    r = httpx.get(url.removesuffix("/v1") + "/metrics", headers=AUTH, timeout=START_S)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 when none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def adapters(url: str) -> dict:
    r = httpx.get(url + "/adapters", headers=AUTH, timeout=START_S)
    assert r.status_code == 200, r.text
    return {entry["id"]: entry for entry in r.json()["data"]}


def post(url: str, path: str, body, headers=AUTH):
    return httpx.post(url + path, json=body, headers=headers, timeout=START_S)


# ------------------------------------------------------------------ auth
@pytest.mark.parametrize(
    "method, path",
    [("GET", "/metrics"), ("GET", "/v1/adapters"), ("POST", "/v1/load_lora_adapter"),
     ("POST", "/v1/unload_lora_adapter")],
)  # fmt: skip
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}], ids=["none", "wrong"])
def test_the_operator_routes_need_the_key(ops, method, path, headers):
    _, url, _ = ops
    r = httpx.request(
        method, url.removesuffix("/v1") + path, json={"lora_name": "a"}, headers=headers,
        timeout=START_S,
    )  # fmt: skip
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert not adapters(url)["a@1"]["pinned"]  # the refused load changed nothing


# ---------------------------------------------------------------- health
def test_health_is_open_and_ready_only_while_the_app_runs(ops, tiny_llama, tmp_path):
    from fastapi.testclient import TestClient

    from adaptr.serving import AdapterServer
    from adaptr.serving.openai.app import create_app

    _, url, _ = ops
    r = httpx.get(url.removesuffix("/v1") + "/health", timeout=START_S)  # no key
    assert r.status_code == 200 and r.json() == {"status": "ok", "base": "tiny"}

    reg = Registry(tmp_path / "home")
    reg.add_base("tiny", tiny_llama)
    app = create_app(AdapterServer(reg, "tiny"), api_key=KEY)
    before = TestClient(app).get("/health")  # the app has not started: no batch worker yet
    assert before.status_code == 503 and "starting" in before.json()["error"]["message"]
    with TestClient(app) as http:
        assert http.get("/health").status_code == 200
    after = TestClient(app).get("/health")  # its shutdown began (and ended)
    assert after.status_code == 503 and "shutting down" in after.json()["error"]["message"]


# --------------------------------------------------------------- metrics
def test_metrics_count_the_requests_made(ops):
    reg, url, _ = ops
    api = client(url, KEY)
    before = scrape(url)
    usages = {"a@1": [], "b@1": [], "": []}
    for ref, model, prompt, n in (("a@1", "a", "Hello", 5), ("a@1", "a@1", "Count to", 3),
                                  ("b@1", "b", "Hi", 4), ("", "tiny", "Base here", 6)):  # fmt: skip
        out = api.completions.create(model=model, prompt=prompt, max_tokens=n)
        usages[ref].append((out.usage, out.choices[0].finish_reason))
    chat = api.chat.completions.create(
        model="a", messages=[{"role": "user", "content": "hey"}], max_tokens=3
    )
    usages["a@1"].append((chat.usage, chat.choices[0].finish_reason))
    streamed = list(api.completions.create(model="b", prompt="go", max_tokens=4, stream=True,
                                           stream_options={"include_usage": True}))  # fmt: skip
    usages["b@1"].append((streamed[-1].usage, streamed[-2].choices[0].finish_reason))
    after = scrape(url)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    total = sum(len(u) for u in usages.values())
    for ref, got in usages.items():
        assert delta("adaptr:request_success_total", adapter=ref) == len(got)
        for reason in ("stop", "length"):
            n = sum(r == reason for _, r in got)
            assert delta("adaptr:request_success_total", adapter=ref, finished_reason=reason) == n
        assert delta("adaptr:prompt_tokens_total", adapter=ref) == sum(u.prompt_tokens for u, _ in got)
        assert delta("adaptr:generation_tokens_total", adapter=ref) == sum(
            u.completion_tokens for u, _ in got
        )
    tokens = sum(u.completion_tokens for got in usages.values() for u, _ in got)
    assert delta("adaptr:time_to_first_token_seconds_count") == total
    assert delta("adaptr:e2e_request_latency_seconds_count") == total
    assert delta("adaptr:inter_token_latency_seconds_count") == tokens - total
    for hist in ("time_to_first_token", "inter_token_latency", "e2e_request_latency"):
        name = f"adaptr:{hist}_seconds"
        buckets = sorted(
            (float(dict(ls)["le"]), v) for (n, ls), v in after.items() if n == name + "_bucket"
        )
        assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
        assert buckets[-1] == (float("inf"), value(after, name + "_count"))
        assert value(after, name + "_sum") >= 0
    assert value(after, "adaptr:num_requests_running") == 0
    assert value(after, "adaptr:num_requests_waiting") == 0
    assert value(after, "adaptr:lora_requests_info", max_lora="2") > 0


def test_metrics_show_the_queue_aborts_and_errors(ops):
    _, url, app = ops
    server = app.state.context.server
    before = scrape(url)
    scheduler = server.scheduler
    scheduler.hold()
    try:
        kept = server.submit("Queued", "c", max_new_tokens=2, eos_token_id=-1)
        dropped = server.submit("Dropped", "c", max_new_tokens=2)
        ghost = server.submit("Nobody", "ghost", max_new_tokens=2)
        queued = scrape(url)
        assert value(queued, "adaptr:num_requests_waiting") == 3
        info = [ls for (n, ls), _ in queued.items() if n == "adaptr:lora_requests_info"]
        assert dict(info[0])["waiting_lora_adapters"] == "c,ghost"  # (as submitted: unresolved)
        dropped.cancel()
    finally:
        scheduler.release()
    kept.wait(START_S)
    with pytest.raises(Exception, match="ghost"):
        ghost.wait(START_S)
    wait_for(lambda: dropped.done.is_set(), "the cancelled request to be dropped")
    after = scrape(url)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    # dropped before it was resolved: counted under the ref it was given (HTTP gives exact refs)
    assert delta("adaptr:request_success_total", adapter="c", finished_reason="abort") == 1
    assert delta("adaptr:request_success_total", adapter="ghost", finished_reason="error") == 1
    assert delta("adaptr:request_success_total", adapter="c@1", finished_reason="length") == 1
    assert delta("adaptr:request_success_total", adapter="c@1") == 1
    assert delta("adaptr:generation_tokens_total", adapter="c@1") == kept.completion_tokens


# ------------------------------------------------------- residency, pins
def test_a_pinned_adapter_stays_while_twice_max_adapters_others_are_used(ops):
    reg, url, _ = ops
    before = scrape(url)
    r = post(url, "/load_lora_adapter", {"lora_name": "a", "lora_path": "a"})  # as vLLM's clients
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "a@1" and r.json()["pinned"] and r.json()["resident"]
    try:
        api = client(url, KEY)
        for name in OTHERS:
            api.completions.create(model=name, prompt="Use me", max_tokens=2)
            listing = adapters(url)
            assert listing["a@1"]["resident"] and listing["a@1"]["pinned"]
            assert listing[f"{name}@1"]["resident"] and not listing[f"{name}@1"]["pinned"]
            assert sum(e["resident"] for e in listing.values()) == 2
        after = scrape(url)
        lru = value(after, "adaptr:lora_evictions_total", reason="lru") - value(
            before, "adaptr:lora_evictions_total", reason="lru"
        )
        assert lru >= len(OTHERS) - 1
        assert value(after, "adaptr:lora_pinned_adapters") == 1
        answer = api.completions.create(model="a", prompt="Hello there", max_tokens=5)
        assert answer.choices[0].text == expected(reg, "a", "Hello there", 5)
        entry = adapters(url)["a@1"]
        assert entry["slot"] in (1, 2) and entry["requests"] >= 1 and entry["last_used"] > 0
        assert entry["base"] == "tiny" and entry["name"] == "a" and entry["version"] == 1
    finally:
        assert post(url, "/unload_lora_adapter", {"lora_name": "a"}).status_code == 200


def test_pins_count_against_max_adapters(ops):
    _, url, _ = ops
    try:
        for name in ("a", "b"):
            assert post(url, "/load_lora_adapter", {"lora_name": name}).status_code == 200
        r = post(url, "/load_lora_adapter", {"lora_name": "c"})
        assert r.status_code == 400 and "cannot pin c@1" in r.json()["error"]["message"]
        assert "max_adapters=2" in r.json()["error"]["message"]
        # every slot pinned: an unpinned adapter cannot be served, and says why
        r = post(url, "/completions", {"model": "c", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 400 and "pinned" in r.json()["error"]["message"], r.text
        assert {k for k, e in adapters(url).items() if e["pinned"]} == {"a@1", "b@1"}
    finally:
        for name in ("a", "b"):
            post(url, "/unload_lora_adapter", {"lora_name": name})
    listing = adapters(url)
    assert not any(e["pinned"] for e in listing.values())
    assert not listing["a@1"]["resident"] and not listing["b@1"]["resident"]


def test_unload_refuses_what_it_cannot_do(ops):
    _, url, _ = ops
    r = post(url, "/unload_lora_adapter", {"lora_name": "ghost"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert post(url, "/unload_lora_adapter", {"lora_name": "e@1"}).status_code in (200, 404)
    r = post(url, "/unload_lora_adapter", {"lora_name": "e"})  # known, not resident (any more)
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_loaded"
    assert not adapters(url)["e@1"]["resident"]
    for body, param in (({}, "lora_name"), ({"lora_name": 3}, "lora_name"),
                        ({"lora_name": "a", "lora_path": "a"}, "lora_path"),
                        ({"lora_name": "tiny"}, "lora_name")):  # fmt: skip
        r = post(url, "/unload_lora_adapter", body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_load_refuses_folders_unknown_fields_and_refs(ops, tmp_path):
    _, url, _ = ops
    folder = write_adapter(tmp_path / "elsewhere")
    r = post(url, "/load_lora_adapter", {"lora_name": "new", "lora_path": str(folder)})
    assert r.status_code in (400, 404)  # an unknown name: 404 before the path is looked at
    r = post(url, "/load_lora_adapter", {"lora_name": "a", "lora_path": str(folder)})
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and "adaptr add NAME" in message and str(folder) in message
    r = post(url, "/load_lora_adapter", {"lora_name": "a", "load_inplace": True})
    assert r.status_code == 400 and "load_inplace" in r.json()["error"]["message"]
    r = post(url, "/load_lora_adapter", {"lora_name": "ghost"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(url + "/load_lora_adapter", content=b"{nope", headers=AUTH, timeout=START_S)
    assert r.status_code == 400
    assert not any(e["pinned"] for e in adapters(url).values())


def test_an_adapter_with_running_rows_is_not_unloaded_under_them(ops):
    _, url, app = ops
    server = app.state.context.server
    scheduler = server.scheduler
    gate, stepped = threading.Event(), threading.Event()

    def pause(_steps: int) -> None:
        stepped.set()
        gate.wait(START_S)

    scheduler.on_step = pause
    try:
        # (eos_token_id -1: never ends early)
        running = server.submit("Long", "d", max_new_tokens=8, eos_token_id=-1)
        assert stepped.wait(START_S)
        r = post(url, "/unload_lora_adapter", {"lora_name": "d"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_in_use", r.text
        assert adapters(url)["d@1"]["resident"]
    finally:
        scheduler.on_step = None
        gate.set()
    assert len(running.wait(START_S).tokens) == 8
    r = post(url, "/unload_lora_adapter", {"lora_name": "d"})
    assert r.status_code == 200 and not r.json()["resident"]


# ------------------------------------------------------------------- CLI
@pytest.fixture
def serve_cli(cli, registry, tiny_llama, tmp_path, monkeypatch):
    """`adaptr serve` up to uvicorn's run, with adapters a and b on base tiny."""
    import uvicorn

    registry.add_base("tiny", tiny_llama)
    for i, name in enumerate("ab"):
        registry.add(name, write_adapter(tmp_path / name, seed=i), base="tiny")
    started = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: started.append(self.config))

    def run(*args: str):
        started.clear()
        code, _, err = cli("serve", "--base", "tiny", *args)
        return code, err, started[0] if started else None

    return run


def test_serve_pins_and_preloads_at_start(serve_cli):
    code, err, config = serve_cli("--pin", "a", "--pin", "b@1", "--max-adapters", "3",
                                  "--max-adapter-memory", "64")  # fmt: skip
    assert code == 0, err
    server = config.app.state.context.server
    assert server.slots.pinned() == ["a@1", "b@1"] and server.max_memory == 64 * 2**20


def test_serve_refuses_bad_pins_in_one_line(serve_cli, cli, home):
    refused(cli, home, None, "serve", "--base", "tiny", "--pin", "ghost", match="ghost")
    line = refused(cli, home, None, "serve", "--base", "tiny", "--max-adapters", "1",
                   "--pin", "a", "--pin", "b", match="--max-adapters=1")  # fmt: skip
    assert "--pin names 2 adapters" in line
    code, err, _ = serve_cli("--engine", "vllm", "--pin", "a")
    assert code == 2 and "--pin" in err
