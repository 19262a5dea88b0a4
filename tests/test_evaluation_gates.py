"""evaluation.gates: promotions gated on stored evaluations, and compare's edges."""

from __future__ import annotations

import json

import pytest

from adaptr.registry import Registry

from helpers import LORA, PAIRS, random_lora, refused, snapshot


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
