"""Registry benchmarks: cold-process `adaptr list` on 1,000 versions; `add` of a 100 MB adapter vs cp.

Run: python bench/registry.py [--versions 1000] [--size-mb 100] [--repeat 15]
Both sides of each comparison run here, in one go, on the same files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from adaptr.registry import Registry

ADAPTR = [sys.executable, "-c", "from adaptr.cli import run; run()"]


def write_adapter(path: Path, size_mb: float, seed: int = 0) -> Path:
    """A LoRA folder whose weights total about ``size_mb`` MB (r=64, hidden 4096, q/k/v/o)."""
    path.mkdir(parents=True, exist_ok=True)
    r, hidden = 64, 4096
    per_module = 2 * r * hidden * 4
    n_modules = max(1, round(size_mb * 1e6 / per_module))
    rng = np.random.default_rng(seed)
    names = ["q_proj", "k_proj", "v_proj", "o_proj"]
    tensors = {}
    for i in range(n_modules):
        key = f"base_model.model.model.layers.{i // 4}.self_attn.{names[i % 4]}"
        tensors[f"{key}.lora_A.weight"] = rng.standard_normal((r, hidden), dtype=np.float32)
        tensors[f"{key}.lora_B.weight"] = rng.standard_normal((hidden, r), dtype=np.float32)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 128, "target_modules": names,
           "base_model_name_or_path": "org/bench-base"}  # fmt: skip
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    (path / "README.md").write_text(f"bench adapter {seed}\n")
    return path


def timed(cmd: list[str], env: dict | None = None) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t


def bench_list(work: Path, versions: int, repeat: int) -> dict:
    home = work / "home-list"
    reg = Registry(home)
    names = 50
    srcs = [write_adapter(work / f"small-{i}", 0.01, seed=i) for i in range(names)]
    t = time.perf_counter()
    for i in range(versions):
        reg.add(f"task-{i % names:02d}", srcs[i % names], tags=["prod"] if i < names else ())
    add_each = (time.perf_counter() - t) / versions
    reg.switch("task-00")
    env = {**os.environ, "ADAPTR_HOME": str(home)}
    out = {"versions": versions, "adapters": names, "add_small_ms": add_each * 1e3}
    for label, args in (
        ("python -c pass", None),
        ("adaptr --help", ["--help"]),
        ("adaptr list", ["list"]),
        ("adaptr list -a", ["list", "-a"]),
        ("adaptr list --json", ["list", "--json"]),
        ("adaptr show task-07", ["show", "task-07"]),
    ):
        cmd = [sys.executable, "-c", "pass"] if args is None else ADAPTR + args
        timed(cmd, env)  # warm the page cache, not the interpreter: each run is a new process
        out[label] = statistics.median(timed(cmd, env) for _ in range(repeat))
    return out


def bench_add(work: Path, size_mb: float, repeat: int) -> dict:
    src = write_adapter(work / "big", size_mb)
    total = sum(p.stat().st_size for p in src.iterdir())
    cp, cp_sync, add_cli, add_api = [], [], [], []
    for i in range(repeat):
        dst = work / f"cp-{i}"
        cp.append(timed(["cp", "-r", str(src), str(dst)]))
        shutil.rmtree(dst)
        t = time.perf_counter()
        subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
        subprocess.run(["sync", "-f", str(dst)], check=True)
        cp_sync.append(time.perf_counter() - t)
        shutil.rmtree(dst)
        home = work / f"home-add-{i}"
        add_cli.append(
            timed(ADAPTR + ["add", "big", str(src)], {**os.environ, "ADAPTR_HOME": str(home)})
        )
        shutil.rmtree(home)
        t = time.perf_counter()
        Registry(home).add("big", src)
        add_api.append(time.perf_counter() - t)
        shutil.rmtree(home)
    med = statistics.median
    return {
        "bytes": total, "cp -r": med(cp), "cp -r + sync": med(cp_sync),
        "adaptr add (CLI process)": med(add_cli), "Registry.add (in process)": med(add_api),
    }  # fmt: skip


def bench_recheck(work: Path, size_mb: float, repeat: int) -> dict:
    """The staged copy alone vs the copy with the source re-hashed after it (what ``add``
    does to refuse a source rewritten in place meanwhile), alternating, one file."""
    from adaptr.registry import blobs

    src = work / "recheck-src"
    src.write_bytes(os.urandom(int(size_mb * 1e6)))
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(repeat):
        for recheck in (False, True):
            dst = work / f"recheck-{i}-{recheck}"
            t = time.perf_counter()
            blobs.copy_and_hash(src, dst, recheck=recheck)
            times[recheck].append(time.perf_counter() - t)
            dst.unlink()
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--versions", type=int, default=1000)
    ap.add_argument("--size-mb", type=float, default=100)
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        work = Path(tmp)
        print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}, {sys.platform}")
        ls = bench_list(work, args.versions, args.repeat)
        print(
            f"\n== cold-process read commands, {ls['versions']} versions of {ls['adapters']} adapters (median of {args.repeat})"
        )
        for k, v in ls.items():
            if isinstance(v, float) and k != "add_small_ms":
                print(f"  {k:<24} {v * 1e3:8.1f} ms")
        print(f"  (populating: {ls['add_small_ms']:.1f} ms per small add, fsync included)")
        ad = bench_add(work, args.size_mb, max(3, args.repeat // 3))
        mb = ad.pop("bytes") / 1e6
        print(f"\n== storing a {mb:.0f} MB adapter (median of {max(3, args.repeat // 3)})")
        for k, v in ad.items():
            print(f"  {k:<28} {v * 1e3:8.1f} ms  {mb / v:7.0f} MB/s")
        print(f"  speed of add vs cp -r: CLI {ad['cp -r'] / ad['adaptr add (CLI process)']:.2f}x, "
              f"API {ad['cp -r'] / ad['Registry.add (in process)']:.2f}x; "
              f"vs cp -r + sync: CLI {ad['cp -r + sync'] / ad['adaptr add (CLI process)']:.2f}x, "
              f"API {ad['cp -r + sync'] / ad['Registry.add (in process)']:.2f}x")  # fmt: skip
        rc = bench_recheck(work, args.size_mb, max(3, args.repeat // 3))
        print(
            f"\n== the torn-copy check: copy + hash of {args.size_mb:.0f} MB, alternating (median)"
        )
        print(f"  copy, fsync and hash           {rc[False] * 1e3:8.1f} ms")
        print(
            f"  + the source re-hashed          {rc[True] * 1e3:8.1f} ms  ({rc[True] / rc[False]:.2f}x)"
        )


if __name__ == "__main__":
    main()
