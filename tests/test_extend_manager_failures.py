"""Plugins that misbehave at call time or at import: each is named in one line, never an
internal error, never the end of the command that happened to load it; what is stored stays."""

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import click
import pytest

from adaptr import Formatter, ModelFamily, hookimpl
from adaptr.errors import InterruptedAfterStore, PluginError
from adaptr.extend.catalog import families, family_for, formatters
from adaptr.extend.manager import PLUGINS
from adaptr.registry import Registry

from helpers import fake_install, refused, run_adaptr, snapshot, write_adapter

EDITABLE = any("Editable" in repr(f) for f in sys.meta_path)


def _entry(name: str) -> dict:
    return next(p for p in PLUGINS.listing() if p["name"] == name)


# -- look-up hooks ---------------------------------------------------------------------------


class RaisesOnConfig:
    @hookimpl(tryfirst=True)
    def adaptr_family_for_config(self, config, families):
        raise ValueError(f"cannot read {config.get('model_type')}")


def test_a_raising_family_for_config_names_the_plugin_and_the_hook(register_plugin):
    register_plugin(RaisesOnConfig(), "raiser")
    with pytest.raises(PluginError) as e:
        family_for({"model_type": "llama"})
    msg = str(e.value)
    assert msg.startswith(
        "plugin 'raiser' failed in adaptr_family_for_config (ValueError: cannot read llama)"
    ), msg
    assert e.value.plugin == "raiser" and e.value.hook == "adaptr_family_for_config"
    assert "unregister" in msg  # registered in code: no package to uninstall


def test_train_with_a_raising_family_for_config_is_one_line(
    register_plugin, cli, home, tmp_path, tiny_llama
):
    assert cli("add", "legal", str(write_adapter(tmp_path / "a")))[0] == 0
    before = snapshot(home)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "hi", "output": "yo"}) + "\n")
    register_plugin(RaisesOnConfig(), "raiser")
    line = refused(
        cli, home, before, "train", "--base", str(tiny_llama), "--data", str(data),
        "--format", "alpaca", "--name", "x", "--max-steps", "1",
        match="plugin 'raiser' failed in adaptr_family_for_config (ValueError: cannot read llama)",
    )  # fmt: skip
    assert "nothing was stored" not in line


class ReturnsJunk:
    @hookimpl(tryfirst=True)
    def adaptr_family_for_config(self, config, families):
        return "llama"


def test_a_family_for_config_answer_that_is_not_a_family_is_named(register_plugin):
    register_plugin(ReturnsJunk(), "junk")
    with pytest.raises(PluginError, match="plugin 'junk' .*adaptr_family_for_config.*'llama'"):
        family_for({"model_type": "llama"})


class ExitsOnConfig:
    @hookimpl(tryfirst=True)
    def adaptr_family_for_config(self, config, families):
        sys.exit(3)


def test_sys_exit_in_a_look_up_hook_does_not_end_the_process(register_plugin):
    register_plugin(ExitsOnConfig(), "exits")
    with pytest.raises(PluginError, match="plugin 'exits' failed in adaptr_family_for_config"):
        family_for({"model_type": "llama"})


class HalfFormatters:
    @hookimpl
    def adaptr_register_formatters(self, register):
        register(Formatter("half", lambda r: {"text": r["t"]}, kind="text"))
        raise ValueError("formatter table corrupt")


def test_a_raising_register_hook_is_skipped_with_a_note_naming_it(register_plugin, cli):
    register_plugin(HalfFormatters(), "halfway")
    fmts = formatters()
    assert "half" not in fmts and "alpaca" in fmts  # what it registered before failing is dropped
    entry = _entry("halfway")
    assert entry["ok"] is False and "adaptr_register_formatters" in entry["error"]
    code, out, err = cli("formatters")
    assert code == 0 and "alpaca" in out and "half " not in out
    assert err.strip() == (
        "warning: plugin 'halfway' failed in adaptr_register_formatters and is skipped "
        "(ValueError: formatter table corrupt); fix it or unregister it"
    ), err
    code, out, err = cli("plugins")
    assert code == 0 and "halfway" in out and "formatter table corrupt" in out


class BadFamily:
    @hookimpl
    def adaptr_register_families(self, register):
        register(ModelFamily(name="nothing", model_types=[], target_modules=["x"]))


def test_a_plugin_registering_an_invalid_family_breaks_no_command(register_plugin, cli):
    register_plugin(BadFamily(), "badfam")
    fams = families()
    assert "llama" in fams and "nothing" not in fams
    assert family_for({"model_type": "qwen2"}).name == "qwen"
    code, out, err = cli("families")
    assert code == 0 and "llama" in out
    assert "plugin 'badfam' failed in adaptr_register_families" in err
    assert "names no model_types" in err and len(err.strip().splitlines()) == 1


class FamilyA:
    @hookimpl
    def adaptr_register_families(self, register):
        register(ModelFamily(name="fam-a", model_types=["fam_a"], target_modules=["x"]))


