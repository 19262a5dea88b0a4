from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from adaptr.registry import Registry  # noqa: E402

from helpers import snapshot, throwaway_plugins, write_adapter  # noqa: E402


@pytest.fixture
def home(tmp_path: Path, monkeypatch) -> Path:
    h = tmp_path / "home"
    monkeypatch.setenv("ADAPTR_HOME", str(h))
    return h


@pytest.fixture
def registry(home: Path) -> Registry:
    return Registry(home)


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    return write_adapter(tmp_path / "adapter", extra_files={"README.md": "# card\n"})


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process: returns (exit code, stdout, stderr)."""
    from adaptr.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A saved tiny LLaMA base (random weights) with its tokenizer."""
    from adaptr.tiny import save_tiny_base

    return save_tiny_base(tmp_path_factory.mktemp("bases") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def peft_adapters(tmp_path_factory, tiny_llama) -> dict[str, Path]:
    """Real adapters written by PEFT's save_pretrained on the tiny LLaMA (non-zero B)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("peft-adapters")
    configs = {
        "plain": LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        ),
        "dora": LoraConfig(
            r=4,
            target_modules=["q_proj", "v_proj"],
            use_dora=True,
            use_rslora=True,
            init_lora_weights=False,
        ),
        "all-linear": LoraConfig(
            r=2, target_modules="all-linear", lora_bias=True, init_lora_weights=False
        ),
        "embed": LoraConfig(
            r=4,
            target_modules=["embed_tokens", "q_proj"],
            rank_pattern={"q_proj": 2},
            init_lora_weights=False,
        ),
    }
    out = {}
    for name, cfg in configs.items():
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama)
        get_peft_model(model, cfg).save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture
def copy_dir(tmp_path: Path):
    def copy(src: Path, name: str = "copy") -> Path:
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst

    return copy


@pytest.fixture
def register_plugin():
    """Register throwaway plugin objects for one test; they are unregistered afterwards."""
    with throwaway_plugins() as register:
        yield register


@pytest.fixture
def populated(cli, home, tmp_path):
    """A registry holding p0@1 so that damage would show."""
    assert cli("add", "p0", str(write_adapter(tmp_path / "p0")))[0] == 0
    return snapshot(home)
