"""Iteration-level (continuous) batching: one worker thread owns the batch of an AdapterServer.

A request joins the running batch at the next decoding step (its prefill runs then, with
the other newcomers) and leaves the step it finishes: EOS, ``max_tokens``, a stop string,
or :meth:`Request.cancel` (a client gone). Each row keeps its own KV cache: the batch's
cache is the rows' caches left-padded to one length (a DynamicCache, attention mask zero on
the padding, each row's positions counted from its own first token), so a row's keys and
values are computed once, whatever joins or leaves around it; joining concatenates the
newcomers' prefill cache, leaving selects the remaining rows and trims the padding no row
needs any more. Per-row adapters go through the stacked LoRA (the rows' slots are set on
the shared :class:`~adaptr.serving.stacks.BatchState` before every forward, since rows
change between steps) and PEFT's fallback (its per-row names); adapters PEFT cannot mix
(:meth:`AdapterServer.partition`) never share the batch: a request that cannot join waits,
first in line, until the rows it clashes with have left. Sampling is per request
(temperature, top_p, and a seed that makes it reproducible alone or batched).

Text is decoded incrementally (:class:`Detokenizer`: a few tokens per step, never the
whole completion); text that could begin a stop string is held back until it cannot.
Log-probabilities, when a request asks, are those of the model's distribution (the raw
logits' log-softmax, before temperature and top_p): each generated token's with its
``logprobs`` most likely alternatives, and with ``prompt_logprobs`` each prompt token's
(computed in its prefill, the one step that sees the whole prompt; such prefills keep every
position's logits, so newcomers that score their prompts and those that do not join in
separate steps).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from adaptr.errors import AdaptrError

if TYPE_CHECKING:
    import torch

    from adaptr.serving.server import AdapterServer

log = logging.getLogger(__name__)

MAX_BATCH = 32
PROMPT_CHUNK = 256  # prompt positions scored at once (their log-softmax is float32 x vocabulary)


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model, and the ``top`` most likely tokens at its
    position (``(token id, log-probability)``, most likely first)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Sampling:
    """How a request picks its tokens: temperature 0 is greedy; ``seed`` makes sampling
    reproducible (the same tokens alone or in any batch)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


