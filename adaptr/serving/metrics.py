"""What the server measures, and its Prometheus exposition (adaptr serve's ``/metrics``).

:class:`ServingStats` (one per :class:`~adaptr.serving.server.AdapterServer`) is written by
the scheduler's worker: a request's arrival (:meth:`~ServingStats.arrived`), the tokens of
each prefill and decoding step (:meth:`~ServingStats.tokens`, one lock per step, however
many rows) and its end (:meth:`~ServingStats.finished`). Plain Python, no prometheus import:
the engine works without a scrape. :func:`registry_for` builds a ``CollectorRegistry`` of
its own for one app (several apps in one process never clash), whose collector reads the
stats, the scheduler's queue and the server's slots when scraped.

The names follow vLLM's where they mean the same, ``adaptr:`` for ``vllm:``: requests by
``finished_reason`` (``stop``, ``length``, ``abort``: cancelled or the client gone,
``error``), prompt and generated tokens (an EOS that ended a request counted, as in
``usage``), time to first token, inter-token latency and end-to-end latency histograms
(vLLM's buckets), requests running and waiting, and ``adaptr:lora_requests_info`` (the
adapters of the running and waiting requests, ``max_lora``). adaptr's own: resident and
pinned adapters, their bytes, loads and evictions by reason. Counters carry ``adapter``
(the exact ref, ``NAME@N``; empty for the bare base) beside vLLM's ``model_name`` (the base).
Each choice of an HTTP request (``n``) is one request here, as it is one row.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adaptr.serving.requests import Request
    from adaptr.serving.server import AdapterServer

# vLLM's buckets (vllm/v1/metrics/buckets.py), so dashboards built for it read these
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
REASONS = ("stop", "length", "abort", "error")  # vLLM's finished_reason values adaptr has
_REASON = {"cancelled": "abort"}  # the scheduler's finish reasons in vLLM's words


@dataclass
class Histogram:
    """Observations in fixed buckets (``bounds``, each counting values at most it; a last
    one for the rest); written by one thread under :class:`ServingStats`' lock."""

    bounds: tuple[float, ...]
    counts: list[int] = field(init=False)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus' ``le`` buckets: (bound, observations at most it), ``+Inf`` last."""
        out, total = [], 0
        for bound, n in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


@dataclass
class AdapterUse:
    """The requests one adapter (or the bare base) served since the server started."""

    finished: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    prompt_tokens: int = 0  # prefilled
    generation_tokens: int = 0  # generated (an EOS that ended a request included)
    last_request: float | None = None  # when (time.time()) the last one ended

    @property
    def requests(self) -> int:
        return sum(self.finished.values())


@dataclass
class _Live:
    """A request between its arrival and its end."""

    arrived: float  # time.monotonic()
    last: float | None = None  # when its last token came (None: none yet)
    seen: int = 0  # its tokens counted
    use: AdapterUse | None = None  # its adapter's (once it is resolved and prefilled)


class ServingStats:
    """Counts and latencies of the requests a server ran (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[Request, _Live] = {}
        self.use: dict[str, AdapterUse] = {}  # adapter ref ("": the bare base) -> its use
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)

    def arrived(self, request: Request) -> None:
        """``request`` was queued (any thread)."""
        with self._lock:
            self._live[request] = _Live(time.monotonic())

    def prefilled(self, requests: Iterable[Request]) -> None:
        """``requests`` had their prompts prefilled (the worker)."""
        with self._lock:
            for req in requests:
                self._use(_adapter(req)).prompt_tokens += len(req.prompt_ids)

    def tokens(self, requests: Iterable[Request]) -> None:
        """A step sampled a token for each of ``requests`` (the worker; once per step)."""
        now = time.monotonic()
        with self._lock:
            for req in requests:
                live = self._live.get(req)
                if live is not None:
                    self._advance(req, live, now)

    def finished(self, request: Request) -> None:
        """``request`` ended, whichever way (the worker)."""
        now = time.monotonic()
        with self._lock:
            live = self._live.pop(request, None)
            use = self._use(_adapter(request))
            reason = _REASON.get(request.finish or "error", request.finish or "error")
            use.finished[reason] = use.finished.get(reason, 0) + 1
            use.last_request = time.time()
            if live is not None:
                self._advance(request, live, now)
                self.e2e.observe(now - live.arrived)

    def _advance(self, req: Request, live: _Live, now: float) -> None:
        n = len(req.tokens) + (req.end_token is not None)  # (completion_tokens, inlined)
        new = n - live.seen
        if new <= 0:
            return
        if live.last is None:
            self.ttft.observe(now - live.arrived)
            live.use = self._use(_adapter(req))
        else:
            gap = (now - live.last) / new
            for _ in range(new):
                self.itl.observe(gap)
        live.use.generation_tokens += new
        live.seen, live.last = n, now

    def _use(self, adapter: str) -> AdapterUse:
        use = self.use.get(adapter)
        if use is None:
            use = self.use[adapter] = AdapterUse()
        return use

    def snapshot(self) -> tuple[dict[str, AdapterUse], tuple[Histogram, Histogram, Histogram]]:
        """Copies of :attr:`use` and the histograms (ttft, itl, e2e), taken together."""
        import copy

        with self._lock:
            return copy.deepcopy(self.use), copy.deepcopy((self.ttft, self.itl, self.e2e))

    def of(self, adapter: str) -> AdapterUse:
        """A copy of ``adapter``'s use (a ref; "": the bare base)."""
        import copy

        with self._lock:
            return copy.deepcopy(self.use.get(adapter) or AdapterUse())


