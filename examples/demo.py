"""adaptr end-to-end demo on a tiny local model: no network, a few minutes on 2 CPU cores.

1. builds a tiny LLaMA-architecture base (random weights) and a byte-level tokenizer;
2. trains two LoRA adapters with `adaptr train` (TRL's SFTTrainer + PEFT, the LLaMA
   family's targets, data through the `text` and `alpaca` formatters): an English-quotes
   task as in Pythia fine-tuning tutorials and an alpaca-style 中文→English translation task, the
   first one twice (the second run continues the first), so there are versions;
3. drives the registry through the real `adaptr` CLI: list, tag, switch, show, export,
   verify, rm, gc;
4. checks that exported adapters load with plain PeftModel and round-trip byte for byte,
   and prints each adapter's loss on its own task against the bare base;
5. composes the two adapters, merges one into a standalone model (checked against base +
   adapter), and serves one mixed batch with AdapterServer, printing each task's score
   for the base and for its adapter.

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
from typing import TYPE_CHECKING, Any, NamedTuple

from rich.console import Console

if TYPE_CHECKING:
    from adaptr.registry import Registry

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
    """TRL records through adaptr's formatters: quote text (a Pythia tutorial's task), alpaca prompt/completion."""
    from adaptr.data.files import load_records

    if task == "quotes":
        return load_records(DATA / "quotes.jsonl", "text", field="quote")
    return load_records(DATA / "translate_zh_en.jsonl", "alpaca", lang="zh")


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


def parse_args() -> argparse.Namespace:
    """The command line's flags."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default="demo-out", help="work folder (recreated)")
    ap.add_argument("--steps", type=int, default=80, help="training steps per adapter")
    return ap.parse_args()


def build_base(out: Path) -> tuple[Path, Any]:
    """Step 1: the tiny LLaMA base (random weights) and its tokenizer, progress bars off."""
    with console.status("building the tiny base…"):
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
    return base, tokenizer


