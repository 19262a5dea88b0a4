"""``adaptr eval --metrics pref``: held-out preference pairs scored for many versions at once.

``pref_acc`` is the share of pairs whose chosen answer the version finds likelier than the
rejected one (the summed log-probability of the answer's tokens given the prompt), and
``pref_margin`` the mean of that difference (nats). Pairs are tokenized as TRL's DPOTrainer
tokenizes them (:func:`adaptr.data.preference.tokenize`), and every batch mixes the rows of
every version (and the bare base), as the loss metric does.
"""

from __future__ import annotations

from typing import Any

from adaptr.data.preference import PAIRED, UNPAIRED, PairRow, tokenize
from adaptr.errors import InvalidInputError

PREFERENCE = ("pref_acc", "pref_margin")


def check_metrics(kind: str, wanted: list[str], fmt: str) -> None:
    """Preference metrics need preference pairs; the others need SFT data."""
    pref = [m for m in wanted if m in PREFERENCE]
    other = [m for m in wanted if m not in PREFERENCE]
    if pref and kind != PAIRED:
        raise InvalidInputError(
            f"{', '.join(pref)} score preference pairs (prompt, chosen, rejected: e.g. --format "
            f"preference); the {fmt} format gives {kind} records"
        )
    if other and kind in (PAIRED, UNPAIRED):
        raise InvalidInputError(
            f"{', '.join(other)} score SFT data; the {fmt} format gives {kind} records: score "
            "preference pairs with --metrics pref (pref_acc, pref_margin)"
        )


def is_chat(splits) -> bool:
    """Conversational preference pairs (rendered with the chat template)."""
    return splits.kind == PAIRED and isinstance(splits.records[0].get("prompt"), list)


def pair_rows(splits, tokenizer) -> list[PairRow]:
    return tokenize(splits.train, tokenizer, PAIRED, "eval")


def answer_logps(server, rows: list[PairRow], refs: list, batch_size: int, progress) -> dict:
    """{ref: [(logp chosen, logp rejected), …]}: each answer's summed log-probability."""
    from adaptr.evaluation.scoring import chunks, labelled_nll

    seqs = [(r.prompt_ids, a) for r in rows for a in r.answers]  # chosen, rejected, chosen, …
    out: dict[Any, list[float]] = {ref: [0.0] * len(seqs) for ref in refs}
    pieces = list(chunks(len(seqs), batch_size))
    for done, chunk in enumerate(pieces, 1):
        cells = [(i, ref) for i in chunk for ref in refs]
        scored = [
            (seqs[i][0] + seqs[i][1], [-100] * len(seqs[i][0]) + seqs[i][1]) for i, _ in cells
        ]
        sums, _ = labelled_nll(server, scored, [ref for _, ref in cells])
        for (i, ref), s in zip(cells, sums, strict=True):
            out[ref][i] = -s
        if progress:
            progress("preference", done, len(pieces))
    return {ref: list(zip(v[0::2], v[1::2], strict=True)) for ref, v in out.items()}


def preference_scores(server, rows: list[PairRow], refs: list, wanted, batch_size, progress):
    """{ref: {pref_acc, pref_margin}} over the pairs."""
    scores: dict[Any, dict[str, float]] = {}
    for ref, pairs in answer_logps(server, rows, refs, batch_size, progress).items():
        margins = [c - r for c, r in pairs]
        got = {
            "pref_acc": sum(m > 0 for m in margins) / len(margins),
            "pref_margin": sum(margins) / len(margins),
        }
        scores[ref] = {m: got[m] for m in wanted if m in PREFERENCE}
    return scores