def _adapter(req: Request) -> str:
    if req.served is not None:
        return req.served.ref
    return req.adapter or ""


# ------------------------------------------------------------ Prometheus
def registry_for(server: AdapterServer) -> Any:
    """A ``prometheus_client.CollectorRegistry`` of its own for one app serving ``server``."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(server))
    return registry


def exposition(registry: Any) -> tuple[bytes, str]:
    """The text format of ``registry`` and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(registry), CONTENT_TYPE_LATEST


class _Collector:
    """Reads the server's stats, queue and slots at each scrape."""

    def __init__(self, server: AdapterServer):
        self.server = server

    def collect(self) -> Iterator[Any]:
        yield from self._requests()
        yield from self._queue()
        yield from self._residency()

    def _requests(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        base = self.server.base_key or ""
        use, hists = self.server.stats.snapshot()
        success = CounterMetricFamily(
            "adaptr:request_success", "Requests ended, by adapter and finished_reason.",
            labels=["model_name", "adapter", "finished_reason"],
        )  # fmt: skip
        prompt = CounterMetricFamily(
            "adaptr:prompt_tokens", "Prompt tokens prefilled.", labels=["model_name", "adapter"]
        )
        generated = CounterMetricFamily(
            "adaptr:generation_tokens", "Tokens generated (an EOS that ended a request included).",
            labels=["model_name", "adapter"],
        )  # fmt: skip
        for adapter, u in sorted(use.items()):
            for reason, n in u.finished.items():
                success.add_metric([base, adapter, reason], n)
            prompt.add_metric([base, adapter], u.prompt_tokens)
            generated.add_metric([base, adapter], u.generation_tokens)
        yield from (success, prompt, generated)
        for name, doc, h in zip(
            ("time_to_first_token_seconds", "inter_token_latency_seconds",
             "e2e_request_latency_seconds"),
            ("Time from a request's arrival to its first token.",
             "Time between two tokens of a request.", "Time from a request's arrival to its end."),
            hists, strict=True,
        ):  # fmt: skip
            family = HistogramMetricFamily(f"adaptr:{name}", doc, labels=["model_name"])
            family.add_metric([base], h.cumulative(), h.sum)
            yield family

    def _queue(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        base = self.server.base_key or ""
        scheduler = self.server.started_scheduler
        waiting, running = scheduler.queue() if scheduler is not None else ([], [])
        for name, doc, value in (
            ("num_requests_running", "Requests in the running batch.", len(running)),
            ("num_requests_waiting", "Requests waiting to join the batch.", len(waiting)),
        ):
            g = GaugeMetricFamily(f"adaptr:{name}", doc, labels=["model_name"])
            g.add_metric([base], value)
            yield g
        info = GaugeMetricFamily(
            "adaptr:lora_requests_info",
            "The adapters of the running and waiting requests (value: the time of the scrape).",
            labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
        )
        info.add_metric(
            [str(self.server.max_adapters), _refs(waiting), _refs(running)], time.time()
        )
        yield info

    def _residency(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        base = self.server.base_key or ""
        with self.server.lock:  # (the worker changes the slots under it)
            residents = self.server.slots.residents()
            counts = self.server.slots.counts
            loads, evictions = counts.loads, {"lru": counts.lru, "clash": counts.clash,
                                               "unload": counts.unload}  # fmt: skip
        for name, doc, value in (
            ("lora_resident_adapters", "Adapters in memory.", len(residents)),
            ("lora_pinned_adapters", "Pinned adapters (never evicted to make room).",
             sum(r.pinned for r in residents)),
            ("lora_resident_bytes", "Bytes of the resident adapters' weights.",
             sum(r.bytes for r in residents)),
        ):  # fmt: skip
            g = GaugeMetricFamily(f"adaptr:{name}", doc, labels=["model_name"])
            g.add_metric([base], value)
            yield g
        loaded = CounterMetricFamily(
            "adaptr:lora_loads", "Adapters loaded into memory.", labels=["model_name"]
        )
        loaded.add_metric([base], loads)
        yield loaded
        evicted = CounterMetricFamily(
            "adaptr:lora_evictions",
            "Adapters evicted: lru (room for another), clash (PEFT cannot hold it beside a "
            "newcomer), unload (asked for).",
            labels=["model_name", "reason"],
        )
        for reason, n in evictions.items():
            evicted.add_metric([base, reason], n)
        yield evicted


def _refs(requests: Iterable[Request]) -> str:
    """The adapters of ``requests``, comma-separated, in order of first appearance."""
    refs = dict.fromkeys(_adapter(r) for r in requests)
    return ",".join(r for r in refs if r)
