"""Multi-adapter serving in one process: one base, many LoRA adapters, one adapter per row.

PEFT's mixed batches (``adapter_names=``) loop over the adapters of a batch in every
layer, and ``set_adapter`` walks every module. Here each targeted linear layer keeps the
resident adapters stacked (``A[slot]``, ``B[slot]``, scaling folded into B; buffers grow
with the slots and ranks in use). A batch's rows are brought together by adapter; once
per batch a layer gathers the A and B of each block of rows sharing an adapter (of each
row at worst), trimmed to the batch's largest rank, and adds them with two batched matmuls
in place on the layer's output, whatever the number of adapters (the BGMV scheme of
Punica and S-LoRA, reading each weight once per block rather than once per row). Zero
padding of smaller ranks is exact. Slot 0 is all zeros: the bare base.

Stacked: LoRA on ``nn.Linear`` (any rank up to ``max_rank``, alpha, rsLoRA, target set).
Served by PEFT's own path instead (:mod:`adaptr.serving.peft_fallback`, same base, same batch):
DoRA and the other LoRA variants, ``lora_bias``, ``modules_to_save``, trainable tokens,
LoRA on embeddings or other non-linear layers, ranks above ``max_rank``. What PEFT cannot
mix in one batch runs in batches of its own (:meth:`AdapterServer.partition`; the rules are
:mod:`adaptr.serving.peft_fallback`'s). Refused: PEFT methods other than LoRA (IA3, LoHa, prompt
tuning, …), activated LoRA, and adapters PEFT loads by changing the base itself (KaSA's
truncated weights, ``layer_replication``'s extra layers, PiSSA-like inits saved without
conversion), whatever else is resident: serve those with ``adaptr.inference``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from itertools import combinations
from typing import Any

from adaptr.errors import AdaptrError, InvalidInputError
from adaptr.registry import AdapterVersion, Registry
from adaptr.registry.adapter_dir import PREFIX, pattern_value
from adaptr.serving.peft_fallback import BASE, PeftFallback, Traits, clash
from adaptr.serving.stacks import ROW_AWARE_KWARGS, BatchState, StackedLoRA
from adaptr.serving.vllm.compat import rewrites_base_reason

# generate() arguments the scheduler takes (continuous batching); others run model.generate
SCHEDULED_KWARGS = frozenset(
    {"max_new_tokens", "do_sample", "temperature", "top_p", "seed", "eos_token_id"}
)


class AdapterServer:
    """Serve many registry adapters on one base model, a different adapter per prompt.

    ``max_adapters`` bounds the number of resident adapters and ``max_memory_mb`` (optional)
    the size of their weights; past either, the least recently used are evicted. A mixed
    batch keeps its gathered A/B (per block of rows on one adapter) for all its decoding
    steps up to ``gather_budget_mb`` (per batch), and re-gathers them on every call past it.
    Calls are serialised by a lock, so the server is safe to share between threads.
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
        from adaptr.inference import load_base_model

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
        self._state = BatchState(gather_budget_mb * 2**20)
        self._layers: dict[str, StackedLoRA] = {}
        self._slots: OrderedDict[str, int] = OrderedDict()  # ref -> slot, least recently used first
        self._free = list(range(max_adapters, 0, -1))
        self._lock = threading.RLock()
        self.default: str | None = None
        self._bytes: dict[str, int] = {}  # ref -> bytes its weights take in the stacks
        self._templates: dict[str | None, str | None] = {}  # version ref -> its chat template
        self._fallback = PeftFallback(self.model, registry, path)  # slot 0 in the stacks: PEFT's
        self._scheduler = None

    @property
    def scheduler(self):
        """The :class:`~adaptr.serving.scheduler.Scheduler` of :meth:`generate`, :meth:`stream`
        and :meth:`chat` (started on first use; its worker thread is a daemon)."""
        if self._scheduler is not None:  # (no lock: the worker holds it while it runs a step)
            return self._scheduler
        with self._lock:
            if self._scheduler is None:
                from adaptr.serving.scheduler import Scheduler

                self._scheduler = Scheduler(self)
            return self._scheduler

    def _request(self, prompt: str, adapter: str | None, kwargs: dict, **extra: Any):
        from adaptr.serving.scheduler import Request, Sampling

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
        ids = self.tokenizer(prompt).input_ids
        return Request(ids, adapter, int(kwargs.get("max_new_tokens", 32)), sampling, **extra)

    def submit(self, prompt: str, adapter: str | None = None, **kwargs: Any):
        """Queue one completion of ``prompt`` with ``adapter`` (None: the default adapter of
        :meth:`switch`, else the base) on :attr:`scheduler` and return its
        :class:`~adaptr.serving.scheduler.Request` at once (``wait()``, ``cancel()``, ``text``,
        ``tokens``); ``kwargs``: ``max_new_tokens`` (32), ``do_sample``, ``temperature``,
        ``top_p``, ``seed``, ``eos_token_id`` (the tokens that end it, instead of the model's)."""
        kwargs.setdefault("max_new_tokens", 32)
        return self.scheduler.submit(self._request(prompt, adapter or self.default, kwargs))

    # ------------------------------------------------------------- adapters
    def resident(self) -> list[str]:
        """Refs of the adapters in memory, least recently used first."""
        return list(self._slots)

    def load(self, ref: str) -> int:
        """Make ``ref`` resident (evicting the least recently used if full); returns its slot."""
        return self._load(self.registry.get(ref))

    def _load(self, version: AdapterVersion, keep: frozenset[str] = frozenset()) -> int:
        """Make ``version`` resident; ``keep``: the refs of the batch being set up (never evicted
        for it: one that cannot stay loaded beside ``version`` is an error)."""
        with self._lock:
            key = version.ref
            if key in self._slots:
                self._slots.move_to_end(key)
                return self._slots[key]
            traits = self._fallback.traits(version)
            for ref in list(self._slots):  # what PEFT cannot hold beside it goes first
                other = self._fallback.known(ref)
                why = other and clash(traits, other)
                if why and ref in keep:
                    raise InvalidInputError(f"{why}: send them in separate batches")
                if why:
                    self._evict(ref)
            pairs, scaling_for, stackable, need = self._read(version, traits)
            if self.max_memory is not None and need > self.max_memory:
                raise InvalidInputError(
                    f"{key} has {need / 2**20:.3f} MB of weights, more than max_memory_mb={self.max_memory / 2**20:g}"
                )
            while self._slots and (
                len(self._slots) >= self.max_adapters
                or (self.max_memory is not None and self.memory() + need > self.max_memory)
            ):
                self._evict()
            if stackable:
                slot = self._free.pop()
                for module, (A, B) in pairs.items():
                    self._layer(module).set(slot, A, B, scaling_for(module))
            else:
                slot = 0  # no stacked weights: PEFT's layers serve its rows
                self._fallback.load(version)
            self._slots[key] = slot
            self._bytes[key] = need
            return slot

    def served_by_peft(self) -> list[str]:
        """Refs of the resident adapters that PEFT's path serves (the stacks cannot)."""
        return [ref for ref, slot in self._slots.items() if slot == 0]

    def memory(self) -> int:
        """Bytes of the resident adapters' weights (in the serving dtype)."""
        return sum(self._bytes.values())

    def _evict(self, ref: str | None = None) -> None:
        """Evict ``ref`` (None: the least recently used)."""
        if ref is None:
            ref, slot = self._slots.popitem(last=False)
        else:
            slot = self._slots.pop(ref)
        if slot == 0:
            self._fallback.unload(ref)
        else:
            for layer in self._layers.values():
                layer.clear(slot)
            self._free.append(slot)
        self._bytes.pop(ref, None)
        # a default that is evicted stays the default: _rows reloads it on its next use

    def _read(self, v: AdapterVersion, traits: Traits):
        """(lora A/B by module, scaling per module, whether the stacks can hold it, and the bytes
        of its weights in the serving dtype; the stacks add each layer's rank padding)."""
        from safetensors.torch import load

        if v.peft_type != "LORA":
            raise InvalidInputError(
                f"{v.ref} is a {v.peft_type} adapter; AdapterServer serves LoRA adapters: "
                "use adaptr.inference (PEFT) for it"
            )
        rewrites = rewrites_base_reason(v.config)
        if rewrites:  # one shared base: PEFT's rewrite of it would change every other adapter
            raise InvalidInputError(f"AdapterServer cannot serve {v.ref}: {rewrites}")
        # the bytes served are the bytes hashed: a flipped bit fails this adapter's requests
        weights = load(self.registry.read_checked(v, "adapter_model.safetensors"))
        pairs: dict[str, list] = {}
        other = False  # weights that are not a linear layer's lora_A / lora_B
        for key, t in weights.items():
            for part, idx in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
                if key.endswith(part):
                    pairs.setdefault(key[len(PREFIX) : -len(part)], [None, None])[idx] = t
                    break
            else:
                other = True
        s = v.summary
        stackable = not (
            other
            or traits.variant  # DoRA, … : not plain LoRA math
            or any(s.get(k) for k in ("lora_bias", "modules_to_save"))
            or v.config.get("trainable_token_indices")
            or v.config.get("target_parameters")
            or any(None in pair or pair[0].shape[0] > self.max_rank for pair in pairs.values())
            or not all(self._is_linear(module) for module in pairs)
        )
        cfg = v.config

        def scaling_for(module: str) -> float:
            r = pattern_value(cfg.get("rank_pattern"), module, cfg["r"])
            alpha = pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", r))
            return float(alpha) / (r**0.5 if cfg.get("use_rslora") else r)

        need = sum(t.numel() for t in weights.values()) * self.model.dtype.itemsize
        return pairs, scaling_for, stackable, need

    def _base_layer(self, module: str):
        # the base's own layer, also when PEFT wraps it for an adapter it serves: the stacks hook it
        return self._fallback.modules[module]

    def _is_linear(self, module: str) -> bool:
        import torch

        return isinstance(self._fallback.modules.get(module), torch.nn.Linear)

    def _layer(self, module: str) -> StackedLoRA:
        """The stacks of ``module``, an ``nn.Linear`` (:meth:`_read` sends the rest to PEFT)."""
        if module not in self._layers:
            layer = self._base_layer(module)
            self._layers[module] = StackedLoRA(layer, self.max_adapters + 1, self._state)
        return self._layers[module]

    def switch(self, ref: str | None) -> None:
        """Set the default adapter for prompts that name none (``None``: the bare base)."""
        if ref is not None:
            version = self.registry.get(ref)
            self._load(version)
            ref = version.ref
        self.default = ref

    # ----------------------------------------------------------- generation
    def _rows(self, adapters: Sequence[str | None] | None, n: int):
        """Each row's slot in the stacks (0: none) and its adapter's name for PEFT (BASE: none)."""
        import torch

        adapters = self._per_row(adapters, n)
        distinct = {a for a in adapters if a is not None}
        if len(distinct) > self.max_adapters:
            raise InvalidInputError(
                f"{len(distinct)} different adapters in one batch, more than max_adapters={self.max_adapters}"
            )
        versions = {a: self.registry.get(a) for a in distinct}  # each ref resolved once per batch
        traits = [self._fallback.traits(v) for v in versions.values()]
        if len(set(adapters)) > 1:
            why = next((f"{t.ref}: {t.alone}" for t in traits if t.alone), None)
            why = why or next(filter(None, (clash(a, b) for a, b in combinations(traits, 2))), None)
            if why:
                raise InvalidInputError(
                    f"this batch mixes adapters that PEFT must run apart ({why}): run the "
                    "batches of partition() one by one, as generate() does"
                )
        keep = frozenset(v.ref for v in versions.values())
        slots = {a: self._load(v, keep) for a, v in versions.items()}
        if any(self._slots.get(v.ref) != slots[a] for a, v in versions.items()):
            raise InvalidInputError(
                f"the adapters of this batch do not fit max_memory_mb={self.max_memory / 2**20:g} together; "
                "send them in smaller batches or raise the limit"
            )
        rows = torch.tensor([0 if a is None else slots[a] for a in adapters], dtype=torch.long)
        peft = {a: v.ref for a, v in versions.items() if slots[a] == 0}
        return rows, [peft.get(a, BASE) for a in adapters]

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
        with self._lock:  # not while another thread loads adapters
            traits = {a: self._traits(a) for a in set(adapters) if a is not None}
        groups: list[tuple[bool, list[Traits], list[int]]] = []  # (alone, adapters' traits, rows)
        where: dict[str | None, int] = {}
        for i, a in enumerate(adapters):
            if a not in where:
                where[a] = self._group(groups, traits.get(a))
            groups[where[a]][2].append(i)
        return [rows for _, _, rows in groups]

    @staticmethod
    def _group(groups: list[tuple[bool, list[Traits], list[int]]], t: Traits | None) -> int:
        """The first group an adapter (``t``: its traits; None: the base, or a ref the batch
        will report) can join, or a new one."""
        alone = bool(t and t.alone)
        fits = (
            g
            for g, (apart, members, _) in enumerate(groups)
            if not (alone or apart or (t and any(clash(t, m) for m in members)))
        )
        g = next(fits, len(groups))
        if g == len(groups):
            groups.append((alone, [], []))
        if t:
            groups[g][1].append(t)
        return g

    def _traits(self, ref: str) -> Traits | None:
        try:
            return self._fallback.traits(self.registry.get(ref))
        except AdaptrError:  # an unknown or refused ref: the batch itself reports it
            return None

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

        with self._lock:
            rows, names = self._rows(adapters, n)
            order = rows.argsort(stable=True) if grouped else torch.arange(n)
            self._state.set_rows(rows[order])
            try:
                with torch.no_grad(), self._fallback.rows([names[i] for i in order.tolist()]):
                    yield order.tolist()
            finally:
                self._state.set_rows(None)

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

        With only ``max_new_tokens``, ``do_sample``, ``temperature``, ``top_p``, ``seed`` and
        ``eos_token_id`` the prompts go through :attr:`scheduler` (continuous batching, shared
        with every other caller); other ``model.generate`` arguments (beams, several
        sequences, a streamer, processors, …) run one static batch per :meth:`partition` part.
        """
        kwargs.setdefault("max_new_tokens", 32)
        kwargs.setdefault("do_sample", False)
        if SCHEDULED_KWARGS.issuperset(kwargs):
            adapters = self._per_row(adapters, len(prompts))
            requests = [self._request(p, a, kwargs) for p, a in zip(prompts, adapters, strict=True)]
            for r in requests:
                self.scheduler.submit(r)
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
            self.scheduler.submit(req)
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
