"""lm-evaluation-harness against `adaptr serve`: its ``local-completions`` model, on two
small tasks read from local files (multiple choice, and greedy generation), scores the same as
lm-eval's own ``hf`` model running the adapter with PEFT directly (and the bare base the same
as ``hf`` without PEFT).

local-completions (tokenized requests, batch 4) sends ``/v1/completions`` requests whose
``prompt`` is a list of token-id lists. Multiple choice: ``echo: true``, ``logprobs: 1``,
``max_tokens: 1``; it reads ``choices[i].logprobs`` in the legacy OpenAI shape: a choice's
log-likelihood is ``sum(token_logprobs[ctxlen:-1])`` (the last entry is the one generated
token) and "is greedy" compares each entry with ``max(top_logprobs[j].values())``.
Generation: ``max_tokens``, ``temperature: 0``, ``stop``; it reads ``choices[i].text``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from helpers import serve_tiny

pytest.importorskip("lm_eval")  # in the `test` extras: CI has it

# Per-token and per-choice log-likelihoods may differ between the server (batched, its own
# forward with the adapter's delta) and PEFT (one forward per request) only by float32
# rounding; on these tiny models that stays far below 1e-4 (nats, summed per continuation).
LOGLIK_TOL = 1e-4

QUESTIONS = [
    ("The sky on a clear day is", ["blue", "green", "red", "loud"], 0),
    ("Two plus two is", ["four", "five", "three"], 0),
    ("Ice is made of frozen", ["water", "sand", "iron", "light"], 0),
    ("The opposite of hot is", ["cold", "warm", "big"], 0),
    ("A cat says", ["meow", "moo", "quack", "woof"], 0),
    ("The sun rises in the", ["east", "west", "north"], 0),
    ("北京是中国的", ["首都", "河流", "山"], 0),
    ("Bees make", ["honey", "milk", "silk", "glass"], 0),
]

MC, GEN = "adaptr_tiny_mc", "adaptr_tiny_gen"


def write_tasks(folder: Path) -> Path:
    """A JSONL dataset and two tasks that read it (no Hub access), in ``folder``: multiple
    choice (log-likelihoods: echo + logprobs) and greedy generation (max_tokens + stop)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "qa.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": q, "choices": c, "answer": a}, ensure_ascii=False) + "\n"
            for q, c, a in QUESTIONS
        ),
        encoding="utf-8",
    )
    common = {
        "dataset_path": "json",
        "dataset_kwargs": {
            "data_files": {"test": str(data)},
            "cache_dir": str(folder / "hf-datasets-cache"),
        },
        "test_split": "test",
        "doc_to_text": "Q: {{question}}\nA:",
        "metadata": {"version": 1.0},
    }
    tasks = {
        MC: {
            "output_type": "multiple_choice",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{answer}}",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
        },
        GEN: {
            "output_type": "generate_until",
            "doc_to_target": "{{choices[answer]}}",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
            "metric_list": [
                {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}
            ],
        },
    }
    for name, config in tasks.items():
        # JSON is YAML: no YAML writer needed, and the strings (Chinese, "\n") round-trip
        text = json.dumps({"task": name, **common, **config}, ensure_ascii=False)
        (folder / f"{name}.yaml").write_text(text, encoding="utf-8")
    return folder


def stored_adapter(reg, ref: str, folder: Path) -> Path:
    """A PEFT folder with the files the registry stores for ``ref``."""
    for rel, blob in reg.path(ref).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(blob, folder / rel)
    return folder


def evaluate(task_dir: Path, model: str, model_args: dict) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[MC, GEN],
        # only this task: indexing lm-eval's thousands of built-in task files takes ~20 s
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=True,
        batch_size=4,  # local-completions: 4 prompts (token-id lists) in one request
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    assert out is not None
    return out


def by_doc(out: dict, task: str = MC) -> dict[int, list]:
    """doc_id -> its filtered responses: (log-likelihood, is_greedy) of each choice, in
    choice order (MC), or the generated text (GEN)."""
    samples = out["samples"][task]
    assert sorted(s["doc_id"] for s in samples) == list(range(len(QUESTIONS)))
    if task == GEN:
        return {s["doc_id"]: s["filtered_resps"] for s in samples}
    return {s["doc_id"]: [(float(ll), bool(g)) for ll, g in s["filtered_resps"]] for s in samples}


def compare(served: dict, reference: dict, what: str) -> float:
    """Assert both runs scored alike; returns the largest log-likelihood difference."""
    got, want = by_doc(served), by_doc(reference)
    worst = 0.0
    for doc in want:
        assert len(got[doc]) == len(want[doc]) == len(QUESTIONS[doc][1]), (what, doc)
        for i, ((g_ll, g_greedy), (w_ll, w_greedy)) in enumerate(
            zip(got[doc], want[doc], strict=True)
        ):
            assert math.isfinite(g_ll) and g_ll < 0, (what, doc, i, g_ll)
            assert abs(g_ll - w_ll) <= LOGLIK_TOL, (what, doc, i, g_ll, w_ll)
            assert g_greedy == w_greedy, (what, doc, i, g_greedy, w_greedy)
            worst = max(worst, abs(g_ll - w_ll))
    s, r = served["results"][MC], reference["results"][MC]
    for metric in ("acc,none", "acc_norm,none"):
        assert s[metric] == r[metric], (what, metric, s[metric], r[metric])
    # greedy generation: the same text (cut at the first "\n"), so the same exact_match
    assert by_doc(served, GEN) == by_doc(reference, GEN), what
    assert (
        served["results"][GEN]["exact_match,none"] == reference["results"][GEN]["exact_match,none"]
    )
    return worst


def test_local_completions_on_adaptr_serve_scores_like_peft(tmp_path, monkeypatch):
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    task_dir = write_tasks(tmp_path / "tasks")
    spec_b = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "o_proj"]}
    with serve_tiny(tmp_path, [("a", 1), ("b", 2, spec_b)]) as (reg, url, _app):
        base = reg.base_path("tiny")
        served = {
            ref: evaluate(
                task_dir,
                "local-completions",
                {
                    "model": ref,
                    "base_url": f"{url}/completions",
                    "tokenizer": base,
                    "tokenizer_backend": "huggingface",
                    "tokenized_requests": True,
                    "num_concurrent": 1,
                    "max_retries": 1,
                    "max_length": 512,
                    "timeout": 120,
                },
            )
            for ref in ("a", "b", "tiny")
        }
    worst, accs = {}, {}
    for ref in served:
        args = {"pretrained": base, "dtype": "float32", "device": "cpu", "max_length": 512}
        if ref != "tiny":  # PEFT loads the adapter from the files the registry stores for it
            args["peft"] = str(stored_adapter(reg, ref, tmp_path / "peft" / ref))
        reference = evaluate(task_dir, "hf", args)
        worst[ref] = compare(served[ref], reference, ref)
        accs[ref] = served[ref]["results"][MC]["acc,none"]
    # the adapters do change the scores: the comparison is not between identical models
    lls = {ref: by_doc(out) for ref, out in served.items()}
    assert lls["a"] != lls["tiny"] and lls["b"] != lls["tiny"] and lls["a"] != lls["b"]
    gens = {ref: by_doc(out, GEN) for ref, out in served.items()}
    assert gens["a"] != gens["tiny"] and gens["b"] != gens["tiny"]
    print(f"acc {accs}; largest log-likelihood difference {worst}; generated {gens}")
