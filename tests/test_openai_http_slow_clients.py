"""adaptr serve: a client that trickles bytes holds no connection past its deadlines, on any
route, key or not; the answers uvicorn's protocol gives itself (a 400 for what is not HTTP,
the 503 past --max-connections) are OpenAI-shaped.

Real sockets to a real uvicorn (``running``): a request's head goes out whole, then its body
a byte at a time, and the server must answer and then drop the connection, never wait for
the body forever. With ``--max-connections 8``, 8 such keyless clients must not lock out
the clients that have the key.
"""

import json
import socket
import threading
from urllib.parse import urlsplit

import httpx
import pytest

from helpers import START_S, client, expected, running

KEY = "sk-slow-5e1b"
LIMIT = 8
BODY = 10**6  # announced; never all sent


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    """base ``tiny`` served with a key and at most LIMIT connections (adaptr serve's settings)."""
    from adaptr.registry import Registry
    from adaptr.serving import AdapterServer
    from adaptr.serving.openai.app import create_app
    from adaptr.tiny import save_tiny_base

    root = tmp_path_factory.mktemp("http-slow")
    reg = Registry(root / "home")
    reg.add_base("tiny", save_tiny_base(root / "base", "llama", initializer_range=0.2))
    app = create_app(AdapterServer(reg, "tiny"), api_key=KEY)
    with running(app, limit_concurrency=LIMIT) as url:
        yield reg, url


@pytest.fixture
def quick_drain(monkeypatch):
    from adaptr.serving.openai.http import GuardedH11Protocol

    monkeypatch.setattr(GuardedH11Protocol, "drain_s", 0.5)


def head(method: str, path: str, key: str | None, length: int = BODY, extra: str = "") -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode()


