"""evaluation.run: adaptr eval scores, stores and refuses on the tiny LLaMA (nothing downloaded)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from adaptr.registry import Registry

from helpers import LORA, PAIRS, ZH_REFS, random_lora, refused, snapshot


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama):
    """A registry with base ``tiny``, three random LoRAs and a second base's adapter; data files."""
    from adaptr.tiny import save_tiny_base

    root = tmp_path_factory.mktemp("eval")
    reg = Registry(root / "home")
    reg.add_base("tiny", tiny_llama)
    dirs = {}
    for i, name in enumerate(("a", "b", "c")):
        dirs[name] = random_lora(tiny_llama, root / name, 20 + i, **LORA)
        reg.add(name, dirs[name], base="tiny")
    other = save_tiny_base(root / "other-base", "llama", seed=5)
    reg.add_base("other", other)
    reg.add("elsewhere", random_lora(other, root / "elsewhere", 3, **LORA), base="other")
    data = root / "pc.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in PAIRS))
    chat = root / "chat.jsonl"
    chat.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": p},
                        {"role": "assistant", "content": c.strip()},
                    ]
                }
            )
            + "\n"
            for p, c in PAIRS[:3]
        )  # fmt: skip
    )
    text = root / "text.jsonl"
    text.write_text("".join(json.dumps({"text": p + c}) + "\n" for p, c in PAIRS))
    return {"reg": reg, "root": root, "dirs": dirs, "base": tiny_llama, "data": data,
            "chat": chat, "text": text}  # fmt: skip


