"""Test helpers: synthetic adapter folders, registry snapshots, running the CLI."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

MODULES = ("q_proj", "v_proj")


def write_adapter(
    path: Path,
    *,
    r: int = 4,
    hidden: int = 32,
    layers: int = 2,
    modules: tuple[str, ...] = MODULES,
    base: str | None = None,
    seed: int = 0,
    extra_files: dict[str, str] | None = None,
    **config,
) -> Path:
    """A PEFT-format LoRA folder written without torch/peft (keys and config as PEFT writes them).

    Shapes fit the tiny LLaMA of ``adaptr.tiny`` when ``hidden`` is 32.
    """
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(layers):
        for m in modules:
            key = f"base_model.model.model.layers.{layer}.self_attn.{m}"
            tensors[f"{key}.lora_A.weight"] = rng.standard_normal((r, hidden), dtype=np.float32)
            out = hidden // 2 if m in ("k_proj", "v_proj") else hidden  # the tiny LLaMA uses GQA
            tensors[f"{key}.lora_B.weight"] = rng.standard_normal((out, r), dtype=np.float32)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
        "target_modules": list(modules), "bias": "none", "use_dora": False, "use_rslora": False,
        "base_model_name_or_path": base, **config,
    }  # fmt: skip
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    for name, text in (extra_files or {}).items():
        (path / name).write_text(text)
    return path


def snapshot(home: Path) -> dict:
    """Everything a registry holds: every index row and every stored file's content hash."""
    out: dict = {"tables": {}, "files": {}}
    db = home / "registry.db"
    if db.exists():
        conn = sqlite3.connect(db)
        for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'"):
            out["tables"][table] = sorted(map(repr, conn.execute(f"SELECT * FROM {table}")))
        conn.close()
    blobs = home / "blobs"
    if blobs.exists():
        for p in sorted(blobs.rglob("*")):
            if p.is_file():
                out["files"][str(p.relative_to(home))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@contextmanager
def throwaway_plugins():
    """Yield ``register(plugin, name)``; every plugin registered is unregistered on exit."""
    from adaptr.extend.manager import PLUGINS

    pm = PLUGINS.load()
    added = []

    def register(plugin, name: str):
        pm.register(plugin, name=name)
        added.append(plugin)
        return plugin

    try:
        yield register
    finally:
        for plugin in added:
            pm.unregister(plugin)


def refused(cli, home, before, *args, match: str, max_len: int = 400, last: bool = False) -> str:
    """Run the CLI in-process and check the refusal: non-zero exit, one short ``error:`` line
    (with ``last``, the last of the lines, after any notes) containing ``match``, no
    traceback, no internal error, and the registry ``before`` unchanged (None: not checked)."""
    code, out, err = cli(*args)
    assert code != 0, (out, err)
    lines = err.strip().splitlines()
    assert lines and (last or len(lines) == 1), err[:2000]
    line = lines[-1]
    assert line.startswith("error: ") and "Traceback" not in err, err[:2000]
    assert "internal error" not in line and match in line, line
    assert len(line) <= max_len, len(line)
    if before is not None:
        assert snapshot(home) == before
    return line


def run_adaptr(
    *args: str, home: Path | None = None, env: dict | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run the real console entry point in a fresh interpreter."""
    import os

    full_env = {**os.environ, **(env or {})}
    if home is not None:
        full_env["ADAPTR_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-c", "from adaptr.cli import run; run()", *args],
        capture_output=True, text=True, env=full_env, timeout=timeout,
    )  # fmt: skip


def fake_install(site: Path, dist: str, entry_points: dict[str, str]) -> Path:
    """Make ``dist`` look pip-installed in ``site``: a dist-info with its adaptr entry points."""
    info = site / f"{dist.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(
        "[adaptr]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    )
    return site


def random_lora(base: Path, path: Path, seed: int, scale_b: float = 3.0, **spec) -> Path:
    """A PEFT LoRA on ``base`` with random A and B (B scaled so the adapter changes greedy choices)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(init_lora_weights=False, **spec)
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(scale_b)
    model.save_pretrained(path)
    return path


# -- the OpenAI-compatible server (adaptr serve) in tests ------------------------------------

START_S = 120  # generous deadlines: the machine may be busy; a wait past one fails, saying what
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}  # serve_tiny's default


def wait_for(condition, what: str, timeout: float = START_S) -> None:
    """Wait until ``condition()`` holds; fail saying ``what`` did not happen in ``timeout`` s."""
    import time

    import pytest

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def running(app, **config):
    """Serve ``app`` in a thread (:func:`adaptr.serving.openai.app.serve_in_thread`); yields the
    /v1 URL. Not started within START_S, or not stopped within 60 s: a RuntimeError."""
    from adaptr.serving.openai.app import serve_in_thread

    config.setdefault("log_level", "error")
    return serve_in_thread(app, start_timeout_s=START_S, stop_timeout_s=60, **config)


@contextmanager
def serve_tiny(root: Path, adapters=(), *, max_adapters: int | None = None, **app_kw):
    """A tiny LLaMA registered as base ``tiny`` in ``root / "home"``, with ``adapters``
    added in order (``(name, seed)`` or ``(name, seed, peft spec)``; the spec is LORA unless
    given), served over HTTP (``app_kw`` go to ``create_app``); yields (registry, /v1 URL, app)."""
    from adaptr.registry import Registry
    from adaptr.serving import AdapterServer
    from adaptr.serving.openai.app import create_app
    from adaptr.tiny import save_tiny_base

    base = save_tiny_base(root / "base", "llama", initializer_range=0.2)
    reg = Registry(root / "home")
    reg.add_base("tiny", base)
    for name, seed, *spec in adapters:
        path = random_lora(base, root / f"{name}-{seed}", seed, **(spec[0] if spec else LORA))
        reg.add(name, path, base="tiny")
    server_kw = {} if max_adapters is None else {"max_adapters": max_adapters}
    app = create_app(AdapterServer(reg, "tiny", **server_kw), **app_kw)
    with running(app) as url:
        yield reg, url, app


def client(url: str, key: str = "unused", timeout: float = START_S):
    """The official openai client for the server at ``url`` (no retries)."""
    import openai

    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=timeout)


