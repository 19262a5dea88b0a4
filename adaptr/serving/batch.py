"""The running batch of the scheduler: its rows and their left-padded KV cache.

Each row keeps its own KV cache: the batch's cache is the rows' caches left-padded to one
length (a DynamicCache, attention mask zero on the padding), so joining concatenates the
newcomers' prefill cache (:meth:`Batch.add`), and leaving selects the remaining rows and
trims the padding no row needs any more (:meth:`Batch.select`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from adaptr.serving.requests import Request
from adaptr.serving.text import Detokenizer

if TYPE_CHECKING:
    import torch


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

    def add(self, rows: list[Row], cache, mask) -> None:
        """Append ``rows`` (their cache and mask), both left-padded to one length; the rows
        of one adapter are then brought together (each block reads its weights once)."""
        import torch

        if not self.rows:
            self.rows, self.cache, self.mask, self.gathered = rows, cache, mask, {}
        else:
            length = max(self.mask.shape[1], mask.shape[1])
            for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
                mine.keys = torch.cat([pad_left(mine.keys, length), pad_left(theirs.keys, length)])
                mine.values = torch.cat(
                    [pad_left(mine.values, length), pad_left(theirs.values, length)]
                )
            self.mask = torch.cat(
                [pad_left(self.mask, length, dim=1), pad_left(mask, length, dim=1)]
            )
            self.rows = self.rows + rows
            self.gathered = {}
        order = sorted(range(len(self.rows)), key=lambda i: self.rows[i].slot)
        if order != list(range(len(self.rows))):
            self.select(order)

    def select(self, keep: list[int]) -> None:
        """Keep the rows ``keep`` (in that order), trimming the padding no row needs."""
        import torch

        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        self.mask = self.mask.index_select(0, index)
        first = int(self.mask.any(0).long().argmax()) if keep else 0  # padding no row needs
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]
        self.gathered = {}


def pad_left(t, length: int, dim: int = 2):
    """``t`` zero-padded on the left of ``dim`` to ``length``."""
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    import torch

    return torch.cat([t.new_zeros(shape), t], dim=dim)