class Detokenizer:
    """Incremental decoding: each token's new text from the few tokens around it.

    Decodes ``ids[prefix:]`` and ``ids[prefix:read]`` and hands out the difference (the
    scheme of TGI and vLLM), so a token costs a decode of a short window, and text whose
    UTF-8 character is incomplete (``\\ufffd``) waits for the token that completes it.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """The text that ``token`` completes ("" while a character is incomplete)."""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before) :]
        return ""

    def flush(self) -> str:
        """What is left undecoded at the end (an incomplete character, as ``\\ufffd``)."""
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return now[len(before) :] if now.startswith(before) else ""


Event = tuple[str, Any]  # ("text", new text) | ("end", finish reason) | ("error", exception)


@dataclass(eq=False)
class Request:
    """One completion: its prompt's token ids, adapter ref (None: the bare base), limits.

    ``on_event`` (called on the worker thread) gets ``("text", piece)`` as text is ready,
    then ``("end", reason)`` (``"stop"``, ``"length"``, ``"cancelled"``) or ``("error", e)``.
    ``tokens`` are the generated ids (EOS left out), ``text`` the completion (cut before a
    stop string); :meth:`wait` blocks until it is finished.

    ``logprobs`` (k, or None: none) fills ``token_logprobs``: one :class:`TokenLogprob` per
    generated token, an EOS that ended it included, each with its k most likely
    alternatives; ``prompt_logprobs`` fills ``prompt_token_logprobs`` likewise for the
    prompt (None for its first token, which nothing predicts). ``max_tokens`` may be 0 with
    ``prompt_logprobs``: the prompt is scored and nothing generated.
    """

    prompt_ids: list[int]
    adapter: str | None = None
    max_tokens: int = 16
    sampling: Sampling = Sampling()
    stop: tuple[str, ...] = ()
    on_event: Callable[[Event], None] | None = None
    keep_logits: bool = False  # keep each step's logits (float32) in ``logits``
    logprobs: int | None = None
    prompt_logprobs: bool = False
    ignore_eos: bool = False  # generate max_tokens whatever comes (benchmarks)
    eos_tokens: frozenset[int] | None = None  # the tokens that end it (None: the model's EOS)
    min_tokens: int = 0  # before these many, no EOS is chosen and no stop string ends it
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of text handed out
    finish: str | None = None
    end_token: int | None = None  # the EOS that ended it (not in ``tokens``)
    error: BaseException | None = None
    cancelled: bool = False
    logits: list = field(default_factory=list)
    token_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_token_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def completion_tokens(self) -> int:
        """Tokens generated, an EOS that ended it included (as vLLM and OpenAI count them)."""
        return len(self.tokens) + (self.end_token is not None)

    def cancel(self) -> None:
        """Stop generating for it: dropped before it starts, else its row leaves at the next step."""
        self.cancelled = True

    def wait(self, timeout: float | None = None) -> Request:
        if not self.done.wait(timeout):
            raise TimeoutError(f"the request did not finish within {timeout:g} s")
        if self.error is not None:
            raise self.error
        return self

    def _emit(self, kind: str, value: Any) -> None:
        if self.on_event is not None:
            try:
                self.on_event((kind, value))
            except Exception:  # a listener's failure is not the batch's
                log.exception("a request's listener failed")


@dataclass(eq=False)
class Row:
    """A request in the batch, with what its decoding needs."""

    request: Request
    slot: int = 0  # its adapter's slot in the stacks (0: none there)
    peft_name: str = ""  # its adapter's name for PEFT's fallback (BASE: none)
    detok: Detokenizer | None = None
    generator: torch.Generator | None = None
    next_token: int = 0  # sampled, not yet fed to the model


@dataclass
class Batch:
    """The running batch: its rows, their left-padded KV cache and attention mask
    (``[rows, length]``, 0 on padding), and the stacks' weights gathered for these rows."""

    rows: list[Row] = field(default_factory=list)
    cache: Any = None  # a transformers DynamicCache, batch-first
    mask: torch.Tensor | None = None
    gathered: dict = field(default_factory=dict)


_STOP = object()