def train_adapters(base: Path, home: Path, steps: int) -> None:
    """Step 2: quotes twice (the second run continues the first) and zh-en, with `adaptr train`."""
    adaptr("base", "add", "tiny-llama", str(base), home=home)
    common = ["--base", "tiny-llama", "--targets", "all-linear", "--r", "8", "--alpha", "16", "--dropout", "0",
              "--lr", "1e-2", "--batch-size", "8", "--no-gradient-checkpointing", "--set", "sft.lr_scheduler_type=constant"]  # fmt: skip
    quotes = [
        "--data",
        str(DATA / "quotes.jsonl"),
        "--format",
        "text",
        "--format-option",
        "field=quote",
        "--name",
        "quotes",
    ]
    adaptr("train", *quotes, *common, "--max-steps", str(steps // 2), home=home)
    # a second version: continue quotes@1 (recorded as its parent)
    adaptr(
        "train",
        *quotes,
        *common,
        "--max-steps",
        str(steps // 2),
        "--from",
        "quotes@1",
        home=home,
    )
    adaptr("train", "--data", str(DATA / "translate_zh_en.jsonl"), "--format", "alpaca", "--name", "zh-en",
           "--eval-split", "0.2", "--tag", "prod", *common, "--max-steps", str(steps), home=home)  # fmt: skip


def tour_registry(out: Path, home: Path) -> None:
    """Step 3: tag, switch, list, show, export, verify, rm and gc through the CLI."""
    adaptr("tag", "quotes@2", "prod", home=home)
    adaptr("switch", "quotes@prod", home=home)
    adaptr("list", "-a", home=home)
    adaptr("show", "quotes@prod", home=home)
    adaptr("export", "quotes@prod", str(out / "exported" / "quotes"), home=home)
    adaptr("verify", home=home)
    adaptr("rm", "quotes@1", home=home)
    adaptr("gc", home=home)


def round_trips(reg: Registry, base: Path, out: Path, home: Path, probe: Any) -> bool:
    """Whether export -> add -> export keeps the files and the exports give identical logits."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # the stored files, loaded in place, and the exported folder give the same logits
    stored = reg.path("quotes@prod")
    adaptr(
        "add", "quotes-copy", str(out / "exported" / "quotes"), "--base", "tiny-llama", home=home
    )
    same = reg.get("quotes-copy").files == reg.get("quotes@prod").files and bool(stored)
    exp = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), out / "exported" / "quotes"
    ).eval()
    again = reg.export("quotes-copy", out / "exported" / "quotes-copy")
    exp2 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), again).eval()
    with torch.no_grad():
        same = same and torch.equal(exp(input_ids=probe).logits, exp2(input_ids=probe).logits)
    console.print(
        f"export -> add -> export round-trips byte for byte and gives identical logits: [bold]{same}[/]"
    )
    return same


def task_losses(
    reg: Registry, base: Path, tokenizer: Any, out: Path
) -> list[tuple[str, str, float, float]]:
    """Print and return each adapter's loss on its own task, and the bare base's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

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
    return table


def print_lineage(reg: Registry) -> None:
    """quotes@2's lineage and metrics, as the registry recorded them."""
    v = reg.get("quotes@2")
    console.print(
        f"quotes@2 lineage: parents {v.lineage['parents']}, dataset sha256 "
        f"{v.lineage['dataset']['sha256'][:12]}…, {v.metrics['steps']} steps, train loss {v.metrics['train_loss']:.3f}",
        markup=False,
    )


def compose_and_merge(reg: Registry, base: Path, out: Path, home: Path, probe: Any) -> float:
    """Compose the two adapters, merge zh-en, and return the merge's max |logit difference|."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adaptr(
        "compose",
        "quotes@prod",
        "zh-en@prod",
        "--weights",
        "1,1",
        "--method",
        "cat",
        "--name",
        "both",
        home=home,
    )
    adaptr("merge", "zh-en@prod", "--out", str(out / "zh-en-merged"), home=home)
    merged = AutoModelForCausalLM.from_pretrained(out / "zh-en-merged").eval()
    peft_zh = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base),
        reg.export("zh-en@prod", out / "exported" / "zh"),
    ).eval()
    with torch.no_grad():
        diff = (merged(input_ids=probe).logits - peft_zh(input_ids=probe).logits).abs().max().item()
    console.print(
        f"merged zh-en loads without PEFT; max |logit difference| to base + adapter: {diff:.2e}"
    )
    return diff


class Served(NamedTuple):
    """The mixed batch's scores, for the base and for each task's adapter."""

    em_base: int  # translations exactly right
    em: int
    translations: int
    qm_base: int  # quotes continued with their next 10 characters
    qm: int
    quotes: int


def serve_mixed(reg: Registry) -> Served:
    """Serve both tasks in one mixed batch with AdapterServer, and once on the bare base."""
    from adaptr.serving import AdapterServer

    server = AdapterServer(reg, "tiny-llama", max_adapters=4)
    zh = records("translate")
    quotes_rows = records("quotes")
    halves = [
        (q["text"][: len(q["text"]) // 2], q["text"][len(q["text"]) // 2 :][:10])
        for q in quotes_rows
    ]
    prompts = [r["prompt"] for r in zh] + [h for h, _ in halves]
    with console.status("serving 48 prompts in one batch, two adapters…"):
        tuned = server.generate(
            prompts, ["zh-en@prod"] * len(zh) + ["quotes@prod"] * len(halves), max_new_tokens=10
        )
        bare_out = server.generate(prompts, None, max_new_tokens=10)

    def score(outs):  # translation: exact answer; quotes: the next 10 characters of the quote
        em = sum(o.strip() == r["completion"] for o, r in zip(outs[: len(zh)], zh, strict=True))
        qm = sum(o.startswith(t) for o, (_, t) in zip(outs[len(zh) :], halves, strict=True))
        return em, qm

    (em_base, qm_base), (em, qm) = score(bare_out), score(tuned)
    console.print(
        f"mixed batch, translation exact match: base {em_base}/{len(zh)} -> zh-en {em}/{len(zh)}"
    )
    console.print(
        f"mixed batch, quote continuation (next 10 chars): base {qm_base}/{len(halves)} -> quotes {qm}/{len(halves)}"
    )
    return Served(em_base, em, len(zh), qm_base, qm, len(halves))


def main() -> None:
    """The tour: base, training, registry, PEFT checks, compose/merge/serve, summary."""
    args = parse_args()
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    home = out / "registry"
    started = time.perf_counter()

    console.rule("[bold]1. a tiny base model, built locally")
    base, tokenizer = build_base(out)

    console.rule("[bold]2. train two task adapters with `adaptr train` (TRL SFTTrainer + PEFT)")
    train_adapters(base, home, args.steps)

    console.rule("[bold]3. the registry, through the CLI")
    tour_registry(out, home)

    console.rule("[bold]4. exported adapters load with plain PEFT; each does its own task better")
    import torch

    from adaptr.registry import Registry

    reg = Registry(home)
    probe = torch.tensor([tokenizer("Quote: Knowledge is power.").input_ids])
    same = round_trips(reg, base, out, home, probe)
    table = task_losses(reg, base, tokenizer, out)
    if not same or any(a >= b for *_, b, a in table):
        raise SystemExit(
            "demo failed: an adapter did not beat the base on its task, or export changed logits"
        )
    print_lineage(reg)

    console.rule("[bold]5. compose, merge, and serve a mixed batch")
    diff = compose_and_merge(reg, base, out, home, probe)
    s = serve_mixed(reg)
    if diff > 1e-4 or s.em <= s.em_base or s.qm <= s.qm_base:
        raise SystemExit(
            "demo failed: the merge drifted, or a served adapter did not beat the base"
        )

    console.rule("[bold]summary")
    console.print(
        f"3 training runs with `adaptr train`, 2 task adapters (quotes has 2 versions, v1 removed and collected), "
        f"a composed adapter, a merged model, one mixed batch served; translation {s.em_base}->{s.em}/{s.translations}, "
        f"quotes {s.qm_base}->{s.qm}/{s.quotes}; registry at {home}, total {time.perf_counter() - started:.0f}s"
    )


if __name__ == "__main__":
    main()
