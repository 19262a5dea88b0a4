"""Training benchmarks: `adaptr train` vs the plain seeds' recipe; packing vs padded batches.

Run: python bench/train.py [--hidden 256] [--layers 4] [--steps 30] [--repeat 3]

Each run is a fresh subprocess (so peak memory is its own); sides alternate, and the
script prints medians and ratios. Tokens are TRL's count of non-padding tokens trained on.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path

from children import med, run_child

ROOT = Path(__file__).resolve().parent.parent


def make_data(work: Path) -> tuple[Path, Path]:
    """Fixed-size alpaca data (overhead bench) and variable-length text data (packing bench)."""
    rows = [
        json.loads(line)
        for line in (ROOT / "examples/data/translate_zh_en.jsonl").open(encoding="utf-8")
    ]
    fixed = work / "fixed.jsonl"
    fixed.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows * 8), encoding="utf-8"
    )
    quotes = [
        json.loads(line)["quote"]
        for line in (ROOT / "examples/data/quotes.jsonl").open(encoding="utf-8")
    ]
    rng = random.Random(0)
    var = work / "variable.jsonl"
    with var.open("w", encoding="utf-8") as f:
        for _ in range(320):  # long-tailed lengths: most short, some near max_length
            n = min(12, int(rng.paretovariate(1.2)))
            f.write(json.dumps({"text": " ".join(rng.choice(quotes) for _ in range(n))}) + "\n")
    return fixed, var


def child(args: argparse.Namespace) -> None:
    """One training run; prints a JSON line with its figures."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    spec = json.loads(args.child)
    t0 = time.perf_counter()
    out = plain(spec) if spec["side"] == "plain" else adaptr_side(spec)
    out["wall_s"] = time.perf_counter() - t0
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def sft_kwargs(spec: dict) -> dict:
    kw = {"per_device_train_batch_size": spec.get("batch", 8), "learning_rate": spec.get("lr", 1e-4), "seed": 0, "logging_steps": 1,
          "gradient_checkpointing": False, "max_length": spec.get("max_length", 256), "dataloader_num_workers": 0}  # fmt: skip
    if "steps" in spec:
        kw["max_steps"] = spec["steps"]
    else:
        kw["num_train_epochs"] = spec["epochs"]
    if spec.get("packing"):
        kw["packing"] = True
        kw["packing_strategy"] = spec["packing"]
        kw["eval_packing"] = False
    return kw


