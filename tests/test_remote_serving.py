"""Serving from a store: AdapterServer and the vLLM resolver's source on a remote registry
follow a tag moved by another machine within the replica's TTL; train/compose/generate
land and read remotely."""

from __future__ import annotations

import time

import pytest

from adaptr.registry.remote.remote import RemoteRegistry

import remote_helpers
from helpers import LORA, random_lora, run_adaptr

seaweed, s3_home = remote_helpers.seaweed, remote_helpers.s3_home  # the fixtures


@pytest.fixture
def two_machines(s3_home, tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setenv("ADAPTR_REMOTE_TTL", "0.5")
    a = RemoteRegistry(s3_home.url, cache=tmp_path / "trainer")
    a.add_base("tiny", tiny_llama)
    for seed in (1, 2):
        a.add("foo", random_lora(tiny_llama, tmp_path / f"l{seed}", seed, **LORA), base="tiny")
    a.tag("foo@1", "prod")
    server_side = RemoteRegistry(s3_home.url, cache=tmp_path / "server")
    server_side.add_base("tiny", tiny_llama)  # this machine's folder for the base
    return a, server_side


def _until(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_adapter_server_follows_a_tag_move_on_the_store(two_machines):
    from adaptr.serving.server import AdapterServer

    a, reg = two_machines
    server = AdapterServer(reg, "tiny", max_adapters=4)
    prompt = ["The quick brown fox"]
    one = server.generate(prompt, ["foo@1"], max_new_tokens=6)
    two = server.generate(prompt, ["foo@2"], max_new_tokens=6)
    assert one != two  # the adapters differ in what they say
    assert server.generate(prompt, ["foo@prod"], max_new_tokens=6) == one
    a.tag("foo@2", "prod")  # on the other machine
    _until(
        lambda: server.generate(prompt, ["foo@prod"], max_new_tokens=6) == two,
        "the server never saw foo@prod move to foo@2",
    )


def test_vllm_source_resolves_and_follows_a_remote_tag(two_machines):
    from adaptr.serving.vllm.source import RegistrySource

    a, reg = two_machines
    source = RegistrySource(reg.home, base="tiny")  # the replica folder, as vLLM's env gives it
    assert isinstance(source.registry, RemoteRegistry)
    first = source.resolve("foo@prod")
    assert first.version_ref == "foo@1" and (first.path / "adapter_model.safetensors").is_file()
    a.tag("foo@2", "prod")
    _until(lambda: source.current("foo@prod").version == 2, "the source never followed the tag")


def test_generate_and_export_on_an_s3_home_from_a_fresh_cache(two_machines, s3_home, tmp_path):
    _, reg = two_machines
    env = s3_home.env(ADAPTR_HOME=str(reg.home))  # the replica folder of the bound machine
    r = run_adaptr("generate", "foo@prod", "Hello", "--max-new-tokens", "3", env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    unbound = s3_home.env(cache=tmp_path / "fresh")
    r = run_adaptr(
        "generate", "foo@prod", "Hello", "--max-new-tokens", "3", env=unbound, timeout=300
    )
    assert r.returncode != 0 and "not bound on this machine" in r.stderr
    assert r.stderr.count("\n") == 1


def test_train_eval_compose_merge_and_a_gated_tag_on_an_s3_home(two_machines, cli, tmp_path):
    import json
    from pathlib import Path

    _, reg = two_machines
    home = str(reg.home)  # the replica folder of a machine where the base is bound
    data = Path(__file__).parent.parent / "examples" / "data" / "translate_zh_en.jsonl"
    fast = ["--max-steps", "2", "--batch-size", "4", "--no-gradient-checkpointing"]
    code, out, err = cli("--home", home, "train", "--base", "tiny", "--data", str(data),
                         "--format", "alpaca", "--name", "zh", "--r", "4", *fast)  # fmt: skip
    assert code == 0, err
    other = RemoteRegistry(reg.url, cache=tmp_path / "third")
    assert [v.ref for v in other.list("zh")] == ["zh@1"]  # landed on the store
    pc = tmp_path / "pc.jsonl"
    pc.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n"
                          for p, c in (("1+1=", "2"), ("2+2=", "4"))))  # fmt: skip
    code, out, err = cli("--home", home, "eval", "foo@1", "foo@2", "--data", str(pc),
                         "--format", "prompt-completion", "--metrics", "loss")  # fmt: skip
    assert code == 0, err
    assert len(other.evals("foo@2")) == 1  # stored on the store, read by another machine
    code, out, err = cli("--home", home, "compose", "foo@1", "foo@2", "--weights", "0.5,0.5",
                         "--method", "linear", "--name", "mix")  # fmt: skip
    assert code == 0, err
    other.sync()
    assert other.get("mix").lineage
    code, out, err = cli("--home", home, "merge", "mix", "--out", str(tmp_path / "merged"))
    assert code == 0 and (tmp_path / "merged" / "config.json").is_file(), err
    loss = {r["ref"]: r["metrics"]["loss"] for r in (*other.evals("foo@1"), *other.evals("foo@2"))}
    worse = max(loss, key=loss.get)
    code, out, err = cli("--home", home, "tag", worse, "best", "--require", "loss<=0")
    assert code != 0 and err.startswith("error: ") and "loss" in err, err  # refused by the gate
    other.sync()
    assert "best" not in {t for v in other.list() for t in v.tags}
    better = min(loss, key=loss.get)
    code, out, err = cli("--home", home, "tag", better, "best", "--require", "loss<=1000")
    assert code == 0, err
    other.sync()  # within the TTL a reader may still see the tag where it was
    assert other.get("foo@best").ref == better