class Scheduler:
    """The worker that owns batching for an :class:`AdapterServer` (until :meth:`close`).

    ``submitted``/``dropped`` count the requests queued and those dropped before starting
    (cancelled); ``current`` lists the running requests; ``most_rows``/``most_models`` are the
    largest batch so far and the most adapters (the base counting as one) in one batch.
    :meth:`hold` keeps queued requests from starting until :meth:`release` (tests use it to
    let a set of requests start together).
    """

    def __init__(self, server: AdapterServer, max_batch: int = MAX_BATCH):
        self.server = server
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

    def submit(self, request: Request) -> Request:
        with self._cv:
            if self._closing:
                raise AdaptrError("the server is shutting down")
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
        adapters = [r.request.adapter for r in self.batch.rows]
        scored: bool | None = None  # whether the newcomers score their prompts (see _prefill)
        width = rows_scored = 0
        mixing: dict[frozenset, bool] = {}
        for req in candidates:
            if not req.cancelled:
                if scored is not None and req.prompt_logprobs != scored:
                    break  # every position's logits for prompts that need them only: next step
                if req.prompt_logprobs:  # their logits: rows x longest prompt x vocabulary
                    width = max(width, len(req.prompt_ids))
                    if rows_scored and (rows_scored + 1) * width > self.score_budget:
                        break
                    rows_scored += 1
                mixed = adapters + [req.adapter]
                kinds = frozenset(mixed)  # (whether they mix depends on the set only)
                fits = mixing.get(kinds)
                if fits is None:
                    fits = mixing[kinds] = len(kinds - {None}) <= self.server.max_adapters and (
                        len(kinds) < 2 or len(self.server.partition(list(kinds), len(kinds))) == 1
                    )
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
        with server._lock:
            slots = self._slots(rows)
            if slots is None:
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
        for i, row in enumerate(rows):
            s = row.request.sampling
            row.detok = Detokenizer(tok)
            if s.temperature > 0:
                row.generator = torch.Generator(device=logits.device)
                if s.seed is None:
                    row.generator.seed()
                else:
                    row.generator.manual_seed(s.seed)
            row.slot = int(slots[i])
        self._merge(rows, cache, mask)
        self._sample(rows, logits, range(len(rows)))
        self.most_rows = max(self.most_rows, len(self.batch.rows))
        self.most_models = max(self.most_models, len({r.request.adapter for r in self.batch.rows}))

    def _slots(self, rows: list[Row]):
        """Load the adapters of the batch with ``rows`` (held: the server's lock); each new
        row's slot and PEFT name are set, every running row's refreshed. None (and the rows
        dealt with) when they cannot all be resident together."""
        server = self.server
        running = self.batch.rows
        everyone = running + rows
        try:
            slots, names = server._rows([r.request.adapter for r in everyone], len(everyone))
        except AdaptrError as e:
            if running:  # the batch's own adapters stay loaded
                server._rows([r.request.adapter for r in running], len(running))
            if len(rows) == 1 and not running:
                self._fail(rows[0].request, e)
                return None
            with self._cv:  # retried one at a time, once the batch has drained
                self.waiting.extendleft(reversed([r.request for r in rows]))
                self._alone_next = True
            return None
        for row, slot, name in zip(everyone, slots.tolist(), names, strict=True):
            row.slot, row.peft_name = slot, name
        return slots[len(running) :]

    def _forward(
        self, rows: list[Row], *, ids, mask, positions, cache, gathered=None, every_position=False
    ):
        """One forward of ``rows`` (held: the server's lock): their adapters set on the stacks
        and PEFT's layers; the last position's logits, in float32 (``every_position``: every
        position's, in the model's dtype)."""
        server = self.server
        server._state.set_rows(_tensor([r.slot for r in rows]), gathered)
        try:
            with server._fallback.rows([r.peft_name for r in rows]):
                out = server.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=positions,
                    use_cache=True,
                    **{self._cache_arg: cache},
                    logits_to_keep=0 if every_position else 1,
                )
        finally:
            server._state.set_rows(None)
        return out.logits if every_position else out.logits[:, -1].float()

    def _merge(self, rows: list[Row], cache, mask) -> None:
        """Append ``rows`` (their cache and mask) to the batch, both left-padded to one length."""
        import torch

        b = self.batch
        if not b.rows:
            b.rows, b.cache, b.mask, b.gathered = rows, cache, mask, {}
            self._order()
            return
        length = max(b.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(b.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, length), _pad_left(theirs.keys, length)])
            mine.values = torch.cat(
                [_pad_left(mine.values, length), _pad_left(theirs.values, length)]
            )
        b.mask = torch.cat([_pad_left(b.mask, length, dim=1), _pad_left(mask, length, dim=1)])
        b.rows = b.rows + rows
        b.gathered = {}
        self._order()

    def _order(self) -> None:
        """Rows of one adapter together (each block of rows reads its weights once)."""
        b = self.batch
        order = sorted(range(len(b.rows)), key=lambda i: b.rows[i].slot)
        if order != list(range(len(b.rows))):
            self._select(order)

    def _select(self, keep: list[int]) -> None:
        import torch

        b = self.batch
        index = torch.tensor(keep, dtype=torch.long, device=b.mask.device)
        b.rows = [b.rows[i] for i in keep]
        b.mask = b.mask.index_select(0, index)
        first = int(b.mask.any(0).long().argmax()) if keep else 0  # padding no row needs
        b.mask = b.mask[:, first:]
        for layer in b.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]
        b.gathered = {}

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
        self._select(keep)

    def _step(self) -> None:
        """One decoding step for every row: feed each its last token, sample the next."""
        import torch

        b = self.batch
        ids = torch.tensor([[r.next_token] for r in b.rows], device=b.mask.device)
        positions = b.mask.sum(1, keepdim=True)  # each row's own count of tokens so far
        b.mask = torch.cat([b.mask, b.mask.new_ones(len(b.rows), 1)], dim=1)
        with self.server._lock:
            logits = self._forward(
                b.rows, ids=ids, mask=b.mask, positions=positions, cache=b.cache,
                gathered=b.gathered,
            )  # fmt: skip
        self.steps += 1
        self._sample(b.rows, logits, range(len(b.rows)))
        if self.on_step is not None:
            self.on_step(self.steps)

    def _sample(self, rows: list[Row], logits, which) -> None:
        import torch

        choose = logits  # what tokens are chosen from (log-probabilities stay the model's)
        early = [i for i in which if len(rows[i].request.tokens) < rows[i].request.min_tokens]
        if early:
            choose = logits.clone()
            for i in early:
                choose[i, list(self._eos_of(rows[i].request))] = float("-inf")
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
        from adaptr.serving.openai.protocol import find_stop, held_back

        req = row.request
        if req.cancelled:
            self._end(req, "cancelled")
            return
        if token in self._eos_of(req) and not req.ignore_eos:
            req.end_token = token
            self._end(req, "stop", row)
            return
        req.tokens.append(token)
        row.next_token = token
        piece = row.detok.add(token)
        if piece:
            start = _unchecked(req)
            req.text += piece
            if req.stop and len(req.tokens) >= req.min_tokens:
                cut = find_stop(req.text[start:], req.stop)
                if cut is not None:
                    req.text = req.text[: start + cut]
                    self._end(req, "stop")
                    return
            upto = len(req.text) - held_back(req.text, req.stop)
            if upto > req.sent:
                req._emit("text", req.text[req.sent : upto])
                req.sent = upto
        if len(req.tokens) >= req.max_tokens:
            self._end(req, "length", row)

    def _eos_of(self, req: Request):
        return self.eos if req.eos_tokens is None else req.eos_tokens

    def _end(self, req: Request, reason: str, row: Row | None = None) -> None:
        if req.finish is not None:
            return
        if row is not None and row.detok is not None:
            start = _unchecked(req)
            req.text += row.detok.flush()
            if req.stop and len(req.tokens) >= req.min_tokens:
                from adaptr.serving.openai.protocol import find_stop

                cut = find_stop(req.text[start:], req.stop)
                if cut is not None:
                    req.text, reason = req.text[: start + cut], "stop"
        if req.sent < len(req.text):
            req._emit("text", req.text[req.sent :])
            req.sent = len(req.text)
        req.finish = reason
        req._emit("end", reason)
        req.done.set()

    def _fail(self, req: Request, error: BaseException) -> None:
        if req.finish is not None:
            return
        req.finish, req.error = "error", error
        req._emit("error", error)
        req.done.set()


def _unchecked(req: Request) -> int:
    """Where a stop string ending in text added next could begin: the text before was
    checked already (or not to be checked: before ``min_tokens``), but its last characters
    may start one."""
    return max(0, len(req.text) - max((len(s) for s in req.stop), default=1) + 1)


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


def _tensor(values: list[int]):
    import torch

    return torch.tensor(values, dtype=torch.long)


def _pad_left(t, length: int, dim: int = 2):
    """``t`` zero-padded on the left of ``dim`` to ``length``."""
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    import torch

    return torch.cat([t.new_zeros(shape), t], dim=dim)
