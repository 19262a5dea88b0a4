"""adaptr serve --api-key: every /v1 route needs the key; the CLI warns when a server that
other machines can reach has none, and sets uvicorn's connection limits."""

import httpx
import openai
import pytest

from adaptr.registry import Registry

from helpers import START_S, client, expected, serve_tiny

KEY = "sk-test-8d1f2a"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    with serve_tiny(tmp_path_factory.mktemp("http-auth"), api_key=KEY) as (reg, url, _):
        yield reg, url


def bearer(key: str) -> dict:
    return {"Authorization": b"Bearer " + key.encode()}


@pytest.mark.parametrize(
    "headers",
    [{}, bearer("wrong"), bearer(KEY + "x"), bearer(KEY[:-1]), {"Authorization": KEY.encode()}],
    ids=["none", "wrong", "longer", "shorter", "no-scheme"],
)
@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/models"),
        ("POST", "/completions"),
        ("POST", "/chat/completions"),
        ("GET", "/nothing"),
    ],  # fmt: skip
)
def test_every_v1_route_needs_the_key(keyed, headers, method, path):
    _, url = keyed
    body = {"model": "tiny", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}
    r = httpx.request(method, url + path, json=body, headers=headers, timeout=START_S)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json() == {"error": {"message": r.json()["error"]["message"], "param": None,
                                  "type": "invalid_request_error", "code": "invalid_api_key"}}  # fmt: skip


def test_the_openai_client_with_the_key_is_served(keyed):
    reg, url = keyed
    api = client(url, KEY)
    assert [m.id for m in api.models.list().data] == ["tiny"]
    out = api.completions.create(model="tiny", prompt="Hello there", max_tokens=5)
    assert out.choices[0].text == expected(reg, None, "Hello there", 5)
    wrong = client(url, "nope")
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.models.list()
    assert e.value.body["code"] == "invalid_api_key"


def test_an_empty_key_is_refused(tiny_llama, tmp_path):
    from adaptr.errors import InvalidInputError
    from adaptr.serving import AdapterServer
    from adaptr.serving.openai.app import create_app

    reg = Registry(tmp_path / "home")
    reg.add_base("tiny", tiny_llama)
    with pytest.raises(InvalidInputError, match="API key is empty"):
        create_app(AdapterServer(reg, "tiny"), api_key="")


@pytest.fixture
def serve_cli(cli, registry, tiny_llama, monkeypatch):
    """`adaptr serve` up to the point where uvicorn would run: returns (code, stderr, config)."""
    import uvicorn

    registry.add_base("tiny", tiny_llama)
    started = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: started.append(self.config))
    monkeypatch.delenv("ADAPTR_API_KEY", raising=False)

    def run(*args: str):
        started.clear()
        code, _, err = cli("serve", "--base", "tiny", *args)
        return code, err, started[0] if started else None

    return run


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.7", "example.org"])
def test_serving_beyond_loopback_without_a_key_warns_once(serve_cli, host):
    code, err, config = serve_cli("--host", host)
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert code == 0 and config is not None
    assert len(warnings) == 1 and "--api-key" in warnings[0] and host in warnings[0], err


@pytest.mark.parametrize("args", [[], ["--host", "localhost"], ["--host", "::1"],
                                  ["--host", "127.0.0.2"], ["--host", "0.0.0.0", "--api-key", "k"]])  # fmt: skip
def test_no_warning_on_loopback_or_with_a_key(serve_cli, args):
    code, err, _ = serve_cli(*args)
    assert code == 0 and "warning:" not in err, err


def test_the_key_from_the_flag_or_the_environment_guards_the_app(serve_cli, monkeypatch):
    from fastapi.testclient import TestClient

    for args, env in ((["--api-key", "k1"], None), ([], "k1")):
        if env:
            monkeypatch.setenv("ADAPTR_API_KEY", env)
        code, err, config = serve_cli("--host", "0.0.0.0", *args)
        assert code == 0 and "warning:" not in err, err
        with TestClient(config.app) as http:
            assert http.get("/v1/models").status_code == 401
            r = http.get("/v1/models", headers={"Authorization": "Bearer k1"})
            assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny"


def test_uvicorn_gets_connection_limits_and_the_body_limit(serve_cli):
    code, _, config = serve_cli("--max-connections", "64", "--max-body-mb", "1.5")
    assert code == 0
    assert (config.timeout_keep_alive, config.limit_concurrency) == (5, 64)
    assert config.app.state.context.limits.max_body_bytes == int(1.5 * 2**20)
    _, _, config = serve_cli()
    assert (config.timeout_keep_alive, config.limit_concurrency) == (5, 512)
    assert config.app.state.context.limits.max_body_bytes == 4 * 2**20
    code, err, _ = serve_cli("--max-body-mb", "0")
    assert code != 0 and "max-body-mb" in err


def test_compute_threads_default_to_the_cores_less_one(serve_cli, monkeypatch):
    import os

    import torch

    from adaptr.cli.serve import default_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
        assert default_threads() == 3
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
        assert default_threads() == 1
        code, err, _ = serve_cli()
        assert code == 0 and torch.get_num_threads() == 1, err
        code, err, _ = serve_cli("--threads", "2")
        assert code == 0 and torch.get_num_threads() == 2, err
        code, err, _ = serve_cli("--threads", "0")
        assert code == 2 and "--threads" in err
        code, err, _ = serve_cli("--engine", "vllm", "--threads", "2")
        assert code == 2 and "--threads is the embedded engine's" in err
    finally:
        torch.set_num_threads(before)
