"""adaptr end-to-end demo on a tiny local model: no network, a few minutes on 2 CPU cores.

1. builds a tiny LLaMA-architecture base (random weights) and a byte-level tokenizer;
2. trains two LoRA adapters the way the seeds' tutorials do (TRL SFTTrainer + PEFT, with
   LoRA targets from adaptr's LLaMA family plugin and data through its formatters):
   an English-quotes completion task and an alpaca-style 中文→English translation task,
   and one of them twice (a longer run), so there are versions;
3. drives the registry through the real `adaptr` CLI: base add, add, list, show, tag,
   switch, export, verify, gc;
4. checks that the exported adapter loads with plain PeftModel and gives the same logits,
   and prints each adapter's loss on its own task against the bare base.

Run: python examples/demo.py [--out DIR] [--steps N]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

from rich.console import Console

DATA = Path(__file__).parent / "data"
warnings.filterwarnings("ignore", category=FutureWarning)
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # CPU kernel-hub notice, irrelevant here
console = Console(highlight=False, width=max(100, Console().width))


def adaptr(*args: str, home: Path) -> str:
    """Run the real CLI, echo the command and its output, return stdout."""
    console.print(f"[bold cyan]$ adaptr {' '.join(shlex.quote(a) for a in args)}[/]")
    r = subprocess.run(
        [sys.executable, "-m", "adaptr", *args], capture_output=True, text=True,
        env={**os.environ, "ADAPTR_HOME": str(home), "COLUMNS": "120"},
    )  # fmt: skip
    out = (r.stdout + r.stderr).rstrip()
    if out:
        console.print(out, markup=False)
    if r.returncode != 0:
        raise SystemExit(f"demo failed: adaptr {' '.join(args)} exited {r.returncode}")
    return r.stdout


def records(task: str) -> list[dict]:
    """TRL records through adaptr's formatters: quote text (the Pythia seed's task), alpaca prompt/completion."""
    from adaptr.data import load_records

    if task == "quotes":
        return load_records(DATA / "quotes.jsonl", "text", field="quote")
    return load_records(DATA / "translate_zh_en.jsonl", "alpaca", lang="zh")


def train(base: Path, task: str, out: Path, steps: int, tokenizer) -> float:
    """The seeds' recipe (LoraConfig + SFTTrainer, then save_model), with the LLaMA family's
    targets and fix-ups from adaptr's plugins. Returns seconds taken."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from adaptr.lora import lora_config

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base)
    peft_config, family = lora_config(
        model, targets="all-linear", r=8, lora_alpha=16, lora_dropout=0.0
    )
    family.fix_tokenizer(tokenizer)
    args = SFTConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-2,
        lr_scheduler_type="constant", logging_steps=max(1, steps // 4), save_strategy="no", report_to=[],
        max_length=128, use_cpu=True, bf16=False, seed=0, disable_tqdm=True, log_level="error",
    )  # fmt: skip
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(records(task)),
        processing_class=tokenizer, peft_config=peft_config,
    )  # fmt: skip
    trainer.train()
    trainer.save_model(str(out))
    return time.perf_counter() - t


