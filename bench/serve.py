"""Serving benchmark: mixed-adapter batches with AdapterServer vs PEFT, in one process.

Run: python bench/serve.py [--hidden 256] [--layers 4] [--adapters 8] [--requests 32] [--tokens 16]
     [--targets all-linear|attention] [--repeat 5]
     python bench/serve.py --continuous [--hidden 512] [--layers 6] [--arrivals 40] [--rate 4]
       the scheduler (continuous batching) under the loads of issue 16: a 4-token request
       while a 200-token one runs (latency over its alone latency), random arrivals
       (p50 latency, p99 per-token latency), a burst of 64 x 32 tokens (tokens/s) against
       static batches of 32 (model.generate until the longest ends); two rank-8 adapters, fp32.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adaptr.registry import Registry
    from adaptr.serving import AdapterServer


def timed(fn, repeat: int) -> float:
    return interleaved({"": fn}, repeat)[""]


def interleaved(sides: dict, repeat: int) -> dict[str, float]:
    """Median wall time of each side, the sides taking turns (so host noise hits them alike)."""
    for fn in sides.values():
        fn()  # warm-up
    runs: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeat):
        for name, fn in sides.items():
            t = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - t)
    return {name: statistics.median(r) for name, r in runs.items()}


def parse_args() -> argparse.Namespace:
    """The command line's flags."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument(
        "--targets",
        default="all-linear",
        choices=["attention", "all-linear"],
        help="LoRA targets of the adapters (all-linear: the shape of the issue's PEFT figures)",
    )
    ap.add_argument("--continuous", action="store_true", help="the scheduler's loads (see above)")
    ap.add_argument(
        "--arrivals", type=int, default=40, help="--continuous: requests arriving at random"
    )
    ap.add_argument("--rate", type=float, default=4.0, help="--continuous: arrivals per second")
    return ap.parse_args()


def main() -> None:
    """The mixed-batch benchmark, or with --continuous the scheduler's loads."""
    args = parse_args()
    if args.continuous:
        continuous(args)
        return

    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import torch

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base, reg, refs = build_registry(args, work)
        sides = build_sides(args, work, base, reg, refs)
        times = time_batches(args, sides)
        same = outputs_identical(sides)
        t_naive = timed(lambda: naive(sides), max(1, args.repeat // 2))
        switches = time_switches(sides)
        print_table(args, sides, times, t_naive, same, switches)
        bench_loading(args, sides, work)


def build_registry(args: argparse.Namespace, work: Path) -> tuple[Path, Registry, list[str]]:
    """The tiny base and its random adapters (r 8/16 in turn) in a registry."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from adaptr.registry import Registry
    from adaptr.tiny import save_tiny_base

    heads = max(4, args.hidden // 64)
    base = save_tiny_base(work / "base", "llama", hidden_size=args.hidden, intermediate_size=args.hidden * 2,
                          num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads)  # fmt: skip
    reg = Registry(work / "home")
    reg.add_base("base", base)
    refs = []
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"] + (
        ["gate_proj", "up_proj", "down_proj"] if args.targets == "all-linear" else []
    )
    for i in range(args.adapters):
        torch.manual_seed(i)
        m = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=8 * (1 + i % 2), lora_alpha=16,
                           target_modules=targets, init_lora_weights=False))  # fmt: skip
        m.save_pretrained(work / f"a{i}")
        refs.append(reg.add(f"task-{i}", work / f"a{i}", base="base").ref)
    return base, reg, refs


@dataclass
class Sides:
    """The requests, and the adapters on an AdapterServer and on one PeftModel."""

    reg: Registry
    refs: list[str]
    server: AdapterServer
    peft: Any  # PeftModel with every adapter loaded
    tok: Any  # the server's tokenizer
    prompts: list[str]
    mixed: list[str]  # as many rows per adapter
    uneven: list[str]  # runs of unequal lengths
    gen: dict  # generation settings
    enc: Any  # the prompts tokenized in one padded batch


def build_sides(
    args: argparse.Namespace, work: Path, base: Path, reg: Registry, refs: list[str]
) -> Sides:
    """The requests, an AdapterServer with every adapter loaded, and PEFT on the same files."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adaptr.serving import AdapterServer

    prompts = [f"request {i}: the quick brown fox" for i in range(args.requests)]
    mixed = [refs[i % len(refs)] for i in range(args.requests)]  # as many rows per adapter
    rng = random.Random(0)
    uneven = [rng.choice(refs) for _ in range(args.requests)]  # runs of unequal lengths
    gen = {"max_new_tokens": args.tokens, "do_sample": False}

    server = AdapterServer(reg, "base", max_adapters=max(args.adapters, 8))
    for r in refs:
        server.load(r)
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base),
        reg.export(refs[0], work / "e0"),
        adapter_name=refs[0],
    ).eval()
    for i, r in enumerate(refs[1:], 1):
        peft.load_adapter(str(reg.export(r, work / f"e{i}")), adapter_name=r)
    peft.set_adapter(refs[0])
    tok = server.tokenizer
    enc = tok(prompts, return_tensors="pt", padding=True)
    return Sides(reg, refs, server, peft, tok, prompts, mixed, uneven, gen, enc)


