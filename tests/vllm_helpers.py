"""A real vLLM server in tests: the vLLM venv's python (or a skip), `adaptr serve --engine vllm`
started and stopped, and greedy tokens from it and from PEFT to compare."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

VLLM_START_S = 900  # engine start takes 1-2.5 min on 2 idle cores; far more on a busy machine
# head_dim 64: vLLM's CPU attention does not take the 8 of adaptr's smallest tiny config
SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=2, initializer_range=0.2)  # fmt: skip
LORA8 = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
N = 12  # greedy tokens compared


def unavailable(why: str):
    """Skip (fail where CI built the vLLM venv and sets ADAPTR_REQUIRE_VLLM=1)."""
    if os.environ.get("ADAPTR_REQUIRE_VLLM", "") not in ("", "0"):
        pytest.fail(why)
    pytest.skip(why)


def vllm_python() -> str:
    """The vLLM venv's python that can import vllm and adaptr's plugin, else skip the test."""
    py = os.environ.get("ADAPTR_VLLM_PYTHON") or str(
        Path(__file__).resolve().parent.parent / ".venv-vllm" / "bin" / "python"
    )
    if not Path(py).is_file():
        unavailable(f"no vLLM venv ({py} missing; set ADAPTR_VLLM_PYTHON or see README)")
    probe = subprocess.run(
        [py, "-c", "import vllm, adaptr.serving.vllm.plugin"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if probe.returncode:
        unavailable(f"{py} cannot import vllm and adaptr's plugin: {probe.stderr.strip()[-300:]}")
    return py


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(env: dict, log_path: Path, *, base: str = "tiny", max_num_seqs: int = 8):
    """`adaptr serve --engine vllm --base BASE` (float32, eager, 256 tokens, 2 LoRA slots) with
    ``env`` (ADAPTR_HOME, ADAPTR_VLLM_PYTHON…), its output in ``log_path``; yields its /v1 URL
    once ``/v1/models`` answers (fails, with the log's tail, when it exits or is not up within
    VLLM_START_S), and stops it (the signal handed on to vLLM) when done."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "adaptr", "serve", "--engine", "vllm", "--base", base,
             "--port", str(port), "--", "--dtype", "float32", "--enforce-eager",
             "--max-model-len", "256", "--max-loras", "2", "--max-num-seqs", str(max_num_seqs)],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + VLLM_START_S
            while True:
                if proc.poll() is not None:
                    pytest.fail(
                        f"vLLM exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}"
                    )
                try:
                    if httpx.get(f"{url}/models", timeout=10).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"vLLM did not start in {VLLM_START_S} s:\n{log_path.read_text()[-3000:]}"
                    )
                time.sleep(2)
            yield url
        finally:
            proc.terminate()  # `adaptr serve` hands the signal on to vLLM
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)


def peft_tokens(reg, ref, prompt: str) -> list[int]:
    """Greedy tokens of ``ref`` (None: the bare base ``tiny``) through PEFT, as a reference."""
    import torch

    from adaptr import bases, inference

    if ref is None:
        model, tok = bases.load_base_model(reg.base_path("tiny"))
    else:
        model, tok, _ = inference.load(reg, [ref])
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=N, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def vllm_tokens(client, model: str, prompt: str) -> tuple[list[int], str]:
    """(greedy token ids, the answer's ``model``) of a completion on vLLM."""
    r = client.completions.create(
        model=model, prompt=prompt, max_tokens=N, temperature=0,
        extra_body={"return_token_ids": True},
    )  # fmt: skip
    return list(r.choices[0].token_ids), r.model