def task_loss(model, tokenizer, task: str) -> float:
    """Mean token loss on the task's own records (completion tokens only for prompt/completion)."""
    import torch

    losses = []
    for rec in records(task):
        if "text" in rec:
            ids = tokenizer(rec["text"] + tokenizer.eos_token, return_tensors="pt").input_ids
            labels = ids.clone()
        else:
            p = tokenizer(rec["prompt"]).input_ids
            c = tokenizer(rec["completion"] + tokenizer.eos_token).input_ids
            ids = torch.tensor([p + c])
            labels = torch.tensor([[-100] * len(p) + c])
        with torch.no_grad():
            losses.append(model(input_ids=ids, labels=labels).loss.item())
    return sum(losses) / len(losses)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default="demo-out", help="work folder (recreated)")
    ap.add_argument("--steps", type=int, default=80, help="training steps per adapter")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    home = out / "registry"
    started = time.perf_counter()

    console.rule("[bold]1. a tiny base model, built locally")
    with console.status("building the tiny base…"):
        import torch
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        import datasets

        datasets.disable_progress_bars()

        from adaptr.tiny import save_tiny_base

        # a wider init than transformers' 0.02 gives random logits a trained model's scale,
        # so a few dozen LoRA steps visibly learn each task
        base = save_tiny_base(
            out / "tiny-llama",
            "llama",
            hidden_size=64,
            intermediate_size=128,
            initializer_range=0.3,
        )
        tokenizer = AutoTokenizer.from_pretrained(base)
    console.print(f"base: {base} (LLaMA architecture, hidden 64, 2 layers, random weights)")

    console.rule("[bold]2. train two task adapters with TRL + PEFT (the seeds' recipe)")
    runs = {}
    for task, name, steps in (
        ("quotes", "quotes-a", args.steps // 2),
        ("quotes", "quotes-b", args.steps),
        ("translate", "zh-en", args.steps),
    ):
        with console.status(f"training {task} for {steps} steps…"):
            runs[name] = train(base, task, out / "runs" / name, steps, tokenizer)
        console.print(
            f"trained {name}: {steps} steps in {runs[name]:.1f}s -> {out / 'runs' / name}"
        )

    console.rule("[bold]3. the registry, through the CLI")
    adaptr("base", "add", "tiny-llama", str(base), home=home)
    adaptr("add", "quotes", str(out / "runs" / "quotes-a"), "--base", "tiny-llama", home=home)
    adaptr("add", "quotes", str(out / "runs" / "quotes-b"), "--base", "tiny-llama", home=home)
    adaptr(
        "add",
        "zh-en",
        str(out / "runs" / "zh-en"),
        "--base",
        "tiny-llama",
        "--tag",
        "prod",
        home=home,
    )
    adaptr("tag", "quotes@2", "prod", home=home)
    adaptr("switch", "quotes@prod", home=home)
    adaptr("list", "-a", home=home)
    adaptr("show", "quotes@prod", home=home)
    adaptr("export", "quotes@prod", str(out / "exported" / "quotes"), home=home)
    adaptr("verify", home=home)
    adaptr("rm", "quotes@1", home=home)
    adaptr("gc", home=home)

    console.rule("[bold]4. exported adapters load with plain PEFT; each does its own task better")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adaptr.registry import Registry

    reg = Registry(home)
    probe = torch.tensor([tokenizer("Quote: Knowledge is power.").input_ids])
    src = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), out / "runs" / "quotes-b"
    ).eval()
    exp = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), out / "exported" / "quotes"
    ).eval()
    with torch.no_grad():
        same = torch.equal(src(input_ids=probe).logits, exp(input_ids=probe).logits)
    console.print(
        f"exported quotes@prod gives identical logits to the trained folder: [bold]{same}[/]"
    )
    bare = AutoModelForCausalLM.from_pretrained(base).eval()
    table = []
    for ref, task in (("quotes@prod", "quotes"), ("zh-en@prod", "translate")):
        folder = reg.export(ref, out / "exported" / ref.replace("@", "-"), force=True)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder).eval()
        table.append(
            (ref, task, task_loss(bare, tokenizer, task), task_loss(model, tokenizer, task))
        )
    for ref, task, b, a in table:
        console.print(
            f"{ref:<12} on {task:<9}: loss base {b:.3f} (ppl {math.exp(b):.1f}) -> adapter {a:.3f} (ppl {math.exp(a):.1f})"
        )
    if not same or any(a >= b for *_, b, a in table):
        raise SystemExit(
            "demo failed: an adapter did not beat the base on its task, or export changed logits"
        )

    console.rule("[bold]summary")
    console.print(
        f"3 training runs, 2 adapters (quotes has 2 versions, v1 removed and collected), "
        f"registry at {home}, total {time.perf_counter() - started:.0f}s"
    )


if __name__ == "__main__":
    main()
