"""adaptr ui: server-side page times with 1,000 versions, and the playground's first token
against the HTTP API's (the same AdapterServer behind both, measured side by side).

    python bench/ui.py [--versions 1000] [--rounds 20]

Page times are in-process (Starlette's TestClient: routing, registry reads, templates),
the median of ``--rounds``; the first-token times go over real sockets (uvicorn), the
playground's SSE against ``/v1/completions`` with ``stream: true``, alternated.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from helpers import write_adapter  # noqa: E402


def build(root: Path, n: int):
    from adaptr.registry import Registry

    reg = Registry(root / "home")
    src = [write_adapter(root / f"src{i}", seed=i) for i in range(4)]
    history = [{"step": s, "loss": 2.0 / s, "eval_loss": 2.2 / s} for s in range(1, 201)]
    for i in range(n):
        reg.add(f"task-{i % 40:02d}", src[i % 4], base="org/llama",
                lineage={"parents": [f"task-{i % 40:02d}@{i // 40}"] if i >= 40 else [],
                         "method": "sft", "log_history": history})  # fmt: skip
    sha = "a" * 64
    reg.add_evals([(f"task-00@{v}", {"metrics": {"loss": 1.0 + v / 100, "chrf": 40.0 - v},
                    "dataset": {"path": "dev.jsonl", "sha256": sha}, "settings": {"format": "alpaca"}})
                   for v in range(1, n // 40 + 1)])  # fmt: skip
    reg.tag("task-00@3", "prod")
    return reg


def page_times(reg, rounds: int) -> dict[str, float]:
    from starlette.testclient import TestClient

    from adaptr.ui import create_app

    c = TestClient(create_app(reg))
    last = reg.list("task-00")[-1].ref
    urls = ["/adapters", "/adapters?page=10", "/adapters?q=task-1&tag=prod", f"/v/{last}",
            "/curves?ref=task-00@1,task-01@2,task-02@3", "/compare?ref=task-00@1,task-00@2,task-00@3",
            "/playground"]  # fmt: skip
    out = {}
    for url in urls:
        assert c.get(url).status_code == 200, url
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            c.get(url)
            times.append(time.perf_counter() - t)
        out[url] = statistics.median(times) * 1000
    cold = []
    for i in range(rounds):  # a write (here a tag move) before each: the list is read again
        reg.tag(f"task-01@{1 + i % 3}", "bench")
        t = time.perf_counter()
        c.get("/adapters")
        cold.append(time.perf_counter() - t)
    out["/adapters (first after a write)"] = statistics.median(cold) * 1000
    return out


def first_tokens(rounds: int) -> tuple[float, float]:
    import httpx
    import torch

    from adaptr.registry import Registry
    from adaptr.serving import AdapterServer
    from adaptr.serving.openai.app import create_app as api_app
    from adaptr.serving.openai.app import serve_in_thread
    from adaptr.tiny import save_tiny_base
    from adaptr.ui import create_app as ui_app
    from adaptr.ui.context import UIContext

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp())
    reg = Registry(root / "home")
    reg.add_base("tiny", save_tiny_base(root / "base", "llama"))
    server = AdapterServer(reg, "tiny")
    ctx = UIContext(reg, server_factory=lambda r, b: server)
    ui_times, api_times = [], []
    with (
        serve_in_thread(api_app(server), log_level="error") as api,
        serve_in_thread(ui_app(ctx), log_level="error") as ui,
    ):
        ui = ui.removesuffix("/v1")
        csrf = ctx.csrf
        with httpx.Client(timeout=60) as http:
            for i in range(rounds + 1):
                prompt = f"Knowledge is {i}"
                t = time.perf_counter()
                body = {"prompt": prompt, "refs": ["base:tiny"], "max_tokens": 16}
                with http.stream("POST", f"{ui}/playground/stream", json=body,
                                 headers={"x-csrf-token": csrf, "origin": ui}) as r:  # fmt: skip
                    for line in r.iter_lines():
                        if line.startswith('data: {"i"'):
                            break
                first_ui = time.perf_counter() - t
                t = time.perf_counter()
                body = {"model": "tiny", "prompt": prompt, "max_tokens": 16, "stream": True}
                with http.stream("POST", f"{api}/completions", json=body) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            break
                first_api = time.perf_counter() - t
                if i:  # the first round warms both
                    ui_times.append(first_ui)
                    api_times.append(first_api)
    return statistics.median(ui_times) * 1000, statistics.median(api_times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--versions", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        reg = build(Path(tmp), args.versions)
        print(f"registry of {args.versions} versions built in {time.perf_counter() - t:.1f} s")
        for url, ms in page_times(reg, args.rounds).items():
            print(f"{ms:8.1f} ms  GET {url}")
    ui, api = first_tokens(args.rounds)
    print(f"first token, tiny llama, 1 thread: playground {ui:.1f} ms, /v1/completions {api:.1f} ms (ratio {ui / api:.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
