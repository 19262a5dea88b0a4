"""Multi-adapter serving in one process: one base, many LoRA adapters, one adapter per row.

PEFT's mixed batches (``adapter_names=``) loop over the adapters of a batch in every
layer, and ``set_adapter`` walks every module. Here each targeted linear layer keeps the
resident adapters stacked (:mod:`adaptr.serving.stacks`; which adapters are resident, in
which slot, and which are evicted first is :mod:`adaptr.serving.slots`'): once per batch a
layer gathers the A and B of each block of rows sharing an adapter and adds them with two
batched matmuls in place on the layer's output, whatever the number of adapters (the BGMV
scheme of Punica and S-LoRA). Slot 0 is all zeros: the bare base.

Stacked: LoRA on ``nn.Linear`` (any rank up to ``max_rank``, alpha, rsLoRA, target set).
Served by PEFT's own path instead (:mod:`adaptr.serving.peft_fallback`, same base, same batch):
DoRA and the other LoRA variants, ``lora_bias``, ``modules_to_save``, trainable tokens,
LoRA on embeddings or other non-linear layers, ranks above ``max_rank``. What PEFT cannot
mix in one batch runs in batches of its own (:meth:`AdapterServer.partition`; the rules are
:mod:`adaptr.serving.peft_fallback`'s). Refused: PEFT methods other than LoRA (IA3, LoHa, prompt
tuning, …), activated LoRA, and adapters PEFT loads by changing the base itself (KaSA's
truncated weights, ``layer_replication``'s extra layers, PiSSA-like inits saved without
conversion), whatever else is resident: serve those with ``adaptr.inference``.

The server is the engine of its one :class:`~adaptr.serving.scheduler.Scheduler`: it
implements :class:`~adaptr.serving.scheduler.Engine` (:meth:`~AdapterServer.resolve`,
:meth:`~AdapterServer.mixes`, :meth:`~AdapterServer.assign`, :meth:`~AdapterServer.running`
and its ``lock``).
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Iterator, Sequence
from contextlib import closing, contextmanager
from itertools import combinations
from typing import Any

from adaptr.errors import AdaptrError, InvalidInputError, NotFoundError
from adaptr.registry import Registry
from adaptr.serving.constrain import Grammar, ResponseFormat, compile_format, parse_response_format
from adaptr.serving.metrics import ServingStats
from adaptr.serving.peft_fallback import BASE, PeftFallback, Traits, clash, partition
from adaptr.serving.requests import Request, Sampling, ServedAdapter
from adaptr.serving.scheduler import Scheduler
from adaptr.serving.slots import Slots
from adaptr.serving.stacks import ROW_AWARE_KWARGS, BatchState

# generate() arguments the scheduler takes (continuous batching); others run model.generate
SCHEDULED_KWARGS = frozenset(
    {"max_new_tokens", "do_sample", "temperature", "top_p", "seed", "eos_token_id",
     "response_format"}
)  # fmt: skip


class AdapterInUse(AdaptrError):
    """An adapter that running requests use cannot be unloaded now (HTTP: a 409)."""


class AdapterServer:
    """Serve many registry adapters on one base model, a different adapter per prompt.

    ``max_adapters`` bounds the number of resident adapters and ``max_memory_mb`` (optional)
    the size of their weights; past either, the least recently used are evicted. A mixed
    batch keeps its gathered A/B (per block of rows on one adapter) for all its decoding
    steps up to ``gather_budget_mb`` (per batch), and re-gathers them on every call past it.
    Calls are serialised by ``lock``, so the server is safe to share between threads.

    ``slots`` (:class:`~adaptr.serving.slots.Slots`) holds the resident adapters,
    ``fallback`` PEFT's path, ``state`` what the stacks of every layer share of the batch.
    """

    def __init__(
        self,
        registry: Registry,
        base: str | None = None,
        *,
        max_adapters: int = 16,
        max_rank: int = 64,
        max_memory_mb: float | None = None,
        gather_budget_mb: float = 256,
        dtype: str = "auto",
    ):
        from adaptr.bases import load_base_model

        self.registry = registry
        self.max_adapters = max_adapters
        self.max_rank = max_rank
        self.max_memory = None if max_memory_mb is None else max_memory_mb * 2**20
        self.base_key = base
        path = registry.base_path(base) if base else None
        if path is None:
            raise InvalidInputError(
                "AdapterServer needs a base: a registered base name or a model folder"
            )
        self.model, self.tokenizer = load_base_model(path, dtype)
        self.model.requires_grad_(False)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"
        self.lock = threading.RLock()
        self.default: str | None = None
        self.state = BatchState(gather_budget_mb * 2**20)
        self.fallback = PeftFallback(self.model, registry, path)  # slot 0 in the stacks: PEFT's
        self.slots = Slots(
            self.model, registry, self.fallback, self.state,
            max_adapters=max_adapters, max_rank=max_rank, max_memory=self.max_memory,
        )  # fmt: skip
        self._templates: dict[str | None, str | None] = {}  # version ref -> its chat template
        self._scheduler: Scheduler | None = None
        self.stats = ServingStats()  # what the scheduler measured (adaptr serve's /metrics)

    @property
    def scheduler(self) -> Scheduler:
        """The one :class:`~adaptr.serving.scheduler.Scheduler` of this server: :meth:`generate`,
        :meth:`stream`, :meth:`chat`, the HTTP app and evaluation submit to it (started on
        first use, and again after it was closed; its worker thread is a daemon). A closed one
        finishes what it took before the next starts: two workers never share the slots."""
        scheduler = self._scheduler  # (no lock: the worker holds it while it runs a step)
        if scheduler is not None and not scheduler.closed:
            return scheduler
        if scheduler is not None and threading.current_thread() is not scheduler.thread:
            scheduler.close()  # (outside the lock: its worker needs it to drain)
        with self.lock:
            if self._scheduler is None or self._scheduler.closed:
                self._scheduler = Scheduler(self)
            return self._scheduler

    @property
    def started_scheduler(self) -> Scheduler | None:
        """:attr:`scheduler` if one was started (it may be closed), without starting one."""
        return self._scheduler

    def _request(self, prompt: str, adapter: str | None, kwargs: dict, **extra: Any) -> Request:
        unknown = set(kwargs) - SCHEDULED_KWARGS
        if unknown:
            raise InvalidInputError(
                f"{', '.join(sorted(unknown))}: not taken by the scheduler (it takes "
                f"{', '.join(sorted(SCHEDULED_KWARGS))}); use generate() for the others"
            )
        temperature = float(kwargs.get("temperature") or 1.0) if kwargs.get("do_sample") else 0.0
        sampling = Sampling(temperature, float(kwargs.get("top_p") or 1.0), kwargs.get("seed"))
        eos = kwargs.get("eos_token_id")
        if eos is not None:
            extra["eos_tokens"] = frozenset([eos] if isinstance(eos, int) else eos)
        grammar = self._grammar(kwargs.get("response_format"))
        if grammar is not None:  # structured output (adaptr.serving.constrain)
            extra["constraint"] = grammar.guide()
        ids = self.tokenizer(prompt).input_ids
        return Request(ids, adapter, int(kwargs.get("max_new_tokens", 32)), sampling, **extra)

    def _grammar(self, value: Any) -> Grammar | None:
        """A ``response_format`` (OpenAI's dict, or a :class:`ResponseFormat`) compiled
        (None: text)."""
        fmt = value if isinstance(value, ResponseFormat) else parse_response_format(value)
        if fmt is None:
            return None
        vocab = self.model.get_output_embeddings().weight.shape[0]
        return compile_format(self.tokenizer, vocab, fmt)

    def enqueue(self, requests: Sequence[Request]) -> None:
        """Submit ``requests`` to :attr:`scheduler`; those a scheduler closing meanwhile
        refused go, once, to the one that follows it (the ones it took, it finishes)."""
        done = 0
        for attempt in range(2):
            scheduler = self.scheduler
            try:
                for request in requests[done:]:
                    scheduler.submit(request)
                    done += 1
                return
            except AdaptrError:
                if attempt or not scheduler.closed:
                    raise

    def submit(self, prompt: str, adapter: str | None = None, **kwargs: Any) -> Request:
        """Queue one completion of ``prompt`` with ``adapter`` (None: the default adapter of
        :meth:`switch`, else the base) on :attr:`scheduler` and return its
        :class:`~adaptr.serving.requests.Request` at once (``wait()``, ``cancel()``, ``text``,
        ``tokens``); ``kwargs``: ``max_new_tokens`` (32), ``do_sample``, ``temperature``,
        ``top_p``, ``seed``, ``eos_token_id`` (the tokens that end it, instead of the model's),
        ``response_format`` (JSON output: see :meth:`generate`)."""
        kwargs.setdefault("max_new_tokens", 32)
        request = self._request(prompt, adapter or self.default, kwargs)
        self.enqueue([request])
        return request

    # ------------------------------------------------------------- adapters
    def resident(self) -> list[str]:
        """Refs of the adapters in memory, least recently used first."""
        return self.slots.resident()

    def load(self, ref: str) -> int:
        """Make ``ref`` resident (evicting the least recently used if full); returns its slot."""
        version = self.registry.get(ref)
        with self.lock:
            return self.slots.load(version, self._busy())

    def served_by_peft(self) -> list[str]:
        """Refs of the resident adapters that PEFT's path serves (the stacks cannot)."""
        return self.slots.served_by_peft()

    def pin(self, ref: str) -> str:
        """Load ``ref`` (an adapter of this base) and keep it resident until :meth:`unload`
        or :meth:`unpin`: never evicted to make room; returns its exact ref. Pins count
        against ``max_adapters`` (one more is an InvalidInputError) and ``max_memory_mb``."""
        version = self.registry.get(ref)
        if version.base != self.base_key:
            raise InvalidInputError(f"{version.ref} is an adapter of base {version.base}, not of {self.base_key}")
        with self.lock:
            self.slots.pin(version, self._busy())
        return version.ref

    def unpin(self, ref: str) -> bool:
        """Let ``ref`` be evicted again (it stays resident until then); whether it was pinned."""
        version = self.registry.get(ref)
        with self.lock:
            return self.slots.unpin(version.ref)

    def unload(self, ref: str) -> str:
        """Unpin and evict ``ref`` now (its exact ref); a later request loads it again.
        NotFoundError when it is not resident; :class:`AdapterInUse` (nothing changed) while
        running requests use it: unload it once they finish."""
        version = self.registry.get(ref)
        with self.lock:  # (the worker holds it for each step: no row starts on it meanwhile)
            if self.slots.slot_of(version.ref) is None:
                missing = NotFoundError(f"{version.ref} is not loaded (resident: {', '.join(self.resident()) or 'none'})")
                missing.code = "adapter_not_loaded"
                raise missing
            if version.ref in self._busy():
                raise AdapterInUse(f"running requests use {version.ref}: unload it once they finish")
            self.slots.evict(version.ref, "unload")
        return version.ref

    def memory(self) -> int:
        """Bytes of the resident adapters' weights (in the serving dtype)."""
        return self.slots.memory()

    def switch(self, ref: str | None) -> None:
        """Set the default adapter for prompts that name none (``None``: the bare base)."""
        if ref is not None:
            version = self.registry.get(ref)
            with self.lock:
                self.slots.load(version, self._busy())
            ref = version.ref
        self.default = ref

    def _busy(self) -> frozenset[str]:
        """Refs the running rows use (hold ``lock``): never evicted under them."""
        scheduler = self._scheduler
        return frozenset(
            r.served.ref
            for r in (scheduler.current if scheduler else [])
            if r.served is not None and r.finish is None
        )

    # ------------------------------------------------- the scheduler's engine
    def resolve(self, ref: str | None) -> ServedAdapter | None:
        """The adapter version ``ref`` names, as it is served (None: the bare base); raises
        an AdaptrError for an unknown ref or an adapter this server refuses."""
        if ref is None:
            return None
        version = self.registry.get(ref)
        with self.lock:  # (traits match names against the model: not while another loads)
            return ServedAdapter(version.ref, version, self.fallback.traits(version))

    def mixes(self, adapters: Collection[ServedAdapter | None]) -> bool:
        """Whether rows on ``adapters`` (None: the base) can run in one batch: no more than
        ``max_adapters`` of them, and all of them one batch of :meth:`partition`."""
        kinds = list(dict.fromkeys(adapters))
        many = sum(a is not None for a in kinds)
        # (one adapter alone is always tried: one that cannot be loaded fails its own requests)
        if many > 1 and many > self._room({a.ref for a in kinds if a is not None}):
            return False
        return len(kinds) < 2 or len(partition(kinds, {a: a and a.traits for a in kinds})) == 1

    def _room(self, refs: set[str]) -> int:
        """How many adapters one batch holding ``refs`` may have: max_adapters less the pinned
        adapters outside it (they keep their slots)."""
        with self.lock:  # (an RLock: pins change under it)
            pinned = set(self.slots.pinned())
        return self.max_adapters - len(pinned - refs)

    def assign(self, adapters: Sequence[ServedAdapter | None]) -> tuple[list[int], list[str]]:
        """Load the adapters of a batch (``adapters[i]``: row i's; None: the base) and return
        each row's slot in the stacks (0: none) and its adapter's name for PEFT (BASE: none).
        Raises InvalidInputError when they cannot be resident or run together."""
        distinct = [a for a in dict.fromkeys(adapters) if a is not None]
        if len(distinct) > self._room({a.ref for a in distinct}):
            raise InvalidInputError(
                f"{len(distinct)} different adapters in one batch, more than the "
                f"{self._room({a.ref for a in distinct})} slots that max_adapters={self.max_adapters} "
                "leaves beside the pinned adapters"
            )
        if len(set(adapters)) > 1:
            traits = [a.traits for a in distinct]
            why = next((f"{t.ref}: {t.alone}" for t in traits if t.alone), None)
            why = why or next(filter(None, (clash(a, b) for a, b in combinations(traits, 2))), None)
            if why:
                raise InvalidInputError(
                    f"this batch mixes adapters that PEFT must run apart ({why}): run the "
                    "batches of partition() one by one, as generate() does"
                )
        keep = frozenset(a.ref for a in distinct)
        with self.lock:
            slots = {a: self.slots.load(a.version, keep) for a in distinct}
            if any(self.slots.slot_of(a.ref) != slot for a, slot in slots.items()):
                limit = f"max_adapters={self.max_adapters}" + (
                    "" if self.max_memory is None else f", max_memory_mb={self.max_memory / 2**20:g}"
                )
                raise InvalidInputError(
                    f"the adapters of this batch do not fit beside the pinned ones ({limit}) "
                    "together; send them in smaller batches or raise the limit"
                )
        rows = [0 if a is None else slots[a] for a in adapters]
        names = [BASE if a is None or slots[a] else a.ref for a in adapters]
        return rows, names

    @contextmanager
    def running(
        self, slots: Sequence[int], names: Sequence[str], gathered: dict | None = None
    ) -> Iterator[None]:
        """The model's forwards inside run row i with ``slots[i]`` in the stacks and
        ``names[i]`` in PEFT's layers (of :meth:`assign`); ``gathered``: the stacks' weights
        kept for these rows (filled in by the first forward). Hold ``lock`` around it."""
        import torch

        self.state.set_rows(torch.tensor(list(slots), dtype=torch.long), gathered)
        try:
            with self.fallback.rows(list(names)):
                yield
        finally:
            self.state.set_rows(None)

    # ----------------------------------------------------------- generation
    def _per_row(self, adapters: Sequence[str | None] | None, n: int) -> Sequence[str | None]:
        """``adapters``, one per row (the default adapter for every row when None)."""
        if adapters is None:
            return [self.default] * n
        if len(adapters) != n:
            raise InvalidInputError(
                f"{len(adapters)} adapter(s) for {n} prompt(s): give one per prompt (None for the base)"
            )
        return adapters

    def partition(self, adapters: Sequence[str | None] | None, n: int) -> list[list[int]]:
        """The rows of a batch as the batches it must run as, in order of first appearance:
        an adapter PEFT cannot mix with others (DoRA, …) gets its rows apart, and two that
        PEFT cannot hold at once (one module changed two ways) go to different batches;
        everything else (the base's rows too) runs together in the first."""
        adapters = self._per_row(adapters, n)
        if len(set(adapters)) < 2:
            return [list(range(n))]
        traits = {a: self._traits(a) for a in set(adapters) if a is not None}
        return partition(adapters, traits)

    def _traits(self, ref: str) -> Traits | None:
        try:
            served = self.resolve(ref)
        except AdaptrError:  # an unknown or refused ref: the batch itself reports it
            return None
        return served.traits if served is not None else None

    @contextmanager
    def batch(
        self, adapters: Sequence[str | None] | None, n: int, *, grouped: bool = False
    ) -> Iterator[list[int]]:
        """Hold the server for one batch of ``n`` rows whose adapters are ``adapters``.

        Yields the order the rows must take: with ``grouped`` the rows of each adapter are
        brought together (each block of rows then reads its adapter's weights once), else
        the order given. The rows must make one batch of :meth:`partition`.
        """
        import torch

        with self.lock:
            adapters = self._per_row(adapters, n)
            distinct = {a for a in adapters if a is not None}
            if len(distinct) > self.max_adapters:
                raise InvalidInputError(
                    f"{len(distinct)} different adapters in one batch, more than max_adapters={self.max_adapters}"
                )
            served = {a: self.resolve(a) for a in dict.fromkeys(adapters)}  # once per batch
            slots, names = self.assign([served[a] for a in adapters])
            order = list(range(n))
            if grouped:
                order = torch.tensor(slots, dtype=torch.long).argsort(stable=True).tolist()
            running = self.running([slots[i] for i in order], [names[i] for i in order])
            with torch.no_grad(), running:
                yield order

    def _batches(self, parts: list[list[int]], adapters, grouped: bool) -> Iterator[list[int]]:
        """Runs the batches ``parts`` (of :meth:`partition`): yields each one's rows, in the
        order to take."""
        for part in parts:
            sub = None if adapters is None else [adapters[i] for i in part]
            with self.batch(sub, len(part), grouped=grouped) as order:
                yield [part[i] for i in order]

    def logits(self, prompts: Sequence[str], adapters: Sequence[str | None] | None = None):
        """Logits of a left-padded batch, and its attention mask (for checks against PEFT)."""
        enc = self.tokenizer(list(prompts), return_tensors="pt", padding=True)
        logits = None
        parts = self.partition(adapters, len(prompts))
        with closing(self._batches(parts, adapters, grouped=True)) as batches:
            for take in batches:
                part = self.model(**{key: value[take] for key, value in enc.items()}).logits
                if logits is None:
                    logits = part.new_empty(len(prompts), *part.shape[1:])
                logits[take] = part
        return logits, enc["attention_mask"]

    def generate(
        self, prompts: Sequence[str], adapters: Sequence[str | None] | None = None, **kwargs: Any
    ) -> list[str]:
        """Complete each prompt with its own adapter (or None: the base), in one batch.

        The rows run grouped by adapter, unless ``kwargs`` hold something that sees rows by
        position (a streamer, ``prefix_allowed_tokens_fn``, custom processors or criteria).
        Returns each prompt's sequences (``num_return_sequences``) in the prompts' order.

        With only ``max_new_tokens``, ``do_sample``, ``temperature``, ``top_p``, ``seed``,
        ``eos_token_id`` and ``response_format`` the prompts go through :attr:`scheduler`
        (continuous batching, shared with every other caller); other ``model.generate``
        arguments (beams, several sequences, a streamer, processors, …) run one static batch
        per :meth:`partition` part.

        ``response_format`` (structured output, :mod:`adaptr.serving.constrain`): OpenAI's
        ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {"name": ...,
        "schema": {...}}}``, or a :class:`~adaptr.serving.constrain.ResponseFormat`; each
        answer is then JSON of that schema (unless ``max_new_tokens`` cut it short).
        """
        kwargs.setdefault("max_new_tokens", 32)
        kwargs.setdefault("do_sample", False)
        if kwargs.get("response_format") is not None and not SCHEDULED_KWARGS.issuperset(kwargs):
            raise InvalidInputError(
                "response_format runs through the scheduler: it takes "
                f"{', '.join(sorted(SCHEDULED_KWARGS))} only"
            )
        kwargs = {k: v for k, v in kwargs.items() if k != "response_format" or v is not None}
        if SCHEDULED_KWARGS.issuperset(kwargs):
            adapters = self._per_row(adapters, len(prompts))
            requests = [self._request(p, a, kwargs) for p, a in zip(prompts, adapters, strict=True)]
            self.enqueue(requests)
            try:
                return [r.wait().text for r in requests]
            finally:
                for r in requests:
                    r.cancel()  # (the others, when one failed)
        enc = self.tokenizer(list(prompts), return_tensors="pt", padding=True)
        n, width = len(prompts), enc["input_ids"].shape[1]
        grouped = not ROW_AWARE_KWARGS.intersection(kwargs)
        parts = self.partition(adapters, n)
        if not grouped and len(parts) > 1:
            raise InvalidInputError(
                f"{', '.join(sorted(ROW_AWARE_KWARGS.intersection(kwargs)))} cannot follow a batch "
                "whose adapters PEFT must run in separate batches (DoRA, …): send them apart"
            )
        texts: list[list[str]] = [[] for _ in range(n)]
        with closing(self._batches(parts, adapters, grouped)) as batches:
            for take in batches:
                out = self.model.generate(
                    **{key: value[take] for key, value in enc.items()},
                    pad_token_id=self.tokenizer.pad_token_id,
                    **kwargs,
                )
                # each prompt's sequences (beams, samples) are consecutive rows
                for i, seqs in zip(take, out.view(len(take), -1, out.shape[-1]), strict=True):
                    texts[i] = [
                        self.tokenizer.decode(s[width:], skip_special_tokens=True) for s in seqs
                    ]
        return [t for seqs in texts for t in seqs]

    def stream(self, prompt: str, adapter: str | None = None, **kwargs: Any) -> Iterator[str]:
        """Yield the completion of one prompt piece by piece as tokens are generated (through
        the scheduler, decoded incrementally, with the arguments it takes; see :meth:`generate`)."""
        import queue

        from transformers import TextIteratorStreamer

        if SCHEDULED_KWARGS.issuperset(kwargs):
            events: queue.Queue = queue.Queue()
            req = self._request(prompt, adapter or self.default, kwargs, on_event=events.put)
            self.enqueue([req])
            try:
                while True:
                    kind, value = events.get()
                    if kind == "text":
                        yield value
                    elif kind == "error":
                        raise value
                    else:
                        return
            finally:
                req.cancel()  # the caller stopped reading: its row leaves

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def work() -> None:
            try:
                self.generate([prompt], [adapter] if adapter else None, streamer=streamer, **kwargs)
            except BaseException as e:  # re-raised in the caller's thread
                failure.append(e)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        yield from (piece for piece in streamer if piece)
        thread.join()
        if failure:
            raise failure[0]

    def chat_template(self, adapter: str | None) -> str:
        """The chat template ``adapter`` (a ref; None: the bare base) was trained with: the
        one stored with the version, else the base tokenizer's, else the model family's
        (:func:`adaptr.inference.chat_template`). InvalidInputError when there is none."""
        from adaptr.inference import NO_TEMPLATE, chat_template

        version = self.registry.get(adapter) if adapter is not None else None
        key = version.ref if version is not None else None
        if key not in self._templates:  # versions are immutable: once per version
            found = chat_template(
                self.registry, [version] if version else [], self.tokenizer, self.model.config
            )
            self._templates[key] = found
        found = self._templates[key]
        if found is None:
            what = version.ref if version is not None else f"the base {self.base_key}"
            raise InvalidInputError(
                f"{what} {NO_TEMPLATE}: send a completion with the prompt as text, or add the "
                "adapter again from a folder holding the chat_template.jinja it was trained with"
            )
        return found

    def render_chat(self, messages: list[dict], adapter: str | None) -> str:
        """``messages`` rendered for a reply by ``adapter``'s chat template (:meth:`chat_template`)."""
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.chat_template(adapter),
            tokenize=False,
            add_generation_prompt=True,
        )

    def chat(
        self,
        conversations: Sequence[list[dict[str, str]]],
        adapters: Sequence[str | None] | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """Like :meth:`generate` for chat messages, each rendered with the chat template its
        own adapter was trained with (:meth:`chat_template`)."""
        adapters = self._per_row(adapters, len(conversations))
        prompts = [self.render_chat(c, a) for c, a in zip(conversations, adapters, strict=True)]
        return self.generate(prompts, adapters, **kwargs)
