"""A fast plain-text table for listings that grow with the registry, fitted to the terminal.

rich's Table measures every cell and takes ~1 s for 1,000 rows; this prints aligned
columns in milliseconds, with a bold header on a colour terminal (NO_COLOR respected).
Tables fit the terminal (80 columns when there is none): the widest columns shrink first,
their cells wrap (``wrap``) or are cut with ``…`` (paths keep their end); ``--wide`` shows
every cell whole, and ``--json`` is always whole.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence

from rich.cells import cell_len

GAP = 2
MIN_WIDTH = 6


def table_width() -> int:
    """The terminal's width; $COLUMNS or 80 when output is not a terminal."""
    if sys.stdout.isatty():
        return shutil.get_terminal_size((80, 24)).columns
    try:
        return max(20, int(os.environ.get("COLUMNS", "80")))
    except ValueError:
        return 80


def fit(natural: list[int], minimum: list[int], limit: int) -> list[int]:
    """Column widths that fit ``limit``: the widest column gives way first."""
    widths = list(natural)
    while (over := sum(widths) + GAP * (len(widths) - 1) - limit) > 0:
        shrinkable = [i for i, w in enumerate(widths) if w > minimum[i]]
        if not shrinkable:
            break  # cannot fit: overflow rather than lose the headers
        i = max(shrinkable, key=lambda k: widths[k])
        floor = max([minimum[i], *(widths[k] for k in shrinkable if k != i)])
        widths[i] -= max(1, min(over, widths[i] - floor))
    return widths


def _cell(text: str, width: int, wrap: bool, keep_end: bool) -> list[str]:
    if cell_len(text) <= width:
        return [text]
    if wrap:
        return _wrap(text, width)
    if keep_end:
        return ["…" + _fit_chars(text[::-1], width - 1)[::-1]]
    return [_fit_chars(text, width - 1) + "…"]


def _fit_chars(text: str, width: int) -> str:
    """The longest start of ``text`` that takes at most ``width`` terminal cells."""
    out, used = [], 0
    for ch in text:
        used += cell_len(ch)
        if used > width:
            break
        out.append(ch)
    return "".join(out)


def _wrap(text: str, width: int, indent: str = "") -> list[str]:
    """Words into lines of at most ``width`` cells (wide CJK characters count two)."""
    lines, line = [], ""
    for word in text.split():
        joined = f"{line} {word}" if line else indent + word
        if cell_len(joined) <= width:
            line = joined
            continue
        if line:
            lines.append(line)
        line = indent + word
        while cell_len(line) > width:  # a word longer than the line: cut it
            head = _fit_chars(line, width)
            lines.append(head)
            line = indent + line[len(head) :]
    return [*lines, line] if line else lines or [""]


def _pad(text: str, width: int, right: bool) -> str:
    space = " " * max(0, width - cell_len(text))
    return space + text if right else text + space


def print_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    right: Sequence[str] = (),
    *,
    wrap: Sequence[str] = (),
    keep_end: Sequence[str] = (),
    below: Sequence[str] = (),
    wide: bool = False,
) -> None:
    """Print ``rows`` under ``headers``, fitted to the terminal unless ``wide``.

    ``right`` columns align right; ``wrap`` columns wrap within their cell; ``keep_end``
    columns (paths) are cut at their start; ``below`` columns move to a line of their own
    under each row when the table would not fit. The first column (names) wraps, never cut.
    """
    cells = [[str(c) for c in row] for row in rows]
    natural = [max([len(h), *(cell_len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    limit = table_width()
    if wide or sum(natural) + GAP * (len(natural) - 1) <= limit:
        below = ()
    shown = [i for i, h in enumerate(headers) if h not in below]
    extra = [i for i, h in enumerate(headers) if h in below]
    widths = [natural[i] for i in shown]
    if not wide:
        minimum = [_minimum(headers[i], natural[i], i == 0, headers[i] in right) for i in shown]
        widths = fit(widths, minimum, limit)
    names = [headers[i] for i in shown]

    def lines(row: Sequence[str]) -> list[str]:
        parts = [
            _cell(row[i], w, i == 0 or headers[i] in wrap, headers[i] in keep_end)
            for i, w in zip(shown, widths, strict=True)
        ]
        out = []
        for k in range(max(len(p) for p in parts)):
            line = []
            for p, w, h in zip(parts, widths, names, strict=True):
                text = p[k] if k < len(p) else ""
                line.append(_pad(text, w, h in right))
            out.append((" " * GAP).join(line).rstrip())
        for i in extra:
            if row[i] not in ("", "-"):
                out += _wrap(f"{headers[i].lower()}: {row[i]}", max(20, limit), indent="    ")
        return out

    bold = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    head = (" " * GAP).join(h.ljust(w) for h, w in zip(names, widths, strict=True)).rstrip()
    out = [f"\x1b[1m{head}\x1b[0m" if bold else head]
    for row in cells:
        out.extend(lines(row))
    sys.stdout.write("\n".join(out) + "\n")


def _minimum(header: str, natural: int, first: bool, right: bool) -> int:
    """How narrow a column may get: numbers (right-aligned) never shrink; the first column
    (names) wraps no narrower than 16; the others down to their header (at least 6)."""
    if right:
        return natural
    return min(natural, 16 if first else max(len(header), MIN_WIDTH))
