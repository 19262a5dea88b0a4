"""adaptr serve: the work of a client that went away is cancelled, and logged in one line.

A request whose client disconnects while it waits is dropped before its batch starts; one
whose batch has started stops its row. No timing is assumed: the worker is held (or its
first forward blocked) until the disconnect has been seen.
"""

import json
import logging
import socket
import threading
from urllib.parse import urlsplit

import pytest

from helpers import START_S, client, expected, serve_tiny, wait_for


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with serve_tiny(tmp_path_factory.mktemp("http-cancel"), [("a", 1)], max_adapters=2) as s:
        yield s


def send_request(url: str, body: dict, path: str = "/v1/completions") -> socket.socket:
    """A connection that has sent ``body`` and reads nothing (the caller closes it)."""
    parts = urlsplit(url)
    data = json.dumps(body).encode()
    s = socket.create_connection((parts.hostname, parts.port), timeout=START_S)
    s.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return s


@pytest.fixture
def log(caplog):
    """The log records of adaptr's server and of uvicorn (which does not propagate them)."""
    caplog.set_level(logging.INFO, logger="adaptr.serving.openai.app")
    uvicorn_log = logging.getLogger("uvicorn")
    uvicorn_log.addHandler(caplog.handler)
    yield caplog
    uvicorn_log.removeHandler(caplog.handler)


def disconnect_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "disconnected" in r.getMessage()]


def check_logged_once(caplog) -> None:
    lines = disconnect_lines(caplog)
    assert len(lines) == 1, [r.getMessage() for r in lines]
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]  # no traceback, no error


def test_a_request_whose_client_left_is_dropped_before_its_batch(served, log):
    reg, url, app = served
    batcher = app.state.context.scheduler
    batches = []  # the jobs of each forward that ran
    hook = batcher.server.model.register_forward_pre_hook(
        lambda *_: batches.append(list(batcher.current))
    )
    start, dropped = batcher.submitted, batcher.dropped
    batcher.hold()
    try:
        conn = send_request(url, {"model": "a", "prompt": "gone soon", "max_tokens": 100})
        wait_for(lambda: batcher.submitted > start, "the request to be queued")
        job = next(j for j in list(batcher.waiting) if hasattr(j, "cancelled"))
        conn.close()
        wait_for(lambda: job.cancelled, "the server to see that the client went away")
    finally:
        batcher.release()
    try:
        # one worker, in order: when the next answer is back, the job before it was dealt with
        out = client(url).completions.create(model="a", prompt="next", max_tokens=4)
    finally:
        hook.remove()
    assert out.choices[0].text == expected(reg, "a", "next", 4)
    assert batcher.dropped == dropped + 1
    assert not any(j is job for jobs in batches for j in jobs), "the dropped job was generated"
    check_logged_once(log)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_started_row_stops_when_its_client_leaves(served, log, stream):
    reg, url, app = served
    batcher = app.state.context.scheduler
    started, go = threading.Event(), threading.Event()
    forwards = []

    def before_forward(module, args):
        forwards.append(list(batcher.current))
        if len(forwards) == 1:  # the first forward of the batch waits for the test
            started.set()
            go.wait(START_S)

    hook = batcher.server.model.register_forward_pre_hook(before_forward)
    try:
        try:
            body = {"model": "a", "prompt": "go on and on", "max_tokens": 200, "stream": stream}
            conn = send_request(url, body)
            assert started.wait(START_S), "the request's batch never started"
            job = batcher.current[0]
            conn.close()
            wait_for(lambda: job.cancelled, "the server to see that the client went away")
        finally:
            go.set()
        out = client(url).completions.create(model="a", prompt="next", max_tokens=4)  # after it
    finally:
        hook.remove()
    assert out.choices[0].text == expected(reg, "a", "next", 4)
    # the row was cancelled before its first forward ended: that forward is its last (one
    # more at most, were a stop check a step late), not 200
    mine = [jobs for jobs in forwards if any(j is job for j in jobs)]
    assert 1 <= len(mine) <= 2, len(mine)
    check_logged_once(log)