class FamilyB:
    @hookimpl
    def adaptr_register_families(self, register):
        register(ModelFamily(name="fam-b", model_types=["fam_b"], target_modules=["x"]))


def test_a_new_plugin_object_never_passes_for_a_freed_one_in_the_cache():
    """CPython gives a new object the address of one just freed: the families collected with
    the old plugin must not be served for the new one (CI once saw a stale listing)."""
    from adaptr.extend.manager import PLUGINS

    pm = PLUGINS.load()
    for _ in range(20):  # an id reused is likely on every try, certain on none
        a = FamilyA()
        pm.register(a, name="fam-a-plugin")
        assert "fam-a" in families()
        pm.unregister(a)
        del a
        b = FamilyB()
        pm.register(b, name="fam-b-plugin")
        try:
            fams = families()
        finally:
            pm.unregister(b)
        assert "fam-b" in fams and "fam-a" not in fams, sorted(fams)
        del b
    assert "fam-a" not in families() and "fam-b" not in families()


class BadCommands:
    @hookimpl
    def adaptr_register_commands(self, cli):
        raise RuntimeError("no commands today")


@contextmanager
def fresh_commands():
    from adaptr.cli import AdaptrGroup
    from adaptr.cli import cli as group

    builtin = dict(group.commands)
    AdaptrGroup.forget_plugin_commands()
    try:
        yield
    finally:
        group.commands.clear()
        group.commands.update(builtin)
        AdaptrGroup.forget_plugin_commands()


def test_a_raising_register_commands_keeps_the_cli_working(register_plugin, cli):
    register_plugin(BadCommands(), "badcmds")
    with fresh_commands():
        code, out, err = cli("--help")
        assert code == 0 and "Commands:" in out
        assert err.startswith(
            "warning: plugin 'badcmds' failed in adaptr_register_commands and is skipped "
            "(RuntimeError: no commands today)"
        ), err
    with fresh_commands():
        code, _, err = cli("frobnicate")
        lines = err.strip().splitlines()
        assert code == 2 and "No such command" in lines[-1] and "badcmds" in lines[0], err


# -- event hooks -----------------------------------------------------------------------------


class CtrlC:
    @hookimpl
    def adaptr_version_added(self, registry, version):
        raise KeyboardInterrupt


def test_ctrl_c_in_version_added_says_the_version_is_stored(register_plugin, cli, home, tmp_path):
    src = write_adapter(tmp_path / "a")
    register_plugin(CtrlC(), "slow-webhook")
    code, out, err = cli("add", "legal", str(src))
    lines = err.strip().splitlines()
    assert code == 130 and out == "" and len(lines) == 1, err
    assert lines[0].startswith("error: interrupted in "), lines
    assert "legal@1 is stored" in lines[0] and "nothing was stored" not in err
    assert Registry(home).get("legal@1").ref == "legal@1"
    # the Python API: a KeyboardInterrupt (whatever stops on Ctrl-C still stops) with the ref
    with pytest.raises(InterruptedAfterStore) as e:
        Registry(home).add("legal", src)
    assert isinstance(e.value, KeyboardInterrupt) and e.value.ref == "legal@2"
    assert sorted(v.ref for v in Registry(home).list("legal")) == ["legal@1", "legal@2"]


class Exits:
    @hookimpl
    def adaptr_version_added(self, registry, version):
        sys.exit(1)


class Recorder:
    def __init__(self):
        self.seen = []

    @hookimpl
    def adaptr_version_added(self, registry, version):
        self.seen.append(version.ref)


def test_sys_exit_in_version_added_is_a_noted_failure_not_an_exit(
    register_plugin, cli, home, tmp_path
):
    rec = register_plugin(Recorder(), "recorder")
    register_plugin(Exits(), "quitter")  # called first (pluggy calls the newest first)
    code, out, err = cli("add", "legal", str(write_adapter(tmp_path / "a")))
    assert code == 0 and out == "legal@1\n", (out, err)
    assert "plugin 'quitter' failed in adaptr_version_added" in err and "legal@1 is stored" in err
    assert rec.seen == ["legal@1"]  # one failing plugin does not stop the others


# -- plugins that end the process at import --------------------------------------------------

QUITTERS = {
    "exit0": ("import sys\nsys.exit(0)\n", "SystemExit"),
    "exit1": ("import sys\nsys.exit(1)\n", "SystemExit"),
    "base": ("raise BaseException('plugin gave up')\n", "BaseException: plugin gave up"),
}