def peft_generate(sides: Sides, names: list[str] | None = None) -> Any:
    """PEFT's model.generate on the whole batch (one adapter per row with ``names``)."""
    import torch

    with torch.no_grad():
        kw = {"adapter_names": names} if names else {}
        return sides.peft.generate(
            **sides.enc, pad_token_id=sides.tok.pad_token_id, **sides.gen, **kw
        )


def outputs_identical(sides: Sides) -> bool:
    """Whether AdapterServer's mixed batch gives the texts of PEFT's (the new tokens, decoded)."""
    out_server = sides.server.generate(sides.prompts, sides.mixed, **sides.gen)
    width = sides.enc["input_ids"].shape[1]
    out_peft = [
        sides.tok.decode(row[width:], skip_special_tokens=True)
        for row in peft_generate(sides, sides.mixed)
    ]
    return out_server == out_peft


def time_batches(args: argparse.Namespace, sides: Sides) -> dict[str, float]:
    """Median time of each batch on AdapterServer and on PEFT, the sides taking turns."""
    server, prompts, gen = sides.server, sides.prompts, sides.gen
    return interleaved(
        {
            "base": lambda: server.generate(prompts, [None] * args.requests, **gen),
            "single": lambda: server.generate(prompts, [sides.refs[0]] * args.requests, **gen),
            "mixed": lambda: server.generate(prompts, sides.mixed, **gen),
            "mixed uneven": lambda: server.generate(prompts, sides.uneven, **gen),
            "peft single": lambda: peft_generate(sides),
            "peft mixed": lambda: peft_generate(sides, sides.mixed),
        },
        args.repeat,
    )


def naive(sides: Sides) -> None:
    """PEFT one request at a time, set_adapter before each."""
    import torch

    peft, tok = sides.peft, sides.tok
    for p, r in zip(sides.prompts, sides.mixed, strict=True):
        peft.set_adapter(r)
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            peft.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pad_token_id=tok.pad_token_id,
                **sides.gen,
            )


def time_switches(sides: Sides) -> tuple[float, float]:
    """Mean time of AdapterServer.switch and of PEFT's set_adapter, in seconds."""
    refs = sides.refs
    n = 2000
    t = time.perf_counter()
    for i in range(n):
        sides.server.switch(refs[i % len(refs)])
    t_switch = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for i in range(200):
        sides.peft.set_adapter(refs[i % len(refs)])
    t_set = (time.perf_counter() - t) / 200
    return t_switch, t_set


def print_table(
    args: argparse.Namespace,
    sides: Sides,
    times: dict[str, float],
    t_naive: float,
    same: bool,
    switches: tuple[float, float],
) -> None:
    """The run's shape, each way's time and throughput, the ratios, the check and the switches."""
    t_single, t_mixed = times["single"], times["mixed"]
    t_peft_single, t_peft_mixed = times["peft single"], times["peft mixed"]
    print(f"base: LLaMA hidden {args.hidden}, {args.layers} layers; {args.adapters} adapters (r 8/16, {args.targets}); "
          f"{args.requests} requests, {args.tokens} new tokens, greedy; median of {args.repeat}")  # fmt: skip
    rows = [("AdapterServer, bare base (no adapter, the floor)", times["base"]),
            ("AdapterServer, single adapter", t_single), ("AdapterServer, mixed", t_mixed),
            (f"AdapterServer, mixed uneven {sorted(Counter(sides.uneven).values())}", times["mixed uneven"]),
            ("PEFT, single adapter", t_peft_single), ("PEFT mixed batch (adapter_names=)", t_peft_mixed),
            ("naive: one request at a time, set_adapter each", t_naive)]  # fmt: skip
    for label, sec in rows:
        print(f"  {label:<58} {sec:7.3f} s  {args.requests * args.tokens / sec:8.0f} tokens/s")
    print(f"  mixed / single (AdapterServer): {t_single / t_mixed:.2f}x throughput "
          f"({t_single / times['mixed uneven']:.2f}x uneven)")  # fmt: skip
    print(
        f"  AdapterServer mixed vs PEFT mixed: {t_peft_mixed / t_mixed:.2f}x; vs naive: {t_naive / t_mixed:.2f}x"
    )
    print(f"  outputs identical to PEFT's mixed batch: {same}")
    t_switch, t_set = switches
    print(
        f"  switch default adapter: {t_switch * 1e3:.4f} ms; PEFT set_adapter: {t_set * 1e3:.3f} ms"
    )


