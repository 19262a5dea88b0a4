"""adaptr eval / compare / curves and promotion gates, on the tiny LLaMA (nothing downloaded)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from adaptr.registry import Registry

from helpers import random_lora, refused, snapshot

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
PAIRS = [("Q: 2+2?\nA:", " 4"), ("Say hi:", " hello there"), ("Color of sky:", " blue"),
         ("Q: capital of France?\nA:", " Paris"), ("Count:", " 1 2 3")]  # fmt: skip


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
    from adaptr.data.sft import load_splits, loss_tokens
    from adaptr.evaluation.run import _tokenized
    from adaptr.training.recipe import DataSettings

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


def test_text_scores_against_sacrebleu_and_known_rouge():
    import sacrebleu

    from adaptr.evaluation.metrics import rouge_l, text_scores

    hyps = ["the cat sat on the mat", "a quick brown fox", "hello"]
    refs = ["the cat is on the mat", "the quick brown fox jumps", "hello"]
    got, sigs = text_scores(hyps, refs, ["exact", "chrf", "bleu", "rougeL"])
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert got["exact"] == pytest.approx(100 / 3)
    # LCS("the cat sat on the mat", "the cat is on the mat") = 5 of 6 and 6 words: F1 5/6
    assert rouge_l(hyps[0], refs[0]) == pytest.approx(5 / 6)
    assert rouge_l("a quick brown fox", "the quick brown fox jumps") == pytest.approx(
        2 * (3 / 4) * (3 / 5) / (3 / 4 + 3 / 5)
    )
    assert got["rougeL"] == pytest.approx(100 * (5 / 6 + 2 * 0.75 * 0.6 / 1.35 + 1) / 3)
    assert set(sigs) == {"chrf", "bleu"}


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


def test_curves_terminal_and_png(tmp_path, tiny_llama, cli):
    reg = Registry(tmp_path / "home")
    reg.add_base("tiny", tiny_llama)
    history = [
        {"step": s, "loss": 3 / s, "learning_rate": 1e-4 * (1 - s / 10)} for s in range(1, 10)
    ]
    history.append({"step": 9, "eval_loss": 0.9})
    reg.add("c", random_lora(tiny_llama, tmp_path / "c", 1, **LORA), base="tiny",
            lineage={"log_history": history})  # fmt: skip
    reg.add("c", random_lora(tiny_llama, tmp_path / "c2", 2, **LORA), base="tiny",
            lineage={"log_history": history[:5], "parents": ["c@1"]})  # fmt: skip
    png = tmp_path / "curves.png"
    code, out, err = cli(
        "--home", str(tmp_path / "home"), "curves", "c@1", "c@2", "--png", str(png)
    )
    assert code == 0, err
    assert "c@1" in out and "c@2" in out and "eval_loss" in out and "3.0000 -> 0.3333" in out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    from matplotlib import image

    assert image.imread(png).shape[:2] == (450, 800)
    code, out, err = cli("--home", str(tmp_path / "home"), "curves", "c@2", "--parents", "--json")
    assert code == 0 and list(json.loads(out)["curves"]) == ["c@2", "c@1"], err
    code, out, _ = cli("--home", str(tmp_path / "home"), "show", "c@1")
    assert "training log" in out and "10 entries" in out
    reg.add("plain", random_lora(tiny_llama, tmp_path / "p", 3, **LORA), base="tiny")
    refused(cli, None, None, "--home", str(tmp_path / "home"), "curves", "plain",
            match="no stored training log")  # fmt: skip


def test_training_stores_its_log_history_for_curves(tmp_path, tiny_llama, cli):
    from adaptr import evaluate
    from adaptr.training.trainer import train

    zh_en = Path(__file__).parent.parent / "examples" / "data" / "translate_zh_en.jsonl"
    reg = Registry(tmp_path / "home")
    reg.add_base("tiny", tiny_llama)
    result = train(
        {"name": "zh", "base": {"path": "tiny"},
         "data": {"path": str(zh_en), "format": "alpaca", "eval_split": 0.25},
         "lora": {"r": 2, "target_modules": ["q_proj", "v_proj"]},
         "sft": {"max_steps": 3, "logging_steps": 1, "per_device_train_batch_size": 4,
                 "gradient_checkpointing": False, "learning_rate": 1e-2}},
        registry=reg, progress=False,
    )  # fmt: skip
    history = result.version.lineage["log_history"]
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3]
    assert any("eval_loss" in h for h in history) and any("learning_rate" in h for h in history)
    code, out, err = cli("--home", str(tmp_path / "home"), "curves", "zh@1", "--json")
    assert code == 0, err
    assert [p[0] for p in json.loads(out)["curves"]["zh@1"]["loss"]] == [1, 2, 3]
    # a trained version is scored like any other, with Chinese references
    r = evaluate(["zh@1"], zh_en, "alpaca", "loss,chrf", registry=reg, limit=3, max_new_tokens=4)
    assert r.scores["zh@1"]["loss"] > 0 and 0 <= r.scores["zh@1"]["chrf"] <= 100
    assert len(reg.evals("zh@1")) == 1


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


# ------------------------------------------------------------- BLEU tokenizers (CJK)
ZH_HYPS = ["我喜欢吃苹果", "今天天气很好", "他在北京工作了三年"]
ZH_REFS = ["我喜欢吃香蕉", "今天天气不错", "他在上海工作了三年"]


def test_bleu_tokenizer_on_chinese_agrees_with_sacrebleu():
    import sacrebleu

    from adaptr.errors import InvalidInputError
    from adaptr.evaluation.metrics import (
        auto_bleu_tokenize,
        bleu_tokenizers,
        check_bleu_tokenize,
        text_scores,
    )

    got, sigs = text_scores(ZH_HYPS, ZH_REFS, ["bleu", "chrf"], bleu_tokenize="zh")
    want = sacrebleu.corpus_bleu(ZH_HYPS, [ZH_REFS], tokenize="zh").score
    assert got["bleu"] == pytest.approx(want) and "|tok:zh|" in sigs["bleu"]
    # 13a leaves unsegmented Chinese as one "word" per sentence: no n-gram matches at all
    plain, sigs13 = text_scores(ZH_HYPS, ZH_REFS, ["bleu"])
    assert plain["bleu"] == pytest.approx(sacrebleu.corpus_bleu(ZH_HYPS, [ZH_REFS]).score)
    assert plain["bleu"] < 1 < got["bleu"] and "|tok:13a|" in sigs13["bleu"]
    tok, why = auto_bleu_tokenize(ZH_REFS)
    assert tok == "zh" and "Chinese" in why
    assert auto_bleu_tokenize(["the cat sat", "on the mat 你"]) == ("13a", None)
    assert auto_bleu_tokenize(["これはペンです"])[0] in ("ja-mecab", "char")
    tok, why = auto_bleu_tokenize(["안녕하세요 반갑습니다"])
    assert tok in ("ko-mecab", "13a") and "mostly Korean" in why
    assert (tok == "13a") == ("needs pip install 'sacrebleu[ko]'" in why)
    assert {"13a", "intl", "zh", "char", "none"} <= set(bleu_tokenizers())
    for name in ("auto", "zh", "13a", "intl", "char", "none"):
        assert check_bleu_tokenize(name) == name
    with pytest.raises(
        InvalidInputError, match="unknown BLEU tokenizer 'jieba': choose from auto, 13a"
    ):
        check_bleu_tokenize("jieba")
    if "ja-mecab" not in bleu_tokenizers():
        with pytest.raises(InvalidInputError, match=r"needs packages .*sacrebleu\[ja\]"):
            check_bleu_tokenize("ja-mecab")


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


# ------------------------------------------------------------------------ gates
def _gate_world(tmp_path, tiny_llama):
    """m@1..m@3 on tiny, two data files; evals are written directly (no model run)."""
    from adaptr.registry.blobs import hash_file

    reg = Registry(tmp_path / "home")
    reg.add_base("tiny", tiny_llama)
    for i in range(3):
        reg.add("m", random_lora(tiny_llama, tmp_path / f"m{i}", 60 + i, **LORA), base="tiny")
    files = {}
    for name, pairs in (("dev", PAIRS[:3]), ("test", PAIRS[3:])):
        p = tmp_path / f"{name}.jsonl"
        p.write_text("".join(json.dumps({"prompt": a, "completion": b}) + "\n" for a, b in pairs))
        files[name] = (p, hash_file(p)[0])
    return reg, files


def _record(files, which, metrics, created, **settings):
    path, sha = files[which]
    st = {"options": {}, "limit": None, "max_new_tokens": 64, "decoding": "greedy", **settings}
    return {"metrics": metrics, "created": created, "settings": st,
            "dataset": {"path": str(path), "sha256": sha, "format": "prompt-completion",
                        "records": len(path.read_text().splitlines())}}  # fmt: skip


def test_first_promotion_with_better_than_the_missing_tag(tmp_path, tiny_llama, cli):
    from adaptr.errors import InvalidInputError, NotFoundError
    from adaptr.evaluation.gates import promote

    reg, files = _gate_world(tmp_path, tiny_llama)
    reg.add_evals([("m@2", _record(files, "dev", {"chrf": 50.0, "loss": 1.0}, 1))])
    home = str(tmp_path / "home")
    before = snapshot(tmp_path / "home")
    # a typo or another missing tag is not a first promotion
    refused(cli, tmp_path / "home", before, "--home", home, "tag", "m@2", "prod",
            "--require-better-than", "prdo", match="m has no tag 'prdo'")  # fmt: skip
    refused(cli, tmp_path / "home", before, "--home", home, "tag", "m@2", "prod",
            "--require-better-than", "m@staging", match="staging")  # fmt: skip
    # --require still applies to a first promotion
    refused(cli, tmp_path / "home", before, "--home", home, "tag", "m@2", "prod", "--require",
            "chrf>=60", "--require-better-than", "prod", match="fails the requirement chrf>=60")  # fmt: skip
    code, out, err = cli("--home", home, "tag", "m@2", "prod", "--require-better-than", "prod",
                         "--require", "chrf>=40")  # fmt: skip
    assert code == 0 and "m@prod -> m@2" in out, err
    assert "m@prod does not exist yet" in err and "gate passed: chrf 50 >= 40" in err
    assert reg.get("m@prod").ref == "m@2"
    # from then on the gate compares: m@1 has nothing measured on the same data
    before = snapshot(tmp_path / "home")
    refused(cli, tmp_path / "home", before, "--home", home, "tag", "m@1", "prod",
            "--require-better-than", "prod", match="have no metric measured on the same data", last=True)  # fmt: skip
    # the Python API: same behaviour, same errors
    v, lines = promote(reg, "m@2", "stable", better_than="m@stable")
    assert v.ref == "m@2" and "does not exist yet" in lines[0] and reg.get("m@stable").ref == "m@2"
    with pytest.raises(NotFoundError, match="no tag 'nope'"):
        promote(reg, "m@2", "beta", better_than="nope")
    with pytest.raises(InvalidInputError, match="fails the requirement chrf>=99"):
        promote(reg, "m@2", "beta", ["chrf>=99"], better_than="beta")
    with pytest.raises(NotFoundError):
        reg.get("m@beta")


def test_gates_datasets_directions_several_requirements_and_settings(tmp_path, tiny_llama, cli):
    from adaptr.errors import InvalidInputError
    from adaptr.evaluation.compare import compare
    from adaptr.evaluation.gates import check_gate, promote

    reg, files = _gate_world(tmp_path, tiny_llama)
    dev, test = str(files["dev"][0]), str(files["test"][0])
    reg.add_evals([
        ("m@1", _record(files, "dev", {"loss": 2.0, "chrf": 40.0, "bleu": 10.0}, 1)),
        ("m@2", _record(files, "dev", {"loss": 1.0, "chrf": 45.0, "bleu": 30.0}, 2, bleu_tokenize="zh")),
        ("m@3", _record(files, "test", {"loss": 0.5, "chrf": 70.0}, 3)),
    ])  # fmt: skip
    reg.tag("m@1", "prod")
    home, h = str(tmp_path / "home"), tmp_path / "home"
    code, out, _ = cli("--home", home, "show", "m@2")  # BLEU names its tokenizer (not 13a)
    assert code == 0 and "bleu[zh] 30" in out and "chrf 45" in out
    code, out, _ = cli("--home", home, "show", "m@1")
    assert "bleu 10" in out and "bleu[" not in out
    before = snapshot(h)
    args = ("--home", home, "tag")
    # evals on another dataset only: refused, naming the dataset(s) measured
    line = refused(cli, h, before, *args, "m@3", "prod", "--require", "chrf>=10", "--data", dev,
                   match="m@3 has no chrf measured on dev.jsonl")  # fmt: skip
    assert "it has chrf on test.jsonl" in line
    line = refused(cli, h, before, *args, "m@3", "prod", "--require-better-than", "prod",
                   match="have no metric measured on the same data")  # fmt: skip
    assert "m@3 on test.jsonl" in line and "m@1 on dev.jsonl" in line
    # lower is better for loss, higher for chrf; BLEU with another tokenizer is not compared
    with pytest.raises(
        InvalidInputError, match=r"worse than m@2 on loss 2 vs 1, chrf 40 vs 45 on dev\.jsonl"
    ):
        check_gate(reg, "m@1", better_than="m@2")
    lines = check_gate(reg, "m@2", better_than="prod", tag="prod")
    assert [ln.split()[0] for ln in lines] == ["loss", "chrf", "not"]  # bleu: tokenizers differ
    assert (
        lines[-1].startswith("not compared: bleu of m@1 on dev.jsonl")
        and "no comparable" in lines[-1]
    )
    reg.add_evals([("m@2", _record(files, "dev", {"chrf": 39.0}, 4))])
    line = refused(cli, h, before, *args, "m@2", "prod", "--require-better-than", "prod",
                   match="m@2 is worse than prod (m@1) on chrf 39 vs 40", last=True)  # fmt: skip
    assert "loss" not in line  # loss is better: only the failing metric is named
    # several requirements: all checked, every failing one named in one line
    line = refused(cli, h, before, *args, "m@2", "prod", "--require", "loss<=1.5", "--require",
                   "chrf>=41", match="fails the requirement chrf>=41 (chrf is 39, max_new_tokens 64)")  # fmt: skip
    assert "loss" not in line
    refused(cli, h, before, *args, "m@2", "prod", "--require", "rouge-l>=0",
            match="no stored rougeL")  # an alias of a metric never measured  # fmt: skip
    line = refused(cli, h, before, *args, "m@2", "prod", "--require", "loss<=0.5", "--require",
                   "chrf>=41", match="fails the requirements loss<=0.5 (loss is 1); chrf>=41 (chrf is 39, max_new_tokens 64)")  # fmt: skip
    # lower-is-better bound on loss passes, higher-is-better on chrf passes
    lines = check_gate(reg, "m@2", ["loss<=1.5", "chrf>=39", "bleu>25"])
    assert len(lines) == 3 and lines[2].endswith("tokenize zh")
    # a limit above the number of records is the whole data: comparable with no limit
    reg.add_evals([("m@3", _record(files, "dev", {"loss": 3.0}, 3.5, limit=100))])
    with pytest.raises(InvalidInputError, match="m@3 is worse than m@1 on loss 3 vs 2"):
        check_gate(reg, "m@3", better_than="m@1", data=dev)
    # malformed / unknown / never measured: one line each, nothing moved
    for cond, match in (("chrf=>1", "cannot read the requirement"), ("chrf>=abc", "not a finite number"),
                        ("chrf>=nan", "not a finite number"), ("", "cannot read the requirement"),
                        ("meteor>=1", "unknown metric 'meteor'"), ("exact>=1", "no stored exact")):  # fmt: skip
        refused(cli, h, before, *args, "m@2", "prod", "--require", cond, match=match)
        with pytest.raises(InvalidInputError, match=match):
            promote(reg, "m@2", "prod", [cond])
    # a metric measured on two datasets is ambiguous without --data
    reg.add_evals([("m@2", _record(files, "test", {"chrf": 80.0}, 5))])
    before = snapshot(h)
    line = refused(cli, h, before, *args, "m@2", "prod", "--require", "chrf>=41",
                   match="has chrf measured on several datasets")  # fmt: skip
    assert "dev.jsonl" in line and "test.jsonl" in line and "--data" in line
    refused(cli, h, before, *args, "m@2", "prod", "--require", "chrf>=41", "--data", dev,
            match="fails the requirement chrf>=41 (chrf is 39, max_new_tokens 64)")  # fmt: skip
    refused(cli, h, before, *args, "m@2", "prod", "--require", "chrf>=1", "--data",
            str(tmp_path / "nope.jsonl"), match="nope.jsonl")  # fmt: skip
    refused(
        cli, h, before, *args, "m@2", "prod", "-d", "--require", "chrf>=1", match="not --delete"
    )
    assert reg.get("m@prod").ref == "m@1"
    code, out, err = cli(*args, "m@2", "prod", "--require", "chrf>=41", "--data", test)
    assert code == 0 and reg.get("m@prod").ref == "m@2" and "on test.jsonl" in err, err
    # compare: BLEU of different tokenizers in separate columns, best per column only
    doc = compare(reg, ["m@1", "m@2"], files["dev"][0])
    assert {"bleu[tokenize=13a]", "bleu[tokenize=zh]"} <= set(doc["columns"])
    assert "bleu[tokenize=zh]" not in doc["best"] and doc["best"]["loss"] == ["m@2"]
    assert doc["settings"]["bleu[tokenize=zh]"]["tokenize"] == "zh"
    code, out, _ = cli("--home", home, "compare", "m@1", "m@2", "--data", dev)
    assert code == 0 and "bleu[tokenize=zh]" in out and "not comparable" in out


def test_gate_and_compare_edges_from_review(tmp_path, tiny_llama, cli):
    """Partial evals, metrics one side lacks, values that are not numbers, an empty or
    self-naming --require-better-than, compare's footer, a stray BLEU tokenizer."""
    from adaptr.errors import InvalidInputError
    from adaptr.evaluation.gates import check_gate, promote
    from adaptr.evaluation.metrics import auto_bleu_tokenize
    from adaptr.evaluation.run import evaluate

    reg, files = _gate_world(tmp_path, tiny_llama)
    dev, test = str(files["dev"][0]), str(files["test"][0])
    reg.add_evals([
        ("m@1", _record(files, "dev", {"loss": 1.0, "chrf": 60.0}, 1)),
        ("m@2", _record(files, "dev", {"chrf": 30.0}, 2)),
        ("m@2", _record(files, "dev", {"chrf": 90.0, "loss": 0.9}, 3, limit=1)),  # partial, newer
        ("m@3", _record(files, "dev", {"chrf": None, "accuracy": 0.5, "loss": 0.5}, 4)),
        ("m@1", _record(files, "test", {"chrf": 10.0}, 5)),
    ])  # fmt: skip
    home, h = str(tmp_path / "home"), tmp_path / "home"
    before = snapshot(h)
    # the whole data's value counts, not a newer partial one; a partial one says so
    refused(cli, h, before, "--home", home, "tag", "m@2", "prod", "--require", "chrf>=40",
            "--data", dev, match="fails the requirement chrf>=40 (chrf is 30, max_new_tokens 64)")  # fmt: skip
    (line,) = check_gate(reg, "m@2", ["loss<=1"], data=dev)
    assert "first 1 records only" in line
    # what the rival measured and the candidate did not is said, not skipped
    lines = check_gate(reg, "m@3", better_than="m@1", data=dev)
    assert lines[0].startswith("loss 0.5 vs m@1 1")
    assert any(ln.startswith("not compared: chrf of m@1") for ln in lines), lines
    # values that are not numbers, metrics of unknown direction: no internal error anywhere
    reg.add_evals([("m@1", _record(files, "dev", {"accuracy": 0.7}, 6))])
    lines = check_gate(reg, "m@3", better_than="m@1", data=dev)
    assert any("accuracy" in ln and "unknown metric" in ln for ln in lines), lines
    for args in (("show", "m@3"), ("compare", "m@1", "m@3"), ("compare", "m@1", "m@3", "--json")):
        code, out, err = cli("--home", home, *args)
        assert code == 0 and "internal error" not in err, (args, err)
    assert "chrf None (not a number)" in cli("--home", home, "show", "m@3")[1]
    # empty or self-naming rivals, a requirement given as one string (Python)
    refused(cli, h, snapshot(h), "--home", home, "tag", "m@2", "prod", "--require-better-than", "",
            match="--require-better-than is empty")  # fmt: skip
    refused(cli, h, snapshot(h), "--home", home, "tag", "m@3", "prod", "--require-better-than", "m",
            match="is m@3 itself")  # fmt: skip
    with pytest.raises(InvalidInputError, match="fails the requirement chrf>=40"):
        promote(reg, "m@2", "prod", "chrf>=40", data=dev)
    # compare's footer: the dataset shown, the others noted, never "no stored evals" as well
    code, out, err = cli("--home", home, "compare", "m@1", "m@2", "--data", dev)
    assert code == 0 and "evals on" in out and "no stored evals" not in out
    assert "no stored eval on that data" not in err and "also evaluated on test.jsonl" in err
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    code, out, err = cli("--home", home, "compare", "m@1", "--data", str(other))
    assert code == 0 and "no stored eval on that data" in err and "also evaluated on" in err
    # BLEU tokenizer: mixed scripts, a stray kana; given without bleu is refused
    assert (
        auto_bleu_tokenize(["我们使用PyTorch和TensorFlow训练模型", "这个API返回JSON格式的数据"])[0]
        == "zh"
    )
    assert auto_bleu_tokenize(["今天天气很好"] * 99 + ["我喜欢の设计"])[0] == "zh"
    assert auto_bleu_tokenize(["ｶﾀｶﾅ"])[0] in ("ja-mecab", "char")
    with pytest.raises(InvalidInputError, match="BLEU is not among the metrics"):
        evaluate(["m@1"], test, "prompt-completion", "chrf", registry=reg, bleu_tokenize="zh")


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


def test_a_gated_move_is_refused_when_the_tag_moves_while_the_gate_checks(tmp_path, monkeypatch):
    """promote reads the tag, checks the gate, and moves the tag only from where it read it:
    another writer's move in between is not overwritten."""
    import adaptr.evaluation.gates as ev
    from adaptr.errors import ConflictError

    from helpers import write_adapter

    home = tmp_path / "home"
    reg = Registry(home)
    for seed in range(3):
        reg.add("m", write_adapter(tmp_path / f"s{seed}", seed=seed))
    reg.tag("m@1", "prod")

    def gate_passes_while_someone_moves_the_tag(*args, **kwargs):
        Registry(home).tag("m@2", "prod")  # another process, while the gate reads the evals
        return ["loss: passed"]

    monkeypatch.setattr(ev, "check_gate", gate_passes_while_someone_moves_the_tag)
    with pytest.raises(ConflictError, match="moved while this command checked it"):
        ev.promote(reg, "m@3", "prod", better_than="prod")
    assert reg.get("m@prod").version == 2  # the other writer's move stands
    monkeypatch.setattr(ev, "check_gate", lambda *a, **k: ["loss: passed"])
    assert ev.promote(reg, "m@3", "prod", better_than="prod")[0].version == 3  # nothing between
