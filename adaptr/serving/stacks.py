"""Stacked per-layer LoRA weights: every resident adapter of a layer in one buffer, applied
per row in one gather and two batched matmuls (the BGMV scheme of Punica and S-LoRA).

Each targeted linear layer keeps the resident adapters stacked (``A[slot]``, ``B[slot]``,
scaling folded into B; buffers grow with the slots and ranks in use). A batch's rows are
brought together by adapter; once per batch a layer gathers the A and B of each block of
rows sharing an adapter (of each row at worst), trimmed to the batch's largest rank, and
adds them in place on the layer's output, whatever the number of adapters, reading each
weight once per block rather than once per row. Zero padding of smaller ranks is exact.
Slot 0 is all zeros: the bare base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from adaptr.errors import InvalidInputError


@dataclass
class BatchState:
    """What the stacks of every layer share about the batch being run.

    ``rows``: each row's slot (None: no batch, the hooks add nothing); ``cache``: the
    :class:`Gathered` weights of each layer for these rows (reset whenever the rows change);
    ``gathered_bytes`` of them so far, up to ``gather_budget`` bytes.
    """

    gather_budget: float
    rows: Any = None  # a LongTensor [batch]
    cache: dict = field(default_factory=dict)
    gathered_bytes: int = 0

    def set_rows(self, rows, cache: dict | None = None) -> None:
        """Run ``rows`` next (None: no batch); ``cache``: the gathered weights kept for them."""
        self.rows = rows
        self.cache = {} if cache is None else cache
        self.gathered_bytes = sum(g.nbytes for g in self.cache.values())


@dataclass(frozen=True)
class Gathered:
    """What one layer gathered for a batch: nothing (no row has weights in this layer:
    ``empty``), the ``A``/``B`` kept for every step (``[in, rank]``/``[rank, out]`` when every
    row is on one adapter, else ``[blocks, in, rank]``/``[blocks, rank, out]``), or, past the
    gather budget, only each block's slot (``blocks``) and the ``rank``, indexed on every call."""

    A: Any = None
    B: Any = None
    blocks: Any = None  # a LongTensor [blocks]: gathered afresh on every call
    rank: int = 0

    @property
    def empty(self) -> bool:
        return self.A is None and self.blocks is None

    @property
    def nbytes(self) -> int:
        """Bytes of the weights kept (none when empty or gathered on every call)."""
        if self.A is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.A, self.B))


NOTHING = Gathered()  # no row of the batch has weights in the layer