def bench_loading(args: argparse.Namespace, sides: Sides, work: Path) -> None:
    """Loading: 1 resident vs 100 resident, against PeftModel.load_adapter on the same files."""
    from adaptr.serving import AdapterServer

    reg, refs = sides.reg, sides.refs
    big = AdapterServer(reg, "base", max_adapters=101)
    first = timed_load(big, reg, refs[0])
    for i in range(99):
        reg_ref = reg.add(f"bulk-{i}", work / f"a{i % args.adapters}", base="base").ref
        big.load(reg_ref)
    last = timed_load(big, reg, refs[1])
    folder = str(reg.export(refs[1], work / "pl"))
    t = time.perf_counter()
    sides.peft.load_adapter(folder, adapter_name="timed")
    t_peft_load = time.perf_counter() - t
    print(f"  load an adapter from the registry: {first * 1e3:.1f} ms with 1 resident, {last * 1e3:.1f} ms with 100; "
          f"PeftModel.load_adapter on the same files: {t_peft_load * 1e3:.1f} ms")  # fmt: skip


def timed_load(server, reg, ref) -> float:
    t = time.perf_counter()
    server.load(ref)
    return time.perf_counter() - t


def continuous(args) -> None:
    """The scheduler under the loads of issue 16 (in process, no HTTP)."""
    import logging
    import threading
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from adaptr.registry import Registry
    from adaptr.serving import AdapterServer
    from adaptr.serving.requests import Request
    from adaptr.serving.scheduler import Scheduler
    from adaptr.tiny import save_tiny_base

    hidden = args.hidden if args.hidden != 256 else 512
    layers = args.layers if args.layers != 4 else 6
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        heads = max(4, hidden // 64)
        base = save_tiny_base(work / "base", "llama", hidden_size=hidden, intermediate_size=hidden * 2,
                              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads)  # fmt: skip
        reg = Registry(work / "home")
        reg.add_base("base", base)
        refs = []
        for i in range(2):
            torch.manual_seed(i)
            m = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=8, lora_alpha=16,
                               target_modules=["q_proj", "v_proj"], init_lora_weights=False))  # fmt: skip
            m.save_pretrained(work / f"a{i}")
            refs.append(reg.add(f"task-{i}", work / f"a{i}", base="base").ref)
        server = AdapterServer(reg, "base", max_adapters=4, dtype="float32")
        for r in refs:
            server.load(r)
        sched = Scheduler(server)
        ids = server.tokenizer("Summarise: the quick brown fox jumps over the lazy dog").input_ids

        def req(n, k=0):
            return Request(ids, refs[k % 2], n, ignore_eos=True)

        def latency(r) -> float:
            t = time.perf_counter()
            sched.submit(r).wait()
            return time.perf_counter() - t

        latency(req(4))  # warm-up
        alone = statistics.median(latency(req(4)) for _ in range(5))
        during = []
        for _ in range(3):
            long = sched.submit(req(200, 1))
            while len(long.tokens) < 20:
                time.sleep(0.005)
            during.append(latency(req(4)))
            long.wait()
        print(f"short alone {alone * 1000:.0f} ms, during a 200-token one "
              f"{statistics.median(during) * 1000:.0f} ms: {statistics.median(during) / alone:.2f}x")  # fmt: skip

        rng = random.Random(0)
        results: list[tuple[float, int]] = []
        lock = threading.Lock()

        def watch(r, t0):
            r.wait()
            with lock:
                results.append((time.perf_counter() - t0, r.max_tokens))

        threads = []
        for i in range(args.arrivals):
            time.sleep(rng.expovariate(args.rate))
            r = Request(ids, refs[i % 2], rng.randint(8, 128), ignore_eos=True)
            t0 = time.perf_counter()
            sched.submit(r)
            th = threading.Thread(target=watch, args=(r, t0))
            th.start()
            threads.append(th)
        for th in threads:
            th.join()
        lat = sorted(t for t, _ in results)
        per_token = sorted(t / n for t, n in results)
        q = statistics.quantiles
        print(f"random arrivals ({args.arrivals} at {args.rate:g}/s, 8-128 tokens): "
              f"p50 latency {q(lat, n=100)[49]:.2f} s, p99 per-token {q(per_token, n=100)[98] * 1000:.0f} ms")  # fmt: skip

        burst = [Request(ids, refs[i % 2], 32, ignore_eos=True) for i in range(64)]
        t = time.perf_counter()
        sched.hold()
        for r in burst:
            sched.submit(r)
        sched.release()
        for r in burst:
            r.wait()
        cont = 64 * 32 / (time.perf_counter() - t)
        prompts = [server.tokenizer.decode(ids)] * 64
        adapters = [refs[i % 2] for i in range(64)]
        t = time.perf_counter()
        for k in range(
            0, 64, 32
        ):  # static batches of 32 (the old batcher's), min_new_tokens: no EOS
            server.generate(
                prompts[k : k + 32], adapters[k : k + 32], max_new_tokens=32, min_new_tokens=32
            )
        static = 64 * 32 / (time.perf_counter() - t)
        print(
            f"burst 64 x 32 tokens: continuous {cont:.0f} tokens/s, static batches of 32 {static:.0f} tokens/s"
        )
        sched.close(60)


if __name__ == "__main__":
    main()