def post_raw(url: str, path: str, raw: str | bytes):
    """POST ``raw`` as a JSON body to ``url + path``, as it is (it may not be valid JSON)."""
    import httpx

    content = raw.encode() if isinstance(raw, str) else raw
    headers = {"content-type": "application/json"}
    return httpx.post(f"{url}{path}", content=content, headers=headers, timeout=START_S)


def expected(reg, ref, prompt, n, chat=False):
    """What ``ref`` (an adapter ref, or None for the bare base ``tiny``) generates for
    ``prompt`` on its own, greedy, ``n`` new tokens: the answer a server must give."""
    from adaptr import inference

    model, tok, _ = inference.load(reg, [ref]) if ref else (None, None, None)
    if ref is None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = reg.base_path("tiny")
        model, tok = (
            AutoModelForCausalLM.from_pretrained(path).eval(),
            AutoTokenizer.from_pretrained(path),
        )
    return inference.generate(model, tok, prompt, max_new_tokens=n, chat=chat)


# -- SFT recipes and data for the training tests (test_data_sft, test_preview, test_trainer)
FAST = {"max_steps": 1, "per_device_train_batch_size": 8, "gradient_checkpointing": False}
LONG = "word " * 200  # ~1,000 characters: past max_length=64 for the tiny byte-level tokenizer


def alpaca_file(path: Path, long_every: int = 0, n: int = 8) -> Path:
    """Alpaca records; every ``long_every``-th has an input past max_length=64."""
    rows = []
    for i in range(n):
        extra = LONG if long_every and i % long_every == 0 else ""
        rows.append({"instruction": f"Say {i}.", "input": extra, "output": f"{i} it is."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe(name: str, base: Path, data: Path, fmt: str = "alpaca", data_extra=None, **sft) -> dict:
    return {
        "name": name,
        "base": {"path": str(base)},
        "data": {"path": str(data), "format": fmt, **(data_extra or {})},
        "lora": {"r": 2, "target_modules": ["q_proj", "v_proj"]},
        "sft": {**FAST, **sft},
    }


# -- data for the evaluation tests (test_evaluation_run, _gates, _metrics)
PAIRS = [("Q: 2+2?\nA:", " 4"), ("Say hi:", " hello there"), ("Color of sky:", " blue"),
         ("Q: capital of France?\nA:", " Paris"), ("Count:", " 1 2 3")]  # fmt: skip
ZH_REFS = ["我喜欢吃香蕉", "今天天气不错", "他在上海工作了三年"]
