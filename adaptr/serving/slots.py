"""Residency: which adapters are in memory, in which slot of the stacks, and which go first.

:class:`Slots` is the server's model manager (vLLM's ``LoRAModelManager`` split): it loads
an adapter version into a free slot of every layer's :class:`~adaptr.serving.stacks.StackedLoRA`
(or hands it to PEFT's fallback, slot 0, when the stacks cannot hold it), evicts the least
recently used past ``max_adapters`` or ``max_memory`` bytes, and evicts first what PEFT cannot
hold beside a newcomer. Pinned adapters (:meth:`Slots.pin`) are never evicted to make room:
they count against both limits. Not locked itself: the server calls it holding its lock.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from adaptr.errors import InvalidInputError
from adaptr.registry import AdapterVersion, Registry
from adaptr.registry.adapter_dir import PREFIX, pattern_value
from adaptr.serving.peft_fallback import PeftFallback, Traits, clash
from adaptr.serving.stacks import BatchState, StackedLoRA
from adaptr.serving.vllm.compat import rewrites_base_reason

Eviction = Literal["lru", "clash", "unload"]  # to make room, beside a clashing newcomer, asked


@dataclass(frozen=True)
class Resident:
    """A resident adapter: its slot (0: PEFT's path serves it), whether it is pinned, the
    bytes of its weights, and when (``time.time()``) it was loaded and last put in a batch."""

    ref: str
    slot: int
    pinned: bool
    bytes: int
    loaded: float
    last_used: float


@dataclass
class SlotCounts:
    """Adapters loaded and evicted since the server started (evictions by reason)."""

    loads: int = 0
    lru: int = 0  # least recently used, to make room for another
    clash: int = 0  # PEFT could not hold it beside a newcomer
    unload: int = 0  # asked for (AdapterServer.unload)


class Slots:
    """The resident adapters of one base, by version ref, least recently used first.

    ``layers``: the stacks of each targeted module (made on first use); slot 0 of every
    stack is the bare base (all zeros), which is also the slot of the adapters PEFT serves.
    """

    def __init__(
        self,
        model,
        registry: Registry,
        fallback: PeftFallback,
        state: BatchState,
        *,
        max_adapters: int,
        max_rank: int,
        max_memory: float | None,
    ):
        self.model = model
        self.registry = registry
        self.fallback = fallback
        self.state = state
        self.max_adapters = max_adapters
        self.max_rank = max_rank
        self.max_memory = max_memory
        self.layers: dict[str, StackedLoRA] = {}
        self._slots: OrderedDict[str, int] = OrderedDict()  # ref -> slot, least recently used first
        self._free = list(range(max_adapters, 0, -1))
        self._bytes: dict[str, int] = {}  # ref -> bytes its weights take in the stacks
        self._pinned: set[str] = set()  # never evicted to make room
        self._loaded: dict[str, float] = {}  # ref -> when it was loaded (time.time())
        self._used: dict[str, float] = {}  # ref -> when it was last loaded or put in a batch
        self.counts = SlotCounts()

    def resident(self) -> list[str]:
        """Refs of the adapters in memory, least recently used first."""
        return list(self._slots)

    def slot_of(self, ref: str) -> int | None:
        """``ref``'s slot (0: PEFT serves it), or None when it is not resident."""
        return self._slots.get(ref)

    def served_by_peft(self) -> list[str]:
        """Refs of the resident adapters that PEFT's path serves (the stacks cannot)."""
        return [ref for ref, slot in self._slots.items() if slot == 0]

    def memory(self) -> int:
        """Bytes of the resident adapters' weights (in the serving dtype)."""
        return sum(self._bytes.values())

    def pinned(self) -> list[str]:
        """Refs of the pinned adapters (resident, never evicted to make room), least recently used first."""
        return [ref for ref in self._slots if ref in self._pinned]

    def residents(self) -> list[Resident]:
        """The resident adapters, least recently used first."""
        return [
            Resident(ref, slot, ref in self._pinned, self._bytes[ref], self._loaded[ref], self._used[ref])
            for ref, slot in self._slots.items()
        ]  # fmt: skip

    def last_used(self, ref: str) -> float | None:
        """When ``ref`` was last loaded or put in a batch (None: never since the server started)."""
        return self._used.get(ref)

    def pin(self, version: AdapterVersion, keep: frozenset[str] = frozenset()) -> int:
        """Load ``version`` and keep it resident until :meth:`unpin` (its slot). Pins count
        against ``max_adapters``: one more than it is an error, as is one past ``max_memory``;
        ``keep``: refs that must stay loaded (running rows use them), as for :meth:`load`."""
        key = version.ref
        if key not in self._pinned and len(self._pinned) >= self.max_adapters:
            raise InvalidInputError(
                f"cannot pin {key}: {len(self._pinned)} adapters are pinned already, as many as "
                f"max_adapters={self.max_adapters}; unpin one or raise max_adapters"
            )
        slot = self.load(version, keep)
        self._pinned.add(key)
        return slot

    def unpin(self, ref: str) -> bool:
        """``ref`` may be evicted again (least recently used first); whether it was pinned."""
        if ref not in self._pinned:
            return False
        self._pinned.discard(ref)
        return True

    def load(self, version: AdapterVersion, keep: frozenset[str] = frozenset()) -> int:
        """Make ``version`` resident (its slot); ``keep``: the refs of the batch being set up
        (never evicted for it: one that cannot stay loaded beside ``version`` is an error)."""
        key = version.ref
        now = time.time()
        if key in self._slots:
            self._slots.move_to_end(key)
            self._used[key] = now
            return self._slots[key]
        traits = self.fallback.traits(version)
        pairs, scaling_for, stackable, need = self._read(version, traits)  # refusals evict nothing
        if self.max_memory is not None and need > self.max_memory:
            raise InvalidInputError(
                f"{key} has {need / 2**20:.3f} MB of weights, more than max_memory_mb={self.max_memory / 2**20:g}"
            )
        for ref in list(self._slots):  # what PEFT cannot hold beside it goes first
            other = self.fallback.known(ref)
            why = other and clash(traits, other)
            if why and ref in keep:
                raise InvalidInputError(f"{why}: send them in separate batches")
            if why and ref in self._pinned:
                raise InvalidInputError(f"{key} cannot be loaded beside the pinned {ref} ({why}): unpin {ref}")
            if why:
                self.evict(ref, "clash")
        while self._slots and (
            len(self._slots) >= self.max_adapters
            or (self.max_memory is not None and self.memory() + need > self.max_memory)
        ):
            self._make_room(key, keep)
        if stackable:
            slot = self._free.pop()
            for module, (A, B) in pairs.items():
                self._layer(module).set(slot, A, B, scaling_for(module))
        else:
            slot = 0  # no stacked weights: PEFT's layers serve its rows
            self.fallback.load(version)
        self._slots[key] = slot
        self._bytes[key] = need
        self._loaded[key] = self._used[key] = now
        self.counts.loads += 1
        return slot

    def _make_room(self, key: str, keep: frozenset[str]) -> None:
        """Evict the least recently used adapter that is neither pinned nor in ``keep``; an
        error when there is none (the batch then runs its rows in smaller batches)."""
        free = [ref for ref in self._slots if ref not in self._pinned]
        victim = next((ref for ref in free if ref not in keep), None)
        limit = f"max_adapters={self.max_adapters}"
        if self.max_memory is not None:
            limit += f", max_memory_mb={self.max_memory / 2**20:g}"
        if free and victim is None:
            raise InvalidInputError(
                f"cannot load {key}: the adapters it must stay beside ({', '.join(free)}: this "
                f"batch's or running requests') and it do not fit {limit} together; send them "
                "in smaller batches, or raise the limit"
            )
        if not free:
            raise InvalidInputError(
                f"cannot load {key}: the {len(self._slots)} resident adapters are pinned and fill "
                f"the server ({limit}); unpin one or raise the limit"
            )
        self.evict(victim, "lru")

    def evict(self, ref: str | None = None, reason: Eviction = "lru") -> None:
        """Evict ``ref`` (None: the least recently used that is not pinned), unpinning it."""
        if ref is None:
            ref = next((r for r in self._slots if r not in self._pinned), None)
            if ref is None:
                raise InvalidInputError("every resident adapter is pinned: unpin one first")
        slot = self._slots.pop(ref)
        self._pinned.discard(ref)
        self._loaded.pop(ref, None)
        setattr(self.counts, reason, getattr(self.counts, reason) + 1)
        if slot == 0:
            self.fallback.unload(ref)
        else:
            for layer in self.layers.values():
                layer.clear(slot)
            self._free.append(slot)
        self._bytes.pop(ref, None)
        # a default that is evicted stays the default: the server reloads it on its next use

    def _read(self, v: AdapterVersion, traits: Traits) -> tuple[dict, Callable, bool, int]:
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

    def _is_linear(self, module: str) -> bool:
        import torch

        return isinstance(self.fallback.modules.get(module), torch.nn.Linear)

    def _layer(self, module: str) -> StackedLoRA:
        """The stacks of ``module``, an ``nn.Linear`` (:meth:`_read` sends the rest to PEFT)."""
        if module not in self.layers:
            # the base's own layer, also when PEFT wraps it for an adapter it serves
            layer = self.fallback.modules[module]
            self.layers[module] = StackedLoRA(layer, self.max_adapters + 1, self.state)
        return self.layers[module]
