"""Iteration-level (continuous) batching: one worker thread owns the batch of an engine.

A request joins the running batch at the next decoding step (its prefill runs then, with
the other newcomers) and leaves the step it finishes: EOS, ``max_tokens``, a stop string,
or :meth:`Request.cancel` (a client gone). Each row keeps its own KV cache
(:mod:`adaptr.serving.batch`: the rows' caches left-padded to one length, each row's
positions counted from its own first token), so a row's keys and values are computed once,
whatever joins or leaves around it. Per-row adapters are the engine's: a request's ref is
resolved once (:meth:`Engine.resolve`, the first time the request is considered), its
batch's adapters are loaded and given slots (:meth:`Engine.assign`) and set for each
forward (:meth:`Engine.running`), since rows change between steps; adapters PEFT cannot mix
(:meth:`Engine.mixes`) never share the batch: a request that cannot join waits, first in
line, until the rows it clashes with have left. Sampling is per request (temperature,
top_p, and a seed that makes it reproducible alone or batched).

Text is decoded incrementally (:class:`~adaptr.serving.text.Detokenizer`: a few tokens per
step, never the whole completion); text that could begin a stop string is held back until
it cannot. Log-probabilities, when a request asks, are those of the model's distribution
(the raw logits' log-softmax, before temperature and top_p): each generated token's with
its ``logprobs`` most likely alternatives, and with ``prompt_logprobs`` each prompt token's
(computed in its prefill, the one step that sees the whole prompt; such prefills keep every
position's logits, so newcomers that score their prompts and those that do not join in
separate steps).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractContextManager, suppress
from typing import Any, Protocol

from adaptr.errors import AdaptrError
from adaptr.serving.batch import Batch, Row
from adaptr.serving.metrics import ServingStats
from adaptr.serving.requests import Request, ServedAdapter, TokenLogprob
from adaptr.serving.text import Detokenizer, find_stop, held_back, unchecked

log = logging.getLogger(__name__)

MAX_BATCH = 32
PROMPT_CHUNK = 256  # prompt positions scored at once (their log-softmax is float32 x vocabulary)


class Engine(Protocol):
    """What the scheduler needs of the model it batches for (:class:`AdapterServer` is one).

    ``lock`` is held around each prefill and decoding step (with :meth:`assign` and the
    forwards inside :meth:`running`).
    """

    model: Any  # a transformers causal LM
    tokenizer: Any
    lock: AbstractContextManager

    def resolve(self, ref: str | None) -> ServedAdapter | None:
        """The adapter ``ref`` names (None: the bare base); raises for one it cannot serve."""
        ...

    def mixes(self, adapters: Collection[ServedAdapter | None]) -> bool:
        """Whether rows on ``adapters`` can run in one batch."""
        ...

    def assign(self, adapters: Sequence[ServedAdapter | None]) -> tuple[list[int], list[str]]:
        """Load a batch's adapters (one per row): each row's slot and PEFT name; raises an
        AdaptrError when they cannot be resident together."""
        ...

    def running(
        self, slots: Sequence[int], names: Sequence[str], gathered: dict | None = None
    ) -> AbstractContextManager[None]:
        """Forwards inside run each row on its slot and PEFT name (of :meth:`assign`)."""
        ...


class Scheduler:
    """The worker that owns batching for an :class:`Engine` (until :meth:`close`); the
    server builds its one (:attr:`AdapterServer.scheduler`).

    ``submitted``/``dropped`` count the requests queued and those dropped before starting
    (cancelled); ``current`` lists the running requests; ``most_rows``/``most_models`` are the
    largest batch so far and the most adapters (the base counting as one) in one batch.
    :meth:`hold` keeps queued requests from starting until :meth:`release` (tests use it to
    let a set of requests start together).
    """

    def __init__(self, server: Engine, max_batch: int = MAX_BATCH):
        self.server = server  # the engine (an AdapterServer)
        self.max_batch = max_batch
        self.waiting: deque[Request] = deque()
        self.batch = Batch()
        self.submitted = self.dropped = 0
        self.most_rows = self.most_models = 0
        self.steps = 0  # decoding steps run
        # prompt positions one scoring prefill may keep the logits of (one prompt at least):
        # about 1 GiB of float32 logits at this vocabulary
        vocab = server.model.get_output_embeddings().weight.shape[0]
        self.score_budget = max(1, 2**28 // vocab)
        self.on_step: Callable[[int], None] | None = None  # called (worker thread) after each step
        self.stats: ServingStats = getattr(server, "stats", None) or ServingStats()  # (/metrics)
        self._cv = threading.Condition()
        self._held = False
        self._closing = False
        self._alone_next = False  # an adapter could not load beside others: retry it alone
        self._joining: list[Row] = []  # the rows being prefilled
        tok = server.tokenizer
        eos = server.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [] if eos is None else [eos]
        self.eos = set(eos) | ({tok.eos_token_id} if tok.eos_token_id is not None else set())
        import inspect

        params = inspect.signature(server.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"  # (renamed in 5.x)
        self.thread = threading.Thread(target=self._run, daemon=True, name="adaptr-scheduler")
        self.thread.start()

    # ------------------------------------------------------------------ API
    @property
    def current(self) -> list[Request]:
        return [r.request for r in self.batch.rows + self._joining]

    def queue(self) -> tuple[list[Request], list[Request]]:
        """The requests waiting and those running (being prefilled included), as of now."""
        with self._cv:
            waiting = list(self.waiting)
        # a row joining is in the batch and in _joining for a moment, a finished one until the
        # next step drops it: each running request once, unfinished
        return waiting, [r for r in dict.fromkeys(self.current) if r.finish is None]

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (it takes no more requests)."""
        return self._closing

    def submit(self, request: Request) -> Request:
        with self._cv:
            if self._closing:
                raise AdaptrError("the server is shutting down")
            self.stats.arrived(request)
            self.waiting.append(request)
            self.submitted += 1
            self._cv.notify_all()
        return request

    def hold(self) -> None:
        with self._cv:
            self._held = True

    def release(self) -> None:
        with self._cv:
            self._held = False
            self._cv.notify_all()

    def close(self, timeout: float | None = None) -> bool:
        """End the worker once the requests submitted before are done; whether it has ended."""
        with self._cv:
            self._closing = True
            self._held = False
            self._cv.notify_all()
        self.thread.join(timeout)
        return not self.thread.is_alive()

    # --------------------------------------------------------------- worker
    def _run(self) -> None:
        import torch

        with torch.no_grad():  # (not inference_mode: adapters PEFT loads here are used outside it)
            while True:
                with self._cv:
                    while not self.batch.rows and (self._held or not self.waiting):
                        if self._closing and not self.waiting:
                            return
                        self._cv.wait()
                    room = self.max_batch - len(self.batch.rows)
                    if self._alone_next:  # one at a time, once the batch has drained
                        room = 0 if self.batch.rows else 1
                    candidates = [] if self._held else list(self.waiting)[:room]
                try:
                    joining = self._take(candidates)
                    self._leave()
                    if joining:
                        self._join(joining)
                    self._leave()
                    if self.batch.rows:
                        self._step()
                except Exception as e:  # never let the worker die: every later request would hang
                    log.exception("the scheduler failed on a batch of %d", len(self.batch.rows))
                    for row in self.batch.rows:
                        self._fail(row.request, e)
                    self.batch = Batch()

    def _take(self, candidates: list[Request]) -> list[Request]:
        """Which of ``candidates`` (the head of the queue, in order) join now, taken off the
        queue; cancelled ones are dropped. Into a running batch, up to the first that PEFT
        cannot run beside it (that one waits, first in line, for the batch to drain: nothing
        overtakes it); a new batch takes every candidate that mixes with the first."""
        taken: list[Request] = []
        seen: list[Request] = []
        fresh = not self.batch.rows
        adapters = [r.request.served for r in self.batch.rows]
        scored: bool | None = None  # whether the newcomers score their prompts (see _prefill)
        width = rows_scored = 0
        mixing: dict[frozenset, bool] = {}
        for req in candidates:
            if not req.cancelled:
                with suppress(Exception):  # (a ref it cannot resolve: reported by _slots)
                    self._resolve(req)
                if scored is not None and req.prompt_logprobs != scored:
                    break  # every position's logits for prompts that need them only: next step
                if req.prompt_logprobs:  # their logits: rows x longest prompt x vocabulary
                    width = max(width, len(req.prompt_ids))
                    if rows_scored and (rows_scored + 1) * width > self.score_budget:
                        break
                    rows_scored += 1
                mixed = adapters + [req.served]
                kinds = frozenset(mixed)  # (whether they mix depends on the set only)
                fits = mixing.get(kinds)
                if fits is None:
                    fits = mixing[kinds] = self.server.mixes(kinds)
                if not fits and fresh:
                    continue
                if not fits:
                    break
                adapters = mixed
                scored = req.prompt_logprobs
                taken.append(req)
            seen.append(req)
        with self._cv:
            for req in seen:
                self.waiting.remove(req)  # only this thread takes from the queue
                if req.cancelled and req not in taken:
                    self.dropped += 1
                    self._end(req, "cancelled")
        if taken:
            self._alone_next = False
        return taken

    def _join(self, joining: list[Request]) -> None:
        """Prefill the newcomers (with their adapters), sample their first tokens, and merge
        their rows and caches into the batch. A newcomer whose adapter cannot be loaded
        beside the batch goes back to the head of the queue (or fails, if alone)."""
        rows = [Row(req) for req in joining]
        self._joining = rows
        try:
            self._prefill(rows)
        except Exception as e:  # they are in neither the queue nor the batch: fail them here
            for row in rows:
                self._fail(row.request, e)
            raise
        finally:
            self._joining = []

    def _prefill(self, rows: list[Row]) -> None:
        import torch

        server = self.server
        with server.lock:
            if not self._slots(rows):
                return
            tok = server.tokenizer
            enc = tok.pad({"input_ids": [r.request.prompt_ids for r in rows]}, return_tensors="pt")
            device = server.model.device
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            from transformers import DynamicCache

            cache = DynamicCache(config=server.model.config)
            echo = any(r.request.prompt_logprobs for r in rows)
            logits = self._forward(
                rows, ids=ids, mask=mask, positions=positions, cache=cache, every_position=echo
            )
        if echo:  # every position's logits: the prompt tokens' log-probabilities, then the last
            for i, row in enumerate(rows):
                if row.request.prompt_logprobs:
                    row.request.prompt_token_logprobs = _prompt_logprobs(
                        logits[i], row.request.prompt_ids, row.request.logprobs or 0
                    )
            logits = logits[:, -1].float()
        for row in rows:
            s = row.request.sampling
            row.detok = Detokenizer(tok)
            if s.temperature > 0:
                row.generator = torch.Generator(device=logits.device)
                if s.seed is None:
                    row.generator.seed()
                else:
                    row.generator.manual_seed(s.seed)
        self.batch.add(rows, cache, mask)
        self.stats.prefilled(r.request for r in rows)
        self._sample(rows, logits, range(len(rows)))
        self.stats.tokens(r.request for r in rows)
        self.most_rows = max(self.most_rows, len(self.batch.rows))
        self.most_models = max(self.most_models, len({r.request.served for r in self.batch.rows}))

    def _slots(self, rows: list[Row]) -> bool:
        """Load the adapters of the batch with ``rows`` (held: the server's lock); each new
        row's slot and PEFT name are set, every running row's refreshed. False (and the rows
        dealt with) when they cannot all be resident together."""
        server = self.server
        running = self.batch.rows
        everyone = running + rows
        try:
            for row in rows:
                self._resolve(row.request)
            slots, names = server.assign([r.request.served for r in everyone])
        except AdaptrError as e:
            if running:  # the batch's own adapters stay loaded
                server.assign([r.request.served for r in running])
            if len(rows) == 1 and not running:
                self._fail(rows[0].request, e)
                return False
            with self._cv:  # retried one at a time, once the batch has drained
                self.waiting.extendleft(reversed([r.request for r in rows]))
                self._alone_next = True
            return False
        for row, slot, name in zip(everyone, slots, names, strict=True):
            row.slot, row.peft_name = slot, name
        return True

    def _resolve(self, req: Request) -> None:
        """The request's adapter, resolved once for its whole life (raises when it cannot be:
        an unresolved request mixes with any batch, and fails as it is set up in one)."""
        if not req.resolved:
            req.served, req.resolved = self.server.resolve(req.adapter), True

    def _forward(
        self, rows: list[Row], *, ids, mask, positions, cache, gathered=None, every_position=False
    ):
        """One forward of ``rows`` (held: the server's lock): their adapters set on the stacks
        and PEFT's layers; the last position's logits, in float32 (``every_position``: every
        position's, in the model's dtype)."""
        server = self.server
        with server.running([r.slot for r in rows], [r.peft_name for r in rows], gathered):
            out = server.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{self._cache_arg: cache},
                logits_to_keep=0 if every_position else 1,
            )
        return out.logits if every_position else out.logits[:, -1].float()

    def _leave(self) -> None:
        """Rows whose request is finished or cancelled leave the batch."""
        b = self.batch
        keep = []
        for i, row in enumerate(b.rows):
            if row.request.cancelled and row.request.finish is None:
                self._end(row.request, "cancelled")
            if row.request.finish is None:
                keep.append(i)
        if len(keep) == len(b.rows):
            return
        if not keep:
            self.batch = Batch()
            return
        b.select(keep)

    def _step(self) -> None:
        """One decoding step for every row: feed each its last token, sample the next."""
        import torch

        b = self.batch
        ids = torch.tensor([[r.next_token] for r in b.rows], device=b.mask.device)
        positions = b.mask.sum(1, keepdim=True)  # each row's own count of tokens so far
        b.mask = torch.cat([b.mask, b.mask.new_ones(len(b.rows), 1)], dim=1)
        with self.server.lock:
            logits = self._forward(
                b.rows, ids=ids, mask=b.mask, positions=positions, cache=b.cache,
                gathered=b.gathered,
            )  # fmt: skip
        self.steps += 1
        self._sample(b.rows, logits, range(len(b.rows)))
        self.stats.tokens(r.request for r in b.rows)
        if self.on_step is not None:
            self.on_step(self.steps)

    def _sample(self, rows: list[Row], logits, which) -> None:
        import torch

        choose = logits  # what tokens are chosen from (log-probabilities stay the model's)
        early = [i for i in which if len(rows[i].request.tokens) < rows[i].request.min_tokens]
        guided = [i for i in which if rows[i].request.constraint is not None]
        if early or guided:
            choose = logits.clone()
        if guided:  # structured output: only what each row's grammar allows next
            from adaptr.serving.constrain import mask_rows

            mask_rows(choose, logits, [
                (i, rows[i].request.constraint, self._eos_of(rows[i].request)) for i in guided
            ])  # fmt: skip
        if early:
            for i in early:
                ends = [t for t in self._eos_of(rows[i].request) if 0 <= t < choose.shape[-1]]
                choose[i, ends] = float("-inf")
        greedy = choose.argmax(-1).tolist()
        for i in which:
            row, s = rows[i], rows[i].request.sampling
            if row.request.max_tokens == 0:  # the prompt only (its log-probabilities)
                self._end(row.request, "length")
                continue
            if row.request.keep_logits:
                row.request.logits.append(logits[i].clone())
            if s.temperature > 0:
                probs = torch.softmax(choose[i] / s.temperature, -1)
                if s.top_p < 1:
                    sorted_p, idx = probs.sort(descending=True)
                    drop = sorted_p.cumsum(0) - sorted_p >= s.top_p  # keeps at least the first
                    probs = probs.index_put((idx[drop],), torch.zeros(()))
                token = int(torch.multinomial(probs, 1, generator=row.generator))
            else:
                token = greedy[i]
            k = row.request.logprobs
            if k is not None:  # before _accept: an EOS that ends the request has its entry too
                logprobs = torch.log_softmax(logits[i], -1)
                row.request.token_logprobs.append(
                    TokenLogprob(token, float(logprobs[token]), _top(logprobs, k))
                )
            self._accept(row, token)

    def _accept(self, row: Row, token: int) -> None:
        """A row's new token: its text handed out (held back while it could begin a stop
        string), and its end when it is EOS, the last allowed, or ends in a stop string."""
        req = row.request
        if req.cancelled:
            self._end(req, "cancelled")
            return
        if token in self._eos_of(req) and not req.ignore_eos:
            req.end_token = token
            self._end(req, "stop", row)
            return
        guide = req.constraint
        if guide is not None and not guide.accept(token):
            self._fail(req, guide.failure(token))  # (its parser's limits hit: a 400)
            return
        req.tokens.append(token)
        row.next_token = token
        piece = row.detok.add(token)
        if piece:
            start = unchecked(req.text, req.stop)
            req.text += piece
            if req.stop and len(req.tokens) >= req.min_tokens:
                cut = find_stop(req.text[start:], req.stop)
                if cut is not None:
                    req.text = req.text[: start + cut]
                    self._end(req, "stop")
                    return
            upto = len(req.text) - held_back(req.text, req.stop)
            if upto > req.sent:
                req.emit("text", req.text[req.sent : upto])
                req.sent = upto
        if guide is not None and guide.finished:  # the grammar is complete: nothing may follow
            self._end(req, "stop", row)
            return
        if len(req.tokens) >= req.max_tokens:
            self._end(req, "length", row)

    def _eos_of(self, req: Request):
        return self.eos if req.eos_tokens is None else req.eos_tokens

    def _end(self, req: Request, reason: str, row: Row | None = None) -> None:
        if req.finish is not None:
            return
        if row is not None and row.detok is not None:
            start = unchecked(req.text, req.stop)
            req.text += row.detok.flush()
            if req.stop and len(req.tokens) >= req.min_tokens:
                cut = find_stop(req.text[start:], req.stop)
                if cut is not None:
                    req.text, reason = req.text[: start + cut], "stop"
        if req.sent < len(req.text):
            req.emit("text", req.text[req.sent :])
            req.sent = len(req.text)
        req.finish = reason
        self.stats.finished(req)
        req.emit("end", reason)
        req.done.set()

    def _fail(self, req: Request, error: BaseException) -> None:
        if req.finish is not None:
            return
        req.finish, req.error = "error", error
        self.stats.finished(req)
        req.emit("error", error)
        req.done.set()


def _top(logprobs, k: int) -> tuple[tuple[int, float], ...]:
    """The ``k`` most likely tokens of one position's log-probabilities."""
    if k <= 0:
        return ()
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]))
    return tuple(zip(ids.tolist(), values.tolist(), strict=True))


def _prompt_logprobs(logits, prompt: list[int], k: int) -> list[TokenLogprob | None]:
    """Each prompt token's log-probability given the tokens before it, from a prefill row's
    logits (``[width, vocab]``, the prompt left-padded to ``width``); None for the first."""
    import torch

    n, width = len(prompt), logits.shape[0]
    out: list[TokenLogprob | None] = [None]
    for start in range(1, n, PROMPT_CHUNK):  # a chunk of positions at a time in float32
        stop = min(n, start + PROMPT_CHUNK)
        rows = logits[width - n + start - 1 : width - n + stop - 1]  # predict start..stop-1
        logprobs = torch.log_softmax(rows.float(), -1)
        targets = torch.tensor(prompt[start:stop], device=logprobs.device)
        chosen = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
        for j, (token, value) in enumerate(zip(prompt[start:stop], chosen, strict=True)):
            out.append(TokenLogprob(token, value, _top(logprobs[j], k)))
    return out
