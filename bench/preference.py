"""Preference tuning: `adaptr train --method dpo` vs plain TRL DPO on the same data and settings.

Run: python bench/preference.py [--hidden 256] [--layers 4] [--steps 20] [--repeat 3]

Pairs are built from examples/data/translate_zh_en.jsonl (the prompt and its translation as
chosen, another record's translation as rejected). Each run is a fresh subprocess (its peak
RSS its own); sides alternate. Sides: adaptr (LoRA r=16 on q/k/v/o, the reference the base
with the adapter disabled), plain TRL + PEFT (the same), and plain TRL with a separate
reference model (a second copy of the base passed as ``ref_model``) for the memory it costs.
Tokens are TRL's count of non-padding tokens trained on; printed: medians and the ratio.
Peak memory is the process's RSS on CPU, ``torch.cuda.max_memory_allocated`` on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

from children import med, run_child

ROOT = Path(__file__).resolve().parent.parent
LORA = {
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


def make_pairs(work: Path) -> Path:
    rows = [
        json.loads(line)
        for line in (ROOT / "examples/data/translate_zh_en.jsonl").open(encoding="utf-8")
    ]
    out = work / "pairs.jsonl"
    with out.open("w", encoding="utf-8") as f:
        for k in range(4):
            for i, r in enumerate(rows):
                prompt = f"{r['instruction']}\n{r.get('input', '')}\n"
                other = rows[(i + 1 + k) % len(rows)]["output"]
                f.write(json.dumps({"prompt": prompt, "chosen": r["output"], "rejected": other}, ensure_ascii=False) + "\n")  # fmt: skip
    return out


def dpo_kwargs(spec: dict) -> dict:
    return {"per_device_train_batch_size": 8, "learning_rate": 1e-4, "seed": 0, "logging_steps": 1,
            "gradient_checkpointing": False, "max_length": 256, "max_steps": spec["steps"],
            "dataloader_num_workers": 0}  # fmt: skip


def plain(spec: dict) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["base"])
    model = AutoModelForCausalLM.from_pretrained(spec["base"])
    ref = (
        AutoModelForCausalLM.from_pretrained(spec["base"]) if spec["side"] == "plain+ref" else None
    )
    records = [
        json.loads(line) for line in Path(spec["data"]).read_text(encoding="utf-8").splitlines()
    ]
    args = DPOConfig(output_dir=spec["out"], use_cpu=not __import__("torch").cuda.is_available(), bf16=False, report_to="none", save_strategy="no",
                     disable_tqdm=True, **dpo_kwargs(spec))  # fmt: skip
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(records),
                         processing_class=tokenizer, peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA))  # fmt: skip
    res = trainer.train()
    trainer.save_model(spec["out"])
    return {"tokens": trainer._total_train_tokens, "train_runtime": res.metrics["train_runtime"]}


def adaptr_side(spec: dict) -> dict:
    from adaptr.registry import Registry
    from adaptr.training.trainer import train

    recipe = {"name": "bench", "method": "dpo", "base": {"path": spec["base"]},
              "data": {"path": spec["data"], "format": "preference"}, "lora": LORA, "dpo": dpo_kwargs(spec)}  # fmt: skip
    m = train(recipe, registry=Registry(spec["home"]), progress=False, restart=True).metrics
    return {"tokens": m["tokens"], "train_runtime": m["train_runtime_s"]}


def child(spec: dict) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    out = adaptr_side(spec) if spec["side"] == "adaptr" else plain(spec)
    out["wall_s"] = time.perf_counter() - t0
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    import torch

    if torch.cuda.is_available():  # on a GPU the reference copy shows here, not in RSS
        out["peak_rss_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(out))


def run(spec: dict) -> dict:
    out = run_child(__file__, spec)
    out["tokens_per_s"] = out["tokens"] / out["train_runtime"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    from adaptr.tiny import save_tiny_base

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        heads = max(4, args.hidden // 64)
        base = save_tiny_base(work / "base", "llama", hidden_size=args.hidden, intermediate_size=args.hidden * 2,
                              num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads)  # fmt: skip
        data = make_pairs(work)
        print(f"machine: {os.cpu_count()} cores, torch CPU; base: LLaMA hidden {args.hidden}, {args.layers} layers, "
              f"LoRA r=16 on q/k/v/o, DPO sigmoid, batch 8, max_length 256, fp32")  # fmt: skip
        sides: dict[str, list[dict]] = {"adaptr": [], "plain": [], "plain+ref": []}
        for i in range(args.repeat):
            for side in sides:
                spec = {"side": side, "base": str(base), "data": str(data), "steps": args.steps,
                        "out": str(work / f"out-{side}-{i}"), "home": str(work / f"home-{i}")}  # fmt: skip
                sides[side].append(run(spec))
        print(f"\n== adaptr DPO vs plain TRL DPO ({args.steps} steps, median of {args.repeat})")
        for side, runs in sides.items():
            print(f"  {side:<10} {med(runs, 'tokens_per_s'):8.0f} tokens/s (training loop)   "
                  f"{med(runs, 'wall_s'):6.1f} s end to end   peak RSS {med(runs, 'peak_rss_mb'):6.0f} MB")  # fmt: skip
        ratio = med(sides["adaptr"], "tokens_per_s") / med(sides["plain"], "tokens_per_s")
        extra = med(sides["plain+ref"], "peak_rss_mb") - med(sides["plain"], "peak_rss_mb")
        print(f"  ratio adaptr / plain, tokens/s: {ratio:.3f}")
        print(
            f"  a separate reference model costs {extra:+.0f} MB peak RSS (adaptr, as TRL with PEFT, keeps none)"
        )


if __name__ == "__main__":
    main()