class StackedLoRA:
    """Holds one layer's stacked adapter weights; installed as a forward hook on that layer.

    Stacks are kept transposed for the matmuls: ``A[slot]`` is ``[in, rank]`` and ``B[slot]``
    ``[rank, out]``, with the adapter's scaling folded into B.
    """

    def __init__(self, layer, slots: int, state: BatchState):
        import torch

        self.layer = layer
        self.max_slots = slots
        out_features, in_features = layer.weight.shape
        like = {"dtype": layer.weight.dtype, "device": layer.weight.device}
        self.A = torch.zeros(1, in_features, 0, **like)
        self.B = torch.zeros(1, 0, out_features, **like)
        # each slot's real rank here (0: no weights in this layer; the rest is zero padding)
        self.ranks = torch.zeros(slots, dtype=torch.long)
        self.state = state  # shared by the layers: the batch's slot per row, gathered weights
        self.handle = layer.register_forward_hook(self._hook)

    def _grow(self, slot: int, r: int) -> None:
        """Buffers grow with the slots and ranks actually used (doubling), never past the limits."""
        cap, rank = self.A.shape[0], self.A.shape[2]
        if slot < cap and r <= rank:
            return
        new_cap = max(cap, min(self.max_slots, max(slot + 1, 2 * cap)))
        new_rank = max(rank, r)
        A = self.A.new_zeros(new_cap, self.A.shape[1], new_rank)
        B = self.B.new_zeros(new_cap, new_rank, self.B.shape[2])
        A[:cap, :, :rank], B[:cap, :rank] = self.A, self.B
        self.A, self.B = A, B

    def set(self, slot: int, A, B, scaling: float) -> None:
        r = A.shape[0]
        self._grow(slot, r)
        self.A[slot].zero_()
        self.B[slot].zero_()
        self.A[slot, :, :r] = A.T.to(self.A.dtype)
        self.B[slot, :r] = B.T.to(self.B.dtype) * scaling
        self.ranks[slot] = r

    def clear(self, slot: int) -> None:
        if slot < self.A.shape[0]:
            self.A[slot].zero_()
            self.B[slot].zero_()
        self.ranks[slot] = 0

    def _hook(self, module, inputs, output):
        rows = self.state.rows
        if rows is None:
            return output
        x = inputs[0]
        n = x.shape[0]  # generate() may expand the batch (beams, several sequences per prompt)
        key = (id(self), n)
        gathered = self.state.cache.get(key)
        if gathered is None:  # once per batch: the rows keep their adapters for every decoding step
            gathered = self.state.cache[key] = self._gather(rows, n)
        if gathered.empty:  # no row of this batch has weights in this layer
            return output
        a, b = gathered.A, gathered.B
        if a is None:  # over the gather budget: indexed on every call
            a, b = self._rows_weights(gathered.blocks, gathered.rank)
        in_place = output.dtype == a.dtype and output.is_contiguous() and not output.requires_grad
        if a.dim() == 2:  # every row on one adapter: plain matmuls
            x2 = x.reshape(-1, x.shape[-1]).to(a.dtype)
            if in_place:
                output.view(-1, output.shape[-1]).addmm_(x2 @ a, b)
                return output
            delta = (x2 @ a) @ b
        else:  # one adapter per block of rows: batched matmuls over the blocks' own A and B
            blocks = a.shape[0]
            x3 = x.reshape(blocks, -1, x.shape[-1]).to(a.dtype)
            if in_place:
                output.view(blocks, -1, output.shape[-1]).baddbmm_(x3.bmm(a), b)
                return output
            delta = x3.bmm(a).bmm(b)
        return output + delta.reshape(output.shape).to(output.dtype)

    def _gather(self, rows, n: int) -> Gathered:
        """Per batch: the A and B of its one adapter, or each block's own ``A``/``B`` stacked.

        A block is ``k`` consecutive rows on one adapter, ``k`` the largest size that tiles
        every run of equal rows (1 at worst: a block per row). Batches ordered by adapter
        (as :meth:`AdapterServer.generate` orders them) read each weight once per block.
        """
        import torch

        ranks = self.ranks[rows]
        if not bool(ranks.any()):
            return NOTHING
        rows = torch.where(ranks > 0, rows, 0)  # no weights in this layer: the zero slot 0
        rank = int(ranks.max())  # trim the padding up to max_rank
        if n % rows.shape[0]:
            raise InvalidInputError(
                f"{type(self.layer).__name__} got {n} rows for a batch of {rows.shape[0]}: "
                "the stacked LoRA path needs the batch as the inputs' first dimension"
            )
        if n != rows.shape[0]:
            rows = rows.repeat_interleave(n // rows.shape[0])
        if bool((rows == rows[0]).all()):
            slot = int(rows[0])
            return Gathered(self.A[slot, :, :rank].contiguous(), self.B[slot, :rank].contiguous())
        rows = rows[:: _block_size(rows)].to(self.A.device)
        size = rows.shape[0] * rank * (self.A.shape[1] + self.B.shape[2]) * self.A.element_size()
        if self.state.gathered_bytes + size > self.state.gather_budget:
            return Gathered(blocks=rows, rank=rank)  # gathered on every call, not kept
        self.state.gathered_bytes += size
        return Gathered(*self._rows_weights(rows, rank))

    def _rows_weights(self, rows, rank: int):
        """The A ``[blocks, in, rank]`` and B ``[blocks, rank, out]`` of each block's slot in ``rows``.

        (index_select: ~6x faster than indexing.)
        """
        A, B = self.A, self.B
        if rank < A.shape[2]:
            A, B = A[:, :, :rank], B[:, :rank]
        return A.index_select(0, rows), B.index_select(0, rows)


# generate() arguments that see rows by their position in the batch: such batches keep their order
ROW_AWARE_KWARGS = frozenset(
    {"streamer", "prefix_allowed_tokens_fn", "logits_processor", "stopping_criteria"}
)


def _block_size(rows) -> int:
    """The largest ``k`` such that ``rows`` is made of runs of ``k`` equal values."""
    n = rows.shape[0]
    starts = (rows[1:] != rows[:-1]).nonzero().flatten().add(1).tolist()
    bounds = [0, *starts, n]
    return math.gcd(*(b - a for a, b in pairwise(bounds)))
