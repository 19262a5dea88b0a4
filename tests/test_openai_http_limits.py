"""adaptr serve: one request cannot freeze the server, and bad input is a 4xx, never a 500.

Bodies are bounded (413 at once), slow bodies time out (408), a prompt too long for the
context is refused before it is tokenized when its length in characters says so, the
tokenizing runs off the event loop, and malformed values get OpenAI-shaped 400/404 errors
naming their ``param``.
"""

import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import pytest

from helpers import START_S, client, expected, post_raw, serve_tiny, wait_for


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    root = tmp_path_factory.mktemp("http-limits")
    p0 = [("p0", seed) for seed in (1, 2, 3)]  # p0@1..3: "p0@٣" must not pass for p0@3
    with serve_tiny(root, p0, max_adapters=2) as served:
        yield served


def raw_exchange(url: str, data: bytes) -> tuple[int, dict]:
    """Send ``data`` on a new connection; the status and JSON body of the answer, which must
    come (and the connection close) within START_S seconds."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=START_S) as s:
        s.sendall(data)
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except TimeoutError:
            pytest.fail(f"no whole answer within {START_S} s; got {answer[:300]!r}")
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def assert_error(status: int, body: dict, want_status: int, param=None, code=None) -> None:
    error = body["error"]
    assert status == want_status, (status, body)
    assert set(error) == {"message", "type", "param", "code"} and error["message"], body
    assert error["type"] == "invalid_request_error", body
    assert (error["param"], error["code"]) == (param, code), body


def test_a_body_over_the_limit_is_refused_at_once(limited):
    _, url, app = limited
    # a 20 MB body is announced and never sent: the answer cannot wait for it
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {20 * 2**20}\r\n\r\n"
    )
    status, body = raw_exchange(url, head.encode())
    assert_error(status, body, 413, code="request_too_large")
    # without a length up front, the body is refused once it has gone past the limit. The
    # byte past the limit is the last one sent (in a chunk left open): the server has read
    # all there is when it answers and closes, so the close cannot turn into a reset
    limit = app.state.context.limits.max_body_bytes
    sizes = [65536] * (limit // 65536) + ([limit % 65536] if limit % 65536 else [])
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    data = head.encode() + b"".join(b"%x\r\n%s\r\n" % (n, b"x" * n) for n in sizes) + b"1\r\nx"
    status, body = raw_exchange(url, data)
    assert_error(status, body, 413, code="request_too_large")


def test_a_body_that_does_not_arrive_times_out(limited):
    _, url, app = limited
    limits = app.state.context.limits
    before, limits.body_timeout_s = limits.body_timeout_s, 0.5
    try:
        head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
        status, body = raw_exchange(url, head.encode() + b'{"model": ')  # and no more
    finally:
        limits.body_timeout_s = before
    assert_error(status, body, 408)


def test_headers_that_do_not_arrive_close_the_connection(limited, monkeypatch):
    """slowloris: a request line and headers sent a piece at a time hold the connection only
    until the header deadline, on a new connection and on a kept-alive one."""
    from adaptr.serving.openai.http import GuardedH11Protocol

    _, url, _ = limited
    monkeypatch.setattr(GuardedH11Protocol, "header_timeout_s", 0.5)
    parts = urlsplit(url)

    def closed(s: socket.socket) -> bytes:
        """What the server sends before it closes (b"" for nothing), within START_S."""
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        return got

    with socket.create_connection((parts.hostname, parts.port), timeout=START_S) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")  # never the blank line
        assert closed(s) == b""
    with socket.create_connection((parts.hostname, parts.port), timeout=START_S) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")  # a whole request first
        answer = b""
        while b'"data"' not in answer:
            answer += s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /v1/mod")  # the next one stalls in its request line
        assert b"HTTP/1.1" not in closed(s)  # (the rest of the first body at most)
    # whole requests still take their time
    assert httpx.get(f"{url}/models", timeout=START_S).status_code == 200


class WatchedTokenizer:
    """The server's tokenizer, recording the length of each text it tokenizes; tokenizing
    ``block`` waits for ``go`` (set ``entered`` first)."""

    def __init__(self, tokenizer, block: str | None = None):
        self.tokenizer, self.block, self.lengths = tokenizer, block, []
        self.entered, self.go = threading.Event(), threading.Event()

    def __call__(self, text, **kwargs):
        self.lengths.append(len(text))
        if text == self.block:
            self.entered.set()
            self.go.wait(START_S)
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.fixture
def watched(limited):
    server = limited[2].state.context.server
    original = server.tokenizer
    watch = server.tokenizer = WatchedTokenizer(original, block="tokenize me slowly")
    yield watch
    watch.go.set()
    server.tokenizer = original


def test_a_prompt_too_long_by_its_characters_is_refused_untokenized(limited, watched):
    _, url, _ = limited
    prompt = "x" * 2_000_000  # 2 MB: under the body limit, far over a 512-token context
    r = httpx.post(f"{url}/completions", json={"model": "p0", "prompt": prompt}, timeout=START_S)
    assert_error(r.status_code, r.json(), 400, "prompt", "context_length_exceeded")
    assert "exceeds the context" in r.json()["error"]["message"]
    assert len(prompt) not in watched.lengths  # refused on its length alone
    # one that is refused on its tokens says so as well
    r = httpx.post(f"{url}/completions", json={"model": "p0", "prompt": "x" * 600}, timeout=START_S)
    assert_error(r.status_code, r.json(), 400, "prompt", "context_length_exceeded")
    assert 600 in watched.lengths
    r = httpx.post(f"{url}/completions", json={"model": "p0", "prompt": "x" * 500, "max_tokens": 100}, timeout=START_S)  # fmt: skip
    assert_error(r.status_code, r.json(), 400, "max_tokens", "context_length_exceeded")


def test_tokenizing_does_not_hold_up_other_requests(limited, watched):
    reg, url, _ = limited
    api = client(url)
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(api.completions.create, model="p0", prompt=watched.block, max_tokens=4)
        try:
            assert watched.entered.wait(START_S), "the slow prompt was never tokenized"
            # its tokenizing has not finished: the event loop still answers
            r = httpx.get(f"{url}/models", timeout=START_S)
            assert r.status_code == 200 and "p0@3" in [m["id"] for m in r.json()["data"]]
        finally:
            watched.go.set()
        assert slow.result(timeout=START_S).choices[0].text == expected(reg, "p0", watched.block, 4)


def test_the_model_list_does_not_wait_for_tokenizing(limited, watched):
    # two slow prompts: every worker that tokenizes is busy, the listing still answers
    reg, url, _ = limited
    api = client(url)
    with ThreadPoolExecutor(2) as pool:
        slow = [
            pool.submit(api.completions.create, model="p0", prompt=watched.block, max_tokens=4)
            for _ in range(2)
        ]
        try:
            wait_for(
                lambda: watched.lengths.count(len(watched.block)) >= 2,
                "both slow prompts to be tokenizing",
            )
            # the tokenizers wait up to START_S for go: an answer within half of it came
            # while both still held their workers
            r = httpx.get(f"{url}/models", timeout=START_S / 2)
            assert r.status_code == 200 and "p0@3" in [m["id"] for m in r.json()["data"]]
        finally:
            watched.go.set()
        want = expected(reg, "p0", watched.block, 4)
        assert [f.result(timeout=START_S).choices[0].text for f in slow] == [want, want]


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


BAD_COMPLETIONS = [
    # (raw JSON body, status, param)
    ('{"model": "p0", "prompt": "x", "temperature": 1e-300}', 400, "temperature"),
    ('{"model": "p0", "prompt": "x", "temperature": 0.001}', 400, "temperature"),
    ('{"model": "p0", "prompt": "x", "temperature": NaN}', 400, "temperature"),
    ('{"model": "p0", "prompt": "x", "temperature": Infinity}', 400, "temperature"),
    ('{"model": "p0", "prompt": "x", "temperature": -Infinity}', 400, "temperature"),
    ('{"model": "p0", "prompt": "x", "temperature": 1e400}', 400, "temperature"),
    ('{"model": "p0", "prompt": "x", "temperature": 1e308}', 400, "temperature"),
    ('{"model": "p0", "prompt": "x", "top_p": NaN}', 400, "top_p"),
    ('{"model": "p0", "prompt": "x", "top_p": -1e-300}', 400, "top_p"),
    ('{"model": "p0", "prompt": "x", "max_tokens": 1e400}', 400, "max_tokens"),
    ('{"model": "p0", "prompt": "x", "max_tokens": 99999999999999999999999}', 400, "max_tokens"),
    ('{"model": "p0", "prompt": "x", "max_tokens": ' + "9" * 5000 + "}", 400, None),
    ('{"model": "p0", "prompt": "x", "stop": "' + "s" * 300 + '"}', 400, "stop"),
    ('{"model": "p0", "prompt": ""}', 400, "prompt"),
    ('{"model": "p0", "prompt": []}', 400, "prompt"),
    ('{"model": "p0", "prompt": [""]}', 400, "prompt"),
    ('{"model": "p0", "prompt": "\\ud800"}', 400, "prompt"),
    ('{"model": "p0", "prompt": ["ok \\udfff ok"]}', 400, "prompt"),
    ('{"model": "p0", "prompt": ' + nested(100_000) + "}", 400, None),
    (nested(100_000), 400, None),
    ('{"prompt": "x"}', 400, "model"),
    ('{"model": "", "prompt": "x"}', 400, "model"),
    ('{"model": 7, "prompt": "x"}', 400, "model"),
    ('{"model": "ghost", "prompt": "x"}', 404, "model"),
    ('{"model": "p0@99999999999999999999999", "prompt": "x"}', 404, "model"),
    ('{"model": "p0@4", "prompt": "x"}', 404, "model"),
    ('{"model": "p0@\\u00b2", "prompt": "x"}', 404, "model"),  # p0@²
    ('{"model": "p0@\\u0663", "prompt": "x"}', 404, "model"),  # p0@٣ (an Arabic-Indic 3)
    ('{"model": "P0", "prompt": "x"}', 404, "model"),
    ('{"model": "p0@", "prompt": "x"}', 404, "model"),
    ('{"model": "../p0", "prompt": "x"}', 404, "model"),
    ('{"model": "\\ud800", "prompt": "x"}', 404, "model"),
]


@pytest.mark.parametrize("raw, status, param", BAD_COMPLETIONS, ids=lambda v: str(v)[:60])
def test_bad_completions_are_4xx_naming_their_param(limited, raw, status, param):
    _, url, _ = limited
    r = post_raw(url, "/completions", raw)
    code = "model_not_found" if status == 404 else None
    assert_error(r.status_code, r.json(), status, param, code)


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "\ud800"}],
        [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        [{"role": "user", "content": None}],
        [{"role": 5, "content": "hi"}],
        [],
        "hi",
    ],
    ids=repr,
)
def test_bad_chat_messages_are_400_naming_messages(limited, messages):
    _, url, _ = limited
    raw = json.dumps({"model": "p0", "messages": messages})  # ASCII: lone surrogates escaped
    r = post_raw(url, "/chat/completions", raw)
    assert_error(r.status_code, r.json(), 400, "messages")


def test_text_parts_are_joined_and_unknown_routes_are_openai_shaped(limited):
    reg, url, _ = limited
    parts = [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]
    out = client(url).chat.completions.create(
        model="p0@2", messages=[{"role": "user", "content": parts}], max_tokens=5
    )
    assert out.choices[0].message.content == expected(reg, "p0@2", "hel\nlo", 5, chat=True)
    r = httpx.get(f"{url}/nothing", timeout=START_S)
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = httpx.get(f"{url}/completions", timeout=START_S)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


def test_the_server_still_serves_after_all_that(limited):
    reg, url, app = limited
    wait_for(lambda: not app.state.context.scheduler.waiting, "the batcher to be idle")
    out = client(url).completions.create(model="p0@3", prompt="Hello there", max_tokens=6)
    assert out.choices[0].text == expected(reg, "p0@3", "Hello there", 6)


def test_unknown_routes_say_which_there_are(limited):
    _, url, _ = limited
    for method, path, status in (("GET", "/nothing", 404), ("DELETE", "/v1/models", 405)):
        r = httpx.request(method, url.removesuffix("/v1") + path, timeout=START_S)
        assert_error(r.status_code, r.json(), status)
        assert f"{method} {path} is not a route" in r.json()["error"]["message"]
        assert "POST /v1/chat/completions" in r.json()["error"]["message"]
        assert "POST /v1/load_lora_adapter" in r.json()["error"]["message"]


def test_an_internal_error_is_an_openai_shaped_500_without_its_details(tiny_llama, tmp_path):
    from fastapi.testclient import TestClient

    from adaptr.registry import Registry
    from adaptr.serving import AdapterServer
    from adaptr.serving.openai.app import create_app

    reg = Registry(tmp_path / "home")
    reg.add_base("tiny", tiny_llama)
    app = create_app(AdapterServer(reg, "tiny"))

    async def broken():
        raise RuntimeError("a secret detail")

    app.add_api_route("/v1/broken", broken)
    with TestClient(app, raise_server_exceptions=False) as http:
        r = http.get("/v1/broken")
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error"
    assert "secret" not in error["message"]
