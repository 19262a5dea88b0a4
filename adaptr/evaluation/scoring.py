"""Scoring labelled tokens for many adapters in one mixed pass: the rows right-padded into
one batch, each row with its own adapter, and the summed negative log-likelihood of each
row's labelled tokens (what the loss and the preference metrics are made of)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any


def chunks(n: int, size: int) -> Iterator[list[int]]:
    """``range(n)`` in consecutive pieces of at most ``size``."""
    for start in range(0, n, size):
        yield list(range(start, min(n, start + size)))


def padded(rows: Sequence[tuple[list[int], list[int]]], pad: int):
    """(ids, labels, mask) tensors of ``rows`` (token ids, labels of the same length, -100 on
    what is not scored), right-padded: positions start at 0 in every row."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, (row_ids, row_labels) in enumerate(rows):
        n = len(row_ids)
        ids[k, :n] = torch.tensor(row_ids)
        labels[k, :n] = torch.tensor(row_labels)
        mask[k, :n] = 1
    return ids, labels, mask


def labelled_nll(server, rows: Sequence[tuple[list[int], list[int]]], adapters: Sequence[Any]):
    """(sums, counts): each row's summed NLL over its labelled tokens and how many there are,
    row k run with ``adapters[k]`` (None: the base), in the server's mixed batches."""
    import torch

    ids, labels, mask = padded(rows, server.tokenizer.pad_token_id or 0)
    sums, counts = [0.0] * len(rows), [0] * len(rows)
    device = server.model.device
    for part in server.partition(list(adapters), len(rows)):
        with server.batch([adapters[k] for k in part], len(part), grouped=True) as order:
            take = [part[k] for k in order]
            with torch.no_grad():
                logits = server.model(
                    input_ids=ids[take].to(device), attention_mask=mask[take].to(device)
                ).logits.float()
            target = labels[take][:, 1:].to(device)
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), target, ignore_index=-100, reduction="none"
            ).double()
            for k, s, c in zip(
                take, nll.sum(dim=1).tolist(), (target != -100).sum(dim=1).tolist(), strict=True
            ):
                sums[k], counts[k] = s, c
    return sums, counts