def _installed(tmp_path: Path, module: str, body: str) -> dict:
    site = fake_install(tmp_path / "site", "adaptr-quitter", {"quitter": module})
    (site / f"{module}.py").write_text(body)
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.parametrize("kind", sorted(QUITTERS))
def test_a_plugin_ending_the_process_at_import_is_listed_as_failed(tmp_path, kind):
    body, reason = QUITTERS[kind]
    env = _installed(tmp_path, "adaptr_quitter", body)
    home = tmp_path / "home"
    r = run_adaptr("add", "a", str(write_adapter(tmp_path / "a")), home=home, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "a@1", (r.stdout, r.stderr)
    assert "warning: plugin 'quitter' failed to load and is skipped" in r.stderr, r.stderr
    assert (
        "pip uninstall adaptr-quitter" in r.stderr and "ADAPTR_DISABLE_PLUGINS=quitter" in r.stderr
    )
    assert [v.ref for v in Registry(home).list()] == ["a@1"]
    r = run_adaptr("plugins", "--json", home=home, env=env)
    assert r.returncode == 0, r.stderr
    entry = next(p for p in json.loads(r.stdout)["plugins"] if p["name"] == "quitter")
    assert entry["ok"] is False and reason in entry["error"]
    r = run_adaptr("plugins", home=home, env=env)
    assert r.returncode == 0 and "quitter" in r.stdout and "BROKEN" in r.stdout


def test_adaptr_disable_plugins_skips_a_plugin(tmp_path):
    env = _installed(tmp_path, "adaptr_quitter", "raise ImportError('broken on purpose')\n")
    env["ADAPTR_DISABLE_PLUGINS"] = "quitter, other"
    r = run_adaptr("formatters", home=tmp_path / "home", env=env)
    assert r.returncode == 0 and "alpaca" in r.stdout and r.stderr == "", r.stderr
    r = run_adaptr("plugins", "--json", home=tmp_path / "home", env=env)
    entry = next(p for p in json.loads(r.stdout)["plugins"] if p["name"] == "quitter")
    assert entry["ok"] is False and entry["disabled"] is True
    assert "DISABLED" in run_adaptr("plugins", home=tmp_path / "home", env=env).stdout


# -- --debug anywhere ------------------------------------------------------------------------


class Boom:
    @hookimpl
    def adaptr_register_commands(self, cli):
        @cli.command()
        @click.argument("words", nargs=-1)
        def boom(words):
            """Echo WORDS, or fail like a bug."""
            if not words:
                raise RuntimeError("kaboom")
            click.echo(" ".join(words))


def test_debug_is_accepted_after_the_subcommand(register_plugin, cli, home):
    code, _, err = cli("show", "nope", "--debug")
    assert code == 3 and "No such option" not in err and "unknown adapter 'nope'" in err
    register_plugin(Boom(), "boom")
    with fresh_commands():
        code, _, err = cli("boom")
        assert code == 1 and "rerun with --debug" in err and "Traceback" not in err
        code, _, err = cli("boom", "--debug")
        assert code == 1 and "Traceback" in err and "RuntimeError: kaboom" in err
        assert err.strip().splitlines()[-1].startswith("error: internal error (RuntimeError")
        assert cli("boom", "--", "--debug") == (0, "--debug\n", "")  # after --: an argument


# -- a folder in the current directory that shadows adaptr -----------------------------------


def _run_in(cwd: Path, *args: str, code: str = "from adaptr.cli import run; run()"):
    env = {**os.environ, "ADAPTR_HOME": str(cwd / "home")}
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, env=env,
        timeout=120,
    )  # fmt: skip


def test_stale_package_metadata_in_the_current_folder_hides_no_builtin(tmp_path):
    """importlib.metadata keeps the first distribution named adaptr on sys.path: a stale
    adaptr.egg-info in the current folder (python -c puts it first) named gone modules."""
    info = tmp_path / "adaptr.egg-info"
    info.mkdir()
    (info / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: adaptr\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text(
        "[adaptr]\nllama = adaptr_old.llama\nformatters = adaptr_old.formatters\n"
    )
    r = _run_in(tmp_path, "formatters")
    assert r.returncode == 0 and "alpaca" in r.stdout and r.stderr == "", r.stderr
    r = _run_in(tmp_path, "families", "--json")
    assert {"llama", "qwen"} <= {f["name"] for f in json.loads(r.stdout)["families"]}, r.stderr


@pytest.mark.skipif(not EDITABLE, reason="shadowing by a folder is an editable-install trait")
def test_a_folder_named_adaptr_in_the_current_directory_is_named(tmp_path):
    (tmp_path / "adaptr").mkdir()  # e.g. the checkout itself, run from its parent folder
    r = _run_in(tmp_path, "formatters")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith(f"error: {tmp_path / 'adaptr'} ") and "another folder" in lines[0]
    probe = "from adaptr.extend.catalog import get_formatter\ntry:\n    get_formatter('alpaca')\nexcept Exception as e:\n    print(e)"
    r = _run_in(tmp_path, code=probe)
    msg = r.stdout.strip()
    assert msg.startswith("unknown format 'alpaca': no formatter is registered"), msg
    assert "failed to load (ImportError" in msg and "another folder" in msg, msg
