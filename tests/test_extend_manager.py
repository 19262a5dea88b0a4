"""The plugin manager: entry points, throwaway plugins, every hook, broken plugins."""

import importlib.metadata
import json
import os
from pathlib import Path

import click
import pytest

from adaptr import AdaptrError, Formatter, ModelFamily, hookimpl
from adaptr.extend.catalog import families, family_for, formatters
from adaptr.extend.manager import PLUGINS

from helpers import fake_install, run_adaptr, throwaway_plugins, write_adapter

ROOT = Path(__file__).parent.parent
BUILTIN = {"llama", "gpt-neox", "qwen", "deepseek", "formatters"}


def test_builtins_come_through_the_entry_point_group():
    names = {ep.name for ep in importlib.metadata.entry_points(group="adaptr")}
    assert names >= BUILTIN
    loaded = {p["name"]: p for p in PLUGINS.listing()}
    for name in BUILTIN:
        assert loaded[name]["ok"] and loaded[name]["source"].startswith("adaptr ")
    assert set(families()) >= {"llama", "gpt-neox", "qwen", "deepseek"}
    assert set(formatters()) >= {
        "text",
        "alpaca",
        "dolly",
        "sharegpt",
        "messages",
        "prompt-completion",
        "translation",
    }


def test_loading_is_lazy_and_once():
    pm = PLUGINS.load()
    count = len(pm.get_plugins())
    assert PLUGINS.load() is pm and len(pm.get_plugins()) == count


class PhiPlugin:
    @hookimpl
    def adaptr_register_families(self, register):
        register(
            ModelFamily(name="phi3", model_types=["phi3"], target_modules=["qkv_proj", "o_proj"])
        )

    @hookimpl
    def adaptr_register_formatters(self, register):
        register(
            Formatter("qa", lambda r: {"prompt": r["q"], "completion": r["a"]}, fields=["q", "a"])
        )


def test_throwaway_plugin_adds_a_family_and_a_formatter(register_plugin, cli):
    register_plugin(PhiPlugin(), "phi")
    fam = families()["phi3"]
    assert (
        fam.plugin == "phi"
        and fam.targets("attention") == ["qkv_proj", "o_proj"]
        and fam.targets("all-linear") == "all-linear"
    )
    assert family_for({"model_type": "phi3"}) is not None
    assert formatters()["qa"]({"q": "1+1?", "a": "2"}) == {"prompt": "1+1?", "completion": "2"}
    doc = json.loads(cli("families", "--json")[1])
    assert {"name": "phi3", "plugin": "phi"}.items() <= next(
        f for f in doc["families"] if f["name"] == "phi3"
    ).items()
    assert "qa" in cli("formatters")[1]
    assert "phi" in json.dumps(json.loads(cli("plugins", "--json")[1]))


def test_throwaway_plugins_are_unregistered_on_exit():
    with throwaway_plugins() as register:  # what the register_plugin fixture runs
        register(PhiPlugin(), "phi")
        assert "phi3" in families()
    assert "phi3" not in families()


class Duplicate:
    @hookimpl
    def adaptr_register_families(self, register):
        register(ModelFamily(name="llama", model_types=["llama"], target_modules=["q_proj"]))


def test_duplicate_names_are_refused_naming_both_plugins(register_plugin, cli):
    register_plugin(Duplicate(), "my-llama")
    with pytest.raises(
        AdaptrError,
        match="registered by both 'llama' and 'my-llama'|registered by both 'my-llama' and 'llama'",
    ):
        families()
    code, _, err = cli("families")
    assert (
        code != 0
        and err.startswith("error: family 'llama' is registered by both")
        and len(err.splitlines()) == 1
    )


class ClaimsEverything:
    @hookimpl(tryfirst=True)
    def adaptr_family_for_config(self, config, families):
        return families["qwen"] if config.get("model_type") == "llama" else None


def test_family_lookup_hook_is_firstresult(register_plugin):
    assert family_for({"model_type": "llama"}).name == "llama"
    register_plugin(ClaimsEverything(), "claims")
    assert family_for({"model_type": "llama"}).name == "qwen"
    assert family_for({"model_type": "gpt_neox"}).name == "gpt-neox"
    # the built-in DeepSeek plugin claims DeepSeek-LLM (LLaMA architecture) by name
    assert family_for({"model_type": "mistral", "_name_or_path": "deepseek-ai/x"}).name == "llama"


class Hello:
    @hookimpl
    def adaptr_register_commands(self, cli):
        @cli.command()
        @click.argument("who")
        def hello(who):
            """Say hello (a plugin command)."""
            click.echo(f"hello {who}")


def test_plugins_add_cli_commands(register_plugin, cli):
    from adaptr.cli import AdaptrGroup
    from adaptr.cli import cli as group

    register_plugin(Hello(), "hello")
    AdaptrGroup.forget_plugin_commands()
    try:
        assert cli("hello", "world") == (0, "hello world\n", "")
        assert "hello" in cli("--help")[1]
    finally:
        group.commands.pop("hello", None)
        AdaptrGroup.forget_plugin_commands()


