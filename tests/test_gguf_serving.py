"""`--base FILE.gguf` (and a model folder) wherever a base is taken: `adaptr serve` runs the
GGUF's cached conversion under the key versions trained or added on it record, so they are
its adapters; `adaptr add --base FILE.gguf` records that key; what needs a registered base
(vLLM, `check`, the playground) takes the file a base was registered from, and refuses an
unregistered one in one line without converting it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from test_gguf import save_base, write_gguf

from adaptr.registry import Registry

from helpers import client, expected, random_lora, refused, running, snapshot

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
PROMPT = "Hello there"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(the tiny base folder, the same model as tiny.gguf, a LoRA on it)."""
    root = tmp_path_factory.mktemp("gguf-serving")
    base = save_base(root / "base")
    return base, write_gguf(base, root / "tiny.gguf"), random_lora(base, root / "lora", 3, **LORA)


def _conversion(home: Path, gg: Path) -> Path:
    return home / "bases" / "gguf" / f"{hashlib.sha256(gg.read_bytes()).hexdigest()[:16]}-float32"


@pytest.fixture
def serve_app(cli, monkeypatch):
    """`adaptr serve ARGS` up to uvicorn's run: returns (code, stderr, the app it built)."""
    import uvicorn

    apps = []
    monkeypatch.delenv("ADAPTR_API_KEY", raising=False)

    def run(*args: str):
        with monkeypatch.context() as m:  # (only here: the tests serve the app afterwards)
            m.setattr(uvicorn.Server, "run", lambda self, *a, **k: apps.append(self.config.app))
            code, _, err = cli("serve", "--threads", "1", *args)
        return code, err, apps[-1] if apps else None

    return run


def _answers(app, reg: Registry, models: dict[str, str | None]) -> None:
    """Over HTTP with the openai client: /v1/models lists each model id, and each answers
    as its adapter (None: the bare base) alone does, greedy, and differently."""
    texts = set()
    with running(app) as url:
        c = client(url)
        listed = {m.id for m in c.models.list().data}
        assert set(models) <= listed, listed
        for model, ref in models.items():
            got = c.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0)
            want = expected(reg, ref, PROMPT, 6) if ref else _bare(reg.base_path(model))
            assert got.choices[0].text == want, (model, got.choices[0].text, want)
            texts.add(want)
    assert len(texts) == len(models), texts  # each model answers its own way


def _bare(path: str) -> str:
    """What the base at ``path`` alone generates for PROMPT, greedy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adaptr import inference

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return inference.generate(model, AutoTokenizer.from_pretrained(path), PROMPT, max_new_tokens=6)


def test_serve_a_gguf_file_serves_the_adapters_added_on_it(cli, home, source, serve_app):
    _, gg, lora = source
    code, out, err = cli("add", "g", str(lora), "--base", str(gg))
    assert code == 0 and "note: converted tiny.gguf" in err, err
    folder = _conversion(home, gg)
    reg = Registry(home)
    assert reg.get("g").base == str(folder)  # the key `train --base FILE.gguf` records

    code, err, app = serve_app("--base", str(gg))
    assert code == 0 and app is not None, err
    assert "reused" in err and "converted" not in err, err  # converted once, by `add`
    assert f"serving {gg} (as {folder}) on http://127.0.0.1:8000/v1" in err, err
    _answers(app, reg, {"g": "g@1", str(folder): None})


def test_serve_a_registered_gguf_by_its_file_serves_the_registered_base(
    cli, home, source, serve_app
):
    _, gg, lora = source
    assert cli("base", "add", "tiny", str(gg))[0] == 0
    code, out, err = cli("add", "g", str(lora), "--base", str(gg))
    assert code == 0, err
    reg = Registry(home)
    assert reg.get("g").base == "tiny"
    code, err, app = serve_app("--base", str(gg))
    assert code == 0 and "registered as base tiny" in err, err
    assert f"serving {gg} (as tiny) on" in err, err
    _answers(app, reg, {"g": "g@1", "tiny": None})
    assert len(list((home / "bases" / "gguf").glob("*-float32"))) == 1  # one conversion


def test_serve_a_model_folder(cli, home, source, serve_app):
    base, _, lora = source
    assert cli("add", "f", str(lora), "--base", str(base))[0] == 0
    reg = Registry(home)
    assert reg.get("f").base == str(base.resolve())
    code, err, app = serve_app("--base", str(base))
    assert code == 0 and app is not None, err
    _answers(app, reg, {"f": "f@1", str(base.resolve()): None})


def test_a_name_that_is_no_base_and_no_file_is_still_unknown(cli, home):
    line = refused(cli, home, None, "serve", "--base", "nope", match="unknown base 'nope'")
    assert "adaptr base add nope PATH" in line


@pytest.mark.parametrize(
    "args",
    [
        ("serve", "--engine", "vllm", "--base"),
        ("ui", "--base"),
        ("check", "g@1", "--base"),
    ],
    ids=["vllm", "ui", "check"],
)
def test_what_needs_a_registered_base_refuses_an_unregistered_gguf_unconverted(
    cli, home, source, args
):
    base, gg, lora = source
    assert cli("add", "g", str(lora), "--base", str(base))[0] == 0
    before = snapshot(home)
    line = refused(cli, home, before, *args, str(gg), match="runs a registered base")
    assert f"adaptr base add NAME {gg}" in line
    assert not list((home / "bases").glob("gguf/*-float32"))  # nothing converted


def test_check_takes_the_gguf_a_base_was_registered_from(cli, home, source):
    _, gg, lora = source
    assert cli("base", "add", "tiny", str(gg))[0] == 0
    assert cli("add", "g", str(lora), "--base", "tiny")[0] == 0
    by_name = cli("check", "g@1", "--base", "tiny", "--json")
    by_file = cli("check", "g@1", "--base", str(gg), "--json")
    assert by_file[0] == by_name[0] == 0 and by_file[1] == by_name[1], (by_name, by_file)
    assert json.loads(by_file[1])["ok"] is True


def test_add_an_adapter_of_another_model_on_a_gguf_is_refused(cli, home, source, tmp_path):
    from adaptr.tiny import save_tiny_base

    _, gg, _ = source
    other = save_tiny_base(tmp_path / "other", "llama", hidden_size=48)
    lora = random_lora(other, tmp_path / "lora", 1, **LORA)
    line = refused(
        cli,
        home,
        None,
        "add",
        "x",
        str(lora),
        "--base",
        str(gg),
        match="does not fit base",
        last=True,
    )  # (after the note saying the file was converted)
    assert str(_conversion(home, gg)) in line and "q_proj is [32, 32]" in line, line