def _peft_loss(base: Path, adapter: Path | None, tokenized) -> float:
    """Mean NLL per loss token with plain PEFT (or the bare base), one record at a time."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in zip(tokenized["input_ids"], tokenized["labels"], strict=True):
            labels_t = torch.tensor([labels])
            out = model(input_ids=torch.tensor([ids]), labels=labels_t)
            n = int((labels_t[:, 1:] != -100).sum())
            total += float(out.loss) * n
            count += n
    return total / count


def _tokenized(world, path: Path, fmt: str):
    from adaptr.bases import load_tokenizer
    from adaptr.data.sft import DataSettings, load_splits, loss_tokens
    from adaptr.evaluation.run import _tokenized

    splits = load_splits(DataSettings(path=str(path), format=fmt), 42)
    tok, _ = load_tokenizer(str(world["base"]))
    return _tokenized(splits.train, tok, loss_tokens(splits.kind).sft())


@pytest.mark.parametrize("which", ["pc", "chat"])
def test_loss_matches_peft_and_mixed_equals_alone(world, which):
    from adaptr import evaluate

    reg = world["reg"]
    path, fmt = (
        (world["data"], "prompt-completion") if which == "pc" else (world["chat"], "messages")
    )
    mixed = evaluate(["a", "b", "c"], path, fmt, "loss,ppl", registry=reg, base_line=True,
                     batch_size=2, store=False)  # fmt: skip
    tokenized = _tokenized(world, path, fmt)
    # loss tokens are those training counts: the completion / the assistant turn only
    assert all(-100 in labels for labels in tokenized["labels"])
    for name in ("a", "b", "c", None):
        ref = f"{name}@1" if name else None
        want = _peft_loss(world["base"], world["dirs"][name] if name else None, tokenized)
        assert mixed.scores[ref]["loss"] == pytest.approx(want, abs=1e-4)
        assert mixed.scores[ref]["ppl"] == pytest.approx(math.exp(mixed.scores[ref]["loss"]))
        if name:
            alone = evaluate([name], path, fmt, "loss", registry=reg, batch_size=3, store=False)
            assert alone.scores[ref]["loss"] == pytest.approx(mixed.scores[ref]["loss"], abs=1e-5)
    assert len({round(s["loss"], 6) for s in mixed.scores.values()}) == 4  # adapters differ


def test_generation_metrics_agree_with_sacrebleu_and_alone(world):
    import sacrebleu

    from adaptr import evaluate
    from adaptr.serving import AdapterServer

    reg = world["reg"]
    metrics = "exact,chrf,bleu,rougeL"
    mixed = evaluate(["a", "b"], world["data"], "prompt-completion", metrics, registry=reg,
                     base_line=True, max_new_tokens=6, batch_size=2, store=False)  # fmt: skip
    refs = [c for _, c in PAIRS]
    server = AdapterServer(reg, "tiny")
    for ref in ("a@1", "b@1", None):
        hyps = mixed.generations[ref]
        # greedy generations equal the server's for that adapter alone
        assert hyps == server.generate([p for p, _ in PAIRS], [ref] * len(PAIRS), max_new_tokens=6)
        s = mixed.scores[ref]
        assert s["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
        assert s["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
        assert s["exact"] == pytest.approx(
            100 * sum(h.strip() == r.strip() for h, r in zip(hyps, refs, strict=True)) / 5
        )
    assert (
        mixed.signatures["chrf"].startswith("nrefs:1|") and "version:" in mixed.signatures["bleu"]
    )
    alone = evaluate(["b"], world["data"], "prompt-completion", metrics, registry=reg,
                     max_new_tokens=6, store=False)  # fmt: skip
    assert alone.scores["b@1"] == pytest.approx(mixed.scores["b@1"])


def test_stored_append_only_survives_reindex_show_compare_and_gates(tmp_path, tiny_llama, cli):
    reg = Registry(tmp_path / "home")
    reg.add_base("tiny", tiny_llama)
    for i in range(2):
        reg.add("m", random_lora(tiny_llama, tmp_path / f"m{i}", 40 + i, **LORA), base="tiny",
                metrics={"train_loss": 2.0 - i})  # fmt: skip
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in PAIRS))
    home = str(tmp_path / "home")
    code, out, err = cli("--home", home, "eval", "m@1", "m@2", "--data", str(data), "--format",
                         "prompt-completion", "--metrics", "loss,chrf", "--max-new-tokens", "4", "--json")  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    assert [s["ref"] for s in doc["scores"]] == ["m@1", "m@2"] and doc["stored"] == 2
    first = reg.evals("m@1")
    assert len(first) == 1 and set(first[0]["metrics"]) == {"loss", "chrf"}
    rec = first[0]
    assert (
        rec["dataset"]["sha256"] == doc["dataset"]["sha256"]
        and rec["dataset"]["format"] == "prompt-completion"
    )
    assert (
        rec["libraries"]["sacrebleu"]
        and rec["settings"]["decoding"] == "greedy"
        and rec["created"] > 0
    )
    assert rec["signatures"]["chrf"].startswith("nrefs:1")
    # evaluating again appends; the index can be rebuilt without losing them
    code, _, err = cli(
        "--home", home, "eval", "m@1", "--data", str(data), "--format", "prompt-completion"
    )
    assert code == 0, err
    assert len(reg.evals("m@1")) == 2 and len(reg.evals("m@2")) == 1
    (tmp_path / "home" / "registry.db").unlink()
    reg.reindex()
    assert reg.evals("m@1")[:1] == first and len(reg.evals("m@1")) == 2
    code, out, _ = cli("--home", home, "show", "m@1")
    assert "EVALUATED" in out and "loss" in out
    code, out, _ = cli("--home", home, "show", "m@1", "--json")
    assert len(json.loads(out)["evals"]) == 2
    # compare: both versions, best marked
    losses = {r: reg.evals(r)[-1]["metrics"]["loss"] for r in ("m@1", "m@2")}
    code, out, err = cli("--home", home, "compare", "m@1", "m@2", "--data", str(data), "--json")
    assert code == 0, err
    cmp = json.loads(out)
    assert cmp["best"]["loss"] == [min(losses, key=losses.get)] and cmp["best"]["trn_loss"] == [
        "m@2"
    ]
    code, out, _ = cli("--home", home, "compare", "m@1", "m@2")
    assert code == 0 and "VERSION" in out and "*" in out
    # gates
    worse, better = sorted(losses, key=losses.get, reverse=True)
    assert cli("--home", home, "tag", better, "prod")[0] == 0
    before = snapshot(tmp_path / "home")
    line = refused(cli, tmp_path / "home", before, "--home", home, "tag", worse, "prod",
                   "--require-better-than", "m@prod", match="worse than m@prod", last=True)  # fmt: skip
    assert "loss" in line
    refused(cli, tmp_path / "home", before, "--home", home, "tag", worse, "prod", "--require",
            f"loss<={losses[worse] - 1}", match="fails the requirement loss<=", last=True)  # fmt: skip
    refused(cli, tmp_path / "home", before, "--home", home, "tag", worse, "prod", "--require",
            "bleu>=1", match="no stored bleu", last=True)  # fmt: skip
    assert reg.get("m@prod").ref == better
    code, out, err = cli(
        "--home", home, "tag", worse, "prod", "--require", f"loss<={losses[worse] + 1}"
    )
    assert code == 0 and reg.get("m@prod").ref == worse, err
    code, out, err = cli("--home", home, "tag", better, "prod", "--require-better-than", "m@prod")
    assert code == 0 and reg.get("m@prod").ref == better, err
    # removing a version removes its records (its number is never used again)
    assert cli("--home", home, "rm", worse)[0] == 0
    assert not list((tmp_path / "home" / "manifests" / "m").glob(f"{worse.split('@')[1]}.evals*"))
    assert len(reg.evals(better)) >= 1


def test_bad_input_is_one_line_and_stores_nothing(world, cli):
    home = world["reg"].home
    before = snapshot(home)
    base = ("--home", str(home), "eval")
    d, t = str(world["data"]), str(world["text"])
    refused(
        cli,
        home,
        before,
        *base,
        "a",
        "--data",
        d,
        "--format",
        "alpaca",
        match="field 'instruction' is missing",
    )
    refused(cli, home, before, *base, "a", "--data", t, "--format", "text", "--metrics", "chrf",
            match="need references")  # fmt: skip
    refused(cli, home, before, *base, "a", "elsewhere", "--data", d, "--format", "prompt-completion",
            match="different bases")  # fmt: skip
    refused(cli, home, before, *base, "a", "--data", d, "--format", "prompt-completion", "--metrics",
            "loss,meteor", match="unknown metric 'meteor'")  # fmt: skip
    refused(cli, home, before, *base, "a", "--data", str(world["root"] / "nope.jsonl"), "--format",
            "prompt-completion", match="nope.jsonl")  # fmt: skip
    no_answer = world["root"] / "no-answer.jsonl"
    no_answer.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    before = snapshot(home)
    refused(cli, home, before, *base, "a", "--data", str(no_answer), "--format", "messages", "--metrics",
            "loss,bleu", match="no assistant turn")  # fmt: skip
    empty = world["root"] / "empty.jsonl"
    empty.write_text("")
    before = snapshot(home)
    refused(
        cli,
        home,
        before,
        *base,
        "a",
        "--data",
        str(empty),
        "--format",
        "prompt-completion",
        match="empty.jsonl",
    )
    refused(cli, home, before, "--home", str(home), "tag", "a", "prod", "--require", "chrf>=1",
            match="no stored chrf")  # fmt: skip
    refused(cli, home, before, "--home", str(home), "tag", "a", "prod", "--require", "chrf=>1",
            match="cannot read the requirement")  # fmt: skip


def test_chat_generations_stop_at_the_end_of_the_assistant_turn(world):
    from adaptr import evaluate
    from adaptr.evaluation.run import _end_of_turn
    from adaptr.serving import AdapterServer
    from adaptr.tiny import make_tokenizer

    tok = make_tokenizer()
    assert _end_of_turn(tok) == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    reg = world["reg"]
    r = evaluate(["a", "b"], world["chat"], "messages", "chrf,rougeL", registry=reg,
                 max_new_tokens=5, store=False)  # fmt: skip
    server = AdapterServer(reg, "tiny")
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p, _ in PAIRS[:3]
    ]
    for ref in ("a@1", "b@1"):
        want = server.generate(prompts, [ref] * 3, max_new_tokens=5, eos_token_id=_end_of_turn(tok))
        assert r.generations[ref] == want


def test_text_data_with_a_format_option_scores_every_token(world, cli):
    home = world["reg"].home
    before = snapshot(home)
    code, out, err = cli("--home", str(home), "eval", "a", "--data", str(world["data"]), "--format", "text",
                         "--format-option", "field=prompt", "--no-store", "--json")  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    assert (
        doc["settings"]["loss_tokens"] == "all"
        and doc["scores"][0]["loss"] > 0
        and doc["stored"] == 0
    )
    assert snapshot(home) == before


def test_eval_picks_and_stores_the_bleu_tokenizer(world, cli):
    import sacrebleu

    from adaptr import evaluate

    reg = world["reg"]
    zh = world["root"] / "zh.jsonl"
    zh.write_text("".join(json.dumps({"prompt": f"翻译{i}:", "completion": r}) + "\n"
                          for i, r in enumerate(ZH_REFS)))  # fmt: skip
    r = evaluate(["a", "b"], zh, "prompt-completion", "bleu,chrf", registry=reg, max_new_tokens=4,
                 store=False)  # fmt: skip
    assert r.settings["bleu_tokenize"] == "zh" and "Chinese" in r.notes[0]
    assert "|tok:zh|" in r.signatures["bleu"]
    for ref in ("a@1", "b@1"):
        hyps = r.generations[ref]
        assert r.scores[ref]["bleu"] == pytest.approx(
            sacrebleu.corpus_bleu(hyps, [ZH_REFS], tokenize="zh").score
        )
    r13 = evaluate(["a"], zh, "prompt-completion", "bleu", registry=reg, max_new_tokens=4,
                   store=False, bleu_tokenize="13a")  # fmt: skip
    assert r13.settings["bleu_tokenize"] == "13a" and not r13.notes
    assert "|tok:13a|" in r13.signatures["bleu"]
    # English references: auto is 13a, silently; no bleu: no tokenizer in the settings
    r_en = evaluate(["a"], world["data"], "prompt-completion", "bleu", registry=reg,
                    max_new_tokens=2, store=False)  # fmt: skip
    assert r_en.settings["bleu_tokenize"] == "13a" and not r_en.notes
    r_loss = evaluate(["a"], world["data"], "prompt-completion", "loss", registry=reg, store=False)
    assert "bleu_tokenize" not in r_loss.settings
    home = reg.home
    before = snapshot(home)
    code, out, err = cli("--home", str(home), "eval", "a", "--data", str(zh), "--format",
                         "prompt-completion", "--metrics", "bleu", "--max-new-tokens", "2", "--no-store")  # fmt: skip
    assert code == 0 and "mostly Chinese" in err and "tok:zh" in out, err
    refused(cli, home, before, "--home", str(home), "eval", "a", "--data", str(zh), "--format",
            "prompt-completion", "--metrics", "bleu", "--bleu-tokenize", "jieba",
            match="unknown BLEU tokenizer 'jieba': choose from auto, 13a, intl, zh, char, none")  # fmt: skip


@pytest.fixture
def stored(cli, home, tmp_path):
    """A registry holding ``a@1`` (no base needed: these refusals come first) and a data file."""
    from helpers import write_adapter

    assert cli("add", "a", str(write_adapter(tmp_path / "a")))[0] == 0
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in PAIRS))
    return data


@pytest.mark.parametrize("limit", ["0", "-1", "-5"])
def test_a_limit_below_one_is_refused_and_nothing_stored(cli, home, stored, limit):
    from adaptr.errors import InvalidInputError
    from adaptr.evaluation.run import evaluate

    before = snapshot(home)
    refused(cli, home, before, "eval", "a", "--data", str(stored), "--format",
            "prompt-completion", "--limit", limit, match="at least 1")  # fmt: skip
    for bad in (int(limit), True, 2.5):
        with pytest.raises(InvalidInputError, match="at least 1"):
            evaluate(["a"], stored, "prompt-completion", registry=Registry(home), limit=bad)
    assert snapshot(home) == before


def test_data_that_is_a_device_a_pipe_or_a_folder_is_named_for_what_it_is(cli, home, stored):
    import os

    from adaptr.errors import InvalidInputError
    from adaptr.evaluation.run import evaluate

    pipe = stored.parent / "pipe.jsonl"
    os.mkfifo(pipe)
    before = snapshot(home)
    for path, what in (("/dev/urandom", "is a character device, not a regular file"),
                       (str(pipe), "is a named pipe (FIFO), not a regular file")):  # fmt: skip
        for args in (
            ("eval", "a", "--data", path, "--format", "prompt-completion"),
            ("compare", "a", "--data", path),
            ("tag", "a", "prod", "--require", "loss<=9", "--data", path),
        ):
            refused(cli, home, before, *args, match=what)
    with pytest.raises(InvalidInputError, match="is a folder"):
        evaluate(["a"], stored.parent, "prompt-completion", registry=Registry(home))
    refused(cli, home, before, "eval", "a", "--data", str(stored.parent / "none.jsonl"),
            "--format", "prompt-completion", match="none.jsonl does not exist: give a JSONL")  # fmt: skip
    refused(cli, home, before, "eval", "a", "--data", "d" * 1024, "--format",
            "prompt-completion", match="too long")  # fmt: skip


OWN_TEMPLATE = (
    "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<<assistant>>{% endif %}"
)


def test_chat_data_is_rendered_with_the_template_each_version_was_trained_with(
    tmp_path, tiny_llama, monkeypatch
):
    """Eval renders (and tokenizes) chat data once for every row: with the template the
    versions were trained with, and refuses rows trained with different ones."""
    from adaptr.errors import InvalidInputError
    from adaptr.evaluation.run import evaluate

    reg = Registry(tmp_path / "home")
    reg.add_base("tiny", tiny_llama)
    own = random_lora(tiny_llama, tmp_path / "own", 1, r=4, target_modules=["q_proj"])
    (own / "chat_template.jinja").write_text(OWN_TEMPLATE)
    reg.add("own", own, base="tiny")
    reg.add("plain", random_lora(tiny_llama, tmp_path / "plain", 2, r=4, target_modules=["q_proj"]), base="tiny")  # fmt: skip
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(3)]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InvalidInputError, match="different chat templates"):
        evaluate(["own", "plain"], data, "messages", "loss", registry=reg)
    assert reg.evals("own@1") == [] and reg.evals("plain@1") == []
    seen = []
    import adaptr.evaluation.run as ev

    real = ev._render_chat

    def spy(tokenizer, messages):
        seen.append(tokenizer.chat_template)
        return real(tokenizer, messages)

    monkeypatch.setattr(ev, "_render_chat", spy)
    result = evaluate(["own"], data, "messages", "loss,exact", registry=reg, max_new_tokens=2)
    assert seen and set(seen) == {OWN_TEMPLATE}
    assert set(result.scores["own@1"]) == {"loss", "exact"}