class Recorder:
    def __init__(self, fail=False):
        self.seen, self.fail = [], fail

    @hookimpl
    def adaptr_version_added(self, registry, version):
        self.seen.append((str(registry.home), version.ref))
        if self.fail:
            raise RuntimeError("webhook down")


def test_version_added_event(register_plugin, registry, adapter_dir):
    rec = register_plugin(Recorder(), "recorder")
    v = registry.add("legal", adapter_dir)
    assert rec.seen == [(str(registry.home), "legal@1")] and v.ref == "legal@1"


def test_a_failing_event_hook_does_not_undo_the_add(register_plugin, registry, adapter_dir):
    register_plugin(Recorder(fail=True), "failing")
    v = registry.add("legal", adapter_dir)
    assert registry.get("legal@1") and any("webhook down" in n for n in v.notes)


WEBHOOK = """
import sys
from adaptr import hookimpl

@hookimpl
def adaptr_version_added(registry, version):
    builtins = sorted(m for m in sys.modules if m.startswith("adaptr.plugins."))
    print(f"heard {version.ref}; built-ins imported: {builtins}", file=sys.stderr)
"""


def test_an_installed_plugin_hears_adds_without_the_builtins_loading(tmp_path):
    site = fake_install(tmp_path / "site", "adaptr-webhook", {"webhook": "adaptr_webhook"})
    (site / "adaptr_webhook.py").write_text(WEBHOOK)
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    src = write_adapter(tmp_path / "a")
    r = run_adaptr("add", "legal", str(src), home=tmp_path / "home", env=env)
    assert r.returncode == 0 and r.stdout.strip() == "legal@1"
    assert "heard legal@1; built-ins imported: []" in r.stderr


BROKEN = "raise ImportError('adaptr_broken needs a module that is not installed')\n"


def test_a_broken_third_party_plugin_is_named_not_fatal(tmp_path):
    site = fake_install(tmp_path / "site", "adaptr-broken", {"broken": "adaptr_broken"})
    (site / "adaptr_broken.py").write_text(BROKEN)
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    r = run_adaptr("families", home=tmp_path / "home", env=env)
    assert r.returncode == 0 and "llama" in r.stdout
    assert r.stderr.strip() == (
        "warning: plugin 'broken' failed to load and is skipped "
        "(ImportError: adaptr_broken needs a module that is not installed); fix it or uninstall "
        "it (pip uninstall adaptr-broken), or set ADAPTR_DISABLE_PLUGINS=broken to skip it"
    )
    r = run_adaptr("plugins", "--json", home=tmp_path / "home", env=env)
    entry = next(p for p in json.loads(r.stdout)["plugins"] if p["name"] == "broken")
    assert entry["ok"] is False and "ImportError" in entry["error"]
    src = write_adapter(tmp_path / "a")
    r = run_adaptr("add", "a", str(src), home=tmp_path / "home", env=env)
    assert r.returncode == 0 and r.stdout.strip() == "a@1"


def test_the_example_gpt2_plugin_package(tmp_path):
    """examples/adaptr-gpt2, installed through its entry point, adds an architecture."""
    pyproject = (ROOT / "examples" / "adaptr-gpt2" / "pyproject.toml").read_text()
    assert '[project.entry-points.adaptr]\ngpt2 = "adaptr_gpt2"' in pyproject
    site = fake_install(tmp_path / "site", "adaptr-gpt2", {"gpt2": "adaptr_gpt2"})
    env = {
        "PYTHONPATH": os.pathsep.join(
            [str(site), str(ROOT / "examples" / "adaptr-gpt2"), os.environ.get("PYTHONPATH", "")]
        )
    }
    r = run_adaptr("families", "--json", home=tmp_path / "home", env=env)
    fam = next(f for f in json.loads(r.stdout)["families"] if f["name"] == "gpt2")
    assert fam["plugin"] == "gpt2" and fam["model_types"] == ["gpt2"]
    code = (
        "import json, torch\n"
        "from peft import get_peft_model\n"
        "from adaptr.tiny import make_model\n"
        "from adaptr.training.lora import lora_config\n"
        "model = make_model('gpt2')\n"
        "cfg, fam = lora_config(model)\n"
        "peft = get_peft_model(model, cfg)\n"
        "out = peft(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]]))\n"
        "out.loss.backward()\n"
        "wrapped = sorted(n for n, m in peft.named_modules() if hasattr(m, 'lora_A') and not n.endswith(('lora_A', 'lora_B')))\n"
        "print(json.dumps({'family': fam.name, 'fan_in_fan_out': cfg.fan_in_fan_out, 'wrapped': wrapped}))\n"
    )
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}
    )
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    assert doc["family"] == "gpt2" and doc["fan_in_fan_out"] is True
    assert [w.removeprefix("base_model.model.") for w in doc["wrapped"]] == [
        f"transformer.h.{i}.attn.{m}" for i in range(2) for m in ("c_attn", "c_proj")
    ]
