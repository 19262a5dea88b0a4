"""adaptr's Python API in one page: train, version, compose, merge and serve on a tiny local model.

Run: python examples/quickstart.py [--out quickstart-out]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

DATA = Path(__file__).parent / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="quickstart-out")
    out = Path(ap.parse_args().out).resolve()
    shutil.rmtree(out, ignore_errors=True)

    from adaptr import Registry
    from adaptr.compose import compose
    from adaptr.merge import merge
    from adaptr.runtime import quiet_libraries
    from adaptr.serving import AdapterServer
    from adaptr.tiny import save_tiny_base
    from adaptr.training.trainer import train

    quiet_libraries()
    reg = Registry(out / "registry")
    reg.add_base(
        "tiny",
        save_tiny_base(
            out / "tiny", "llama", hidden_size=64, intermediate_size=128, initializer_range=0.3
        ),
    )

    sft = {
        "max_steps": 100,
        "learning_rate": 1e-2,
        "per_device_train_batch_size": 8,
        "gradient_checkpointing": False,
    }
    lora = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}
    zh = train({"name": "zh-en", "base": {"path": "tiny"}, "data": {"path": str(DATA / "translate_zh_en.jsonl"), "format": "alpaca"},
                "lora": lora, "sft": sft}, registry=reg, progress=False)  # fmt: skip
    quotes = train({"name": "quotes", "base": {"path": "tiny"}, "tags": ["prod"],
                    "data": {"path": str(DATA / "quotes.jsonl"), "format": "text", "options": {"field": "quote"}},
                    "lora": lora, "sft": sft}, registry=reg, progress=False)  # fmt: skip
    print(
        "trained:",
        zh.version.ref,
        f"loss {zh.metrics['train_loss']:.3f};",
        quotes.version.ref,
        f"loss {quotes.metrics['train_loss']:.3f}",
    )

    blend = compose(reg, ["zh-en", "quotes@prod"], [0.5, 0.5], "cat", "blend")
    print(
        "composed:", blend.ref, "from", blend.lineage["parents"], "by", blend.lineage["combination"]
    )
    record = merge(reg, ["zh-en"], out / "zh-en-merged")
    print("merged:", out / "zh-en-merged", "-", record.path)

    server = AdapterServer(reg, "tiny", max_adapters=4)
    prompt = "### 指令:\n把下面的中文翻译成英文。\n\n### 输入:\n猫\n\n### 回答:\n"
    answers = server.generate(
        [prompt, "Knowledge is", prompt], ["zh-en", "quotes", None], max_new_tokens=8
    )
    for who, text in zip(["zh-en", "quotes", "base"], answers, strict=True):
        print(f"served {who:<7} -> {text!r}")
    print(
        "versions:",
        [v.ref for v in reg.list()],
        "| verify:",
        "ok" if reg.verify().ok else "DAMAGED",
    )


if __name__ == "__main__":
    main()