def plain(spec: dict) -> dict:
    """The seeds' recipe, written out by hand."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    from adaptr.data.files import load_records

    tokenizer = AutoTokenizer.from_pretrained(spec["base"])
    model = AutoModelForCausalLM.from_pretrained(spec["base"])
    data = Dataset.from_list(load_records(spec["data"], spec["format"]))
    args = SFTConfig(
        output_dir=spec["out"],
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        **sft_kwargs(spec),
    )
    set_seed(0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"))  # fmt: skip
    res = trainer.train()
    trainer.save_model(spec["out"])
    return {
        "tokens": trainer._total_train_tokens,
        "train_runtime": res.metrics["train_runtime"],
        "steps": trainer.state.global_step,
    }


def adaptr_side(spec: dict) -> dict:
    from adaptr.registry import Registry
    from adaptr.training.trainer import train

    recipe = {"name": "bench", "base": {"path": spec["base"]}, "data": {"path": spec["data"], "format": spec["format"]},
              "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "attention"}, "sft": sft_kwargs(spec)}  # fmt: skip
    if spec.get("eval"):
        recipe["data"]["eval_path"] = spec["eval"]
    r = train(
        recipe, registry=Registry(spec["home"]), progress=spec.get("progress", True), restart=True
    )
    m = r.metrics
    return {
        "tokens": m["tokens"],
        "train_runtime": m["train_runtime_s"],
        "steps": m["steps"],
        "eval_loss": m.get("eval_loss"),
    }


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
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    from adaptr.tiny import save_tiny_base

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = save_tiny_base(work / "base", "llama", hidden_size=args.hidden, intermediate_size=args.hidden * 2,
                              num_hidden_layers=args.layers, num_attention_heads=max(4, args.hidden // 64),
                              num_key_value_heads=max(4, args.hidden // 64))  # fmt: skip
        fixed, var = make_data(work)
        print(f"machine: {os.cpu_count()} cores, torch CPU; base: LLaMA hidden {args.hidden}, {args.layers} layers, "
              f"LoRA r=16 on q/k/v/o, batch 8, fp32")  # fmt: skip

        common = {"base": str(base), "data": str(fixed), "format": "alpaca", "steps": args.steps}
        sides: dict[str, list[dict]] = {"plain": [], "adaptr": []}
        for i in range(args.repeat):
            for side in ("plain", "adaptr"):
                spec = {
                    **common,
                    "side": side,
                    "out": str(work / f"out-{side}-{i}"),
                    "home": str(work / f"home-{i}"),
                }
                sides[side].append(run(spec))
        print(
            f"\n== adaptr train vs the plain TRL + PEFT recipe ({args.steps} steps, median of {args.repeat})"
        )
        for side, runs in sides.items():
            print(f"  {side:<7} {med(runs, 'tokens_per_s'):8.0f} tokens/s (training loop)   "
                  f"{med(runs, 'wall_s'):6.1f} s end to end   peak RSS {med(runs, 'peak_rss_mb'):6.0f} MB")  # fmt: skip
        ratio = med(sides["adaptr"], "tokens_per_s") / med(sides["plain"], "tokens_per_s")
        print(f"  ratio adaptr / plain, tokens/s: {ratio:.3f}")

        rows = var.read_text().splitlines()
        (work / "var-train.jsonl").write_text("\n".join(rows[:288]) + "\n")
        (work / "var-eval.jsonl").write_text("\n".join(rows[288:]) + "\n")
        lengths = sorted(
            len(json.loads(r)["text"].encode()) + 1 for r in rows[:288]
        )  # byte tokens + EOS
        # same number of optimizer steps and tokens per step on both sides: packed rows are
        # max_length long, so a packed batch holds as many rows as fit the padded batch's tokens
        packed_batch = max(1, round(8 * statistics.mean(min(n, 512) for n in lengths) / 512))
        pk: dict[str, list[dict]] = {"padded": [], "packed wrapped": [], "packed bfd": []}
        for i in range(args.repeat):
            for mode in pk:
                strategy = mode.split()[-1] if mode != "padded" else None
                spec = {"side": "adaptr", "base": str(base), "data": str(work / "var-train.jsonl"), "eval": str(work / "var-eval.jsonl"),
                        "format": "text", "epochs": 1, "lr": 1e-3, "max_length": 512, "packing": strategy,
                        "batch": packed_batch if strategy else 8, "home": str(work / f"home-pk-{i}"), "progress": False}  # fmt: skip
                pk[mode].append(run(spec))
        print(f"\n== packing vs padded batches: 288 texts of {lengths[0]}-{lengths[-1]} tokens (median {lengths[144]}), "
              f"1 epoch, max_length 512, batch 8 padded / {packed_batch} packed, median of {args.repeat}")  # fmt: skip
        for mode, runs in pk.items():
            print(f"  {mode:<15} {med(runs, 'tokens_per_s'):8.0f} tokens/s  {med(runs, 'steps'):4.0f} steps  "
                  f"eval loss {med(runs, 'eval_loss'):.4f}  peak RSS {med(runs, 'peak_rss_mb'):6.0f} MB")  # fmt: skip
        for mode in ("packed wrapped", "packed bfd"):
            speed = med(pk[mode], "tokens_per_s") / med(pk["padded"], "tokens_per_s")
            loss = med(pk[mode], "eval_loss") / med(pk["padded"], "eval_loss") - 1
            print(
                f"  {mode} / padded: {speed:.2f}x tokens/s; eval loss difference {100 * loss:+.2f}%"
            )


if __name__ == "__main__":
    main()