class Trickler:
    """A raw connection: a request head, then its body a byte at a time."""

    def __init__(self, url: str, data: bytes):
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=START_S)
        self.sock.sendall(data)
        self.got = b""

    def answer(self) -> tuple[int, dict, dict]:
        """The first answer's status, headers and JSON body (whole, by its Content-Length)."""
        while b"\r\n\r\n" not in self.got:
            self._more()
        top, _, rest = self.got.partition(b"\r\n\r\n")
        lines = top.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        while len(rest) < int(headers["content-length"]):
            self._more()
            rest = self.got.partition(b"\r\n\r\n")[2]
        size = int(headers["content-length"])
        self.got = rest[size:]
        return int(lines[0].split()[1]), headers, json.loads(rest[:size])

    def _more(self) -> None:
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            pytest.fail(f"no whole answer within {START_S} s; got {self.got[:300]!r}")
        if not chunk:
            pytest.fail(f"the connection closed before a whole answer; got {self.got[:300]!r}")
        self.got += chunk

    def trickle(self) -> bool:
        """Send one more byte of the body; False once the server has closed the connection."""
        try:
            self.sock.sendall(b" ")
            self.sock.settimeout(0.1)
            try:
                if not self.sock.recv(65536):
                    return False  # closed (any answer was read before)
            except TimeoutError:
                pass  # still open, nothing said
        except OSError:  # reset, broken pipe
            return False
        finally:
            self.sock.settimeout(START_S)
        return True

    def dropped_within(self, timeout: float) -> bool:
        """Trickle until the server drops the connection (True) or ``timeout`` s pass."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.trickle():
                return True
        return False

    def close(self) -> None:
        self.sock.close()


def assert_openai_error(status: int, headers: dict, body: dict, want: int) -> None:
    assert status == want, (status, body)
    assert headers["content-type"] == "application/json", headers
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"], body
    assert body["error"]["type"] == ("invalid_request_error" if want < 500 else "server_error")


ANSWERED_UNREAD = [
    # (method, path, key, status): answers given without reading the body
    ("POST", "/v1/completions", None, 401),
    ("POST", "/v1/chat/completions", "wrong", 401),
    ("POST", "/v1/nothing", KEY, 404),
    ("POST", "/nothing", None, 404),
    ("GET", "/v1/completions", KEY, 405),
    ("GET", "/v1/models", KEY, 200),  # a GET with a body
    ("GET", "/v1/models/tiny", KEY, 200),
]


@pytest.mark.parametrize("method, path, key, status", ANSWERED_UNREAD, ids=lambda v: str(v))
def test_an_answer_given_before_the_body_drops_a_trickling_client(
    slow, quick_drain, method, path, key, status
):
    _, url = slow
    t = Trickler(url, head(method, path, key) + b'{"model": "tiny", ')
    try:
        got, headers, body = t.answer()
        if status == 200:
            assert got == 200 and "error" not in body, body
        else:
            assert_openai_error(got, headers, body, status)
        # the rest of the body comes a byte at a time, forever: the server stops reading it
        assert t.dropped_within(START_S), f"{method} {path}: still open after {START_S} s"
    finally:
        t.close()


def test_a_body_that_does_come_keeps_the_connection_alive(slow, quick_drain):
    """The rest of an unread body, sent at once, is dropped: the connection then serves the
    next request, and is closed by the keep-alive timeout once idle."""
    _, url = slow
    body = b'{"model": "tiny"}'
    t = Trickler(url, head("GET", "/v1/models", KEY, len(body)) + body[:5])
    try:
        assert t.answer()[0] == 200
        t.sock.sendall(body[5:] + head("GET", "/v1/models", KEY, 0))
        status, _, listing = t.answer()
        assert status == 200 and listing["data"][0]["id"] == "tiny"
        t.sock.settimeout(START_S)
        try:
            assert t.sock.recv(65536) == b""  # idle: closed by the keep-alive timeout (5 s)
        except TimeoutError:
            pytest.fail(f"an idle keep-alive connection still open after {START_S} s")
    finally:
        t.close()


def test_keyless_tricklers_do_not_lock_out_keyed_clients(slow, monkeypatch):
    """8 connections answered 401 that keep sending their bodies, with --max-connections 8:
    a client with the key is still served (and so is a completion), while they trickle."""
    from adaptr.serving.openai.http import GuardedH11Protocol

    reg, url = slow
    monkeypatch.setattr(GuardedH11Protocol, "drain_s", START_S)  # they stay open meanwhile
    tricklers = [Trickler(url, head("POST", "/v1/completions", None) + b"{") for _ in range(LIMIT)]
    stop = threading.Event()

    def keep_trickling():
        while not stop.is_set():
            for t in tricklers:
                t.trickle()

    pump = threading.Thread(target=keep_trickling, daemon=True)
    try:
        for t in tricklers:
            assert_openai_error(*t.answer(), 401)
        pump.start()
        r = httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=START_S)
        assert r.status_code == 200, r.text
        out = client(url, KEY).completions.create(model="tiny", prompt="Hello there", max_tokens=4)
        assert out.choices[0].text == expected(reg, None, "Hello there", 4)
    finally:
        stop.set()
        if pump.is_alive():
            pump.join(START_S)
        for t in tricklers:
            t.close()


def test_past_max_connections_the_503_is_openai_shaped(slow, monkeypatch):
    from adaptr.serving.openai.http import GuardedH11Protocol

    _, url = slow
    monkeypatch.setattr(GuardedH11Protocol, "header_timeout_s", START_S)
    # LIMIT connections that have not finished their headers hold every place
    holders = [Trickler(url, b"GET /v1/models HTTP/1.1\r\n") for _ in range(LIMIT)]
    try:
        extra = Trickler(url, head("GET", "/v1/models", KEY, 0))
        try:
            status, headers, body = extra.answer()
            assert_openai_error(status, headers, body, 503)
            assert "--max-connections" in body["error"]["message"]
        finally:
            extra.close()
    finally:
        for t in holders:
            t.close()
    # the places are free again (the server notices each close soon, but not at once)
    from helpers import wait_for

    def served() -> bool:
        r = httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=START_S)
        return r.status_code == 200

    wait_for(served, "a request to be served once the connections closed")


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000,  # (and no end)
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
    ids=["request-line", "header", "header-too-large", "chunk-size"],
)
def test_what_is_not_http_gets_an_openai_shaped_400(slow, raw):
    _, url = slow
    t = Trickler(url, raw)
    try:
        assert_openai_error(*t.answer(), 400)
    finally:
        t.close()


def test_a_pipelined_request_is_read_whole_not_drained(slow, quick_drain):
    """A request sent right behind another (pipelined) has its body read by the app as usual,
    however long after the first answer its body comes; only an unread body is dropped."""
    import time

    reg, url = slow
    body = json.dumps({"model": "tiny", "prompt": "Hello there", "max_tokens": 3}).encode()
    first = head("GET", "/v1/models", KEY, 0)
    t = Trickler(url, first + head("POST", "/v1/completions", KEY, len(body)) + body[:10])
    try:
        assert t.answer()[0] == 200
        time.sleep(1.5)  # past the drain's 0.5 s: the second body is the app's to wait for
        t.sock.sendall(body[10:])
        status, _, out = t.answer()
        assert status == 200 and out["choices"][0]["text"] == expected(reg, None, "Hello there", 3)
    finally:
        t.close()
