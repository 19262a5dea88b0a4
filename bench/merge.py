"""Merge peak memory: `adaptr merge` against just loading the base, each in a fresh process.

Run: python bench/merge.py [--hidden 1024] [--layers 8]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


def child(spec: dict) -> None:
    """Imports first (their memory is the floor), then the measured step; RSS is read around it."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import peft  # noqa: F401
    import torch
    import transformers

    from adaptr.merge import merge
    from adaptr.registry import Registry

    floor = _rss_mb()
    t = time.perf_counter()
    if spec["mode"] == "load":
        model = transformers.AutoModelForCausalLM.from_pretrained(spec["base"])
        with torch.no_grad():
            sum(float(p.sum()) for p in model.parameters())  # every weight resident
    else:
        merge(Registry(spec["home"]), [spec["ref"]], spec["out"], force=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        "RESULT "
        + json.dumps({"floor_mb": floor, "peak_rss_mb": peak, "seconds": time.perf_counter() - t})
    )


def run(spec: dict) -> dict:
    r = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True
    )
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(line[7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    import torch
    from peft import LoraConfig, get_peft_model

    from adaptr.registry import Registry
    from adaptr.tiny import make_model, make_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_model("llama", hidden_size=args.hidden, intermediate_size=args.hidden * 2, num_hidden_layers=args.layers,
                           num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64)  # fmt: skip
        model.save_pretrained(work / "base")
        make_tokenizer().save_pretrained(work / "base")
        torch.manual_seed(0)
        get_peft_model(
            model, LoraConfig(r=16, target_modules="all-linear", init_lora_weights=False)
        ).save_pretrained(work / "lora")
        del model
        reg = Registry(work / "home")
        reg.add_base("base", work / "base")
        reg.add("lora", work / "lora", base="base")
        size_mb = (work / "base" / "model.safetensors").stat().st_size / 2**20
        load = run({"mode": "load", "base": str(work / "base")})
        mrg = run(
            {
                "mode": "merge",
                "home": str(work / "home"),
                "ref": "lora",
                "out": str(work / "merged"),
            }
        )
        print(
            f"base: LLaMA hidden {args.hidden}, {args.layers} layers, fp32 weights {size_mb:.0f} MB; LoRA r=16 all-linear"
        )
        for label, r in (
            ("load the base (every weight touched)", load),
            ("adaptr merge (load, attach, merge, save)", mrg),
        ):
            print(f"  {label:<42} peak RSS {r['peak_rss_mb']:6.0f} MB = imports {r['floor_mb']:4.0f} MB "
                  f"+ {r['peak_rss_mb'] - r['floor_mb']:5.0f} MB ({(r['peak_rss_mb'] - r['floor_mb']) / size_mb:.2f}x the base)  {r['seconds']:.1f}s")  # fmt: skip


if __name__ == "__main__":
    main()
