"""Charts of training curves: a one-line terminal sparkline and a PNG (matplotlib)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from adaptr.errors import InvalidInputError

_SPARK = "▁▂▃▄▅▆▇█"


def plot_curves(series: dict[str, dict[str, list]], path: str | Path) -> Path:
    """Draw loss (solid) and eval loss (dashed) per version into a PNG; matplotlib needed."""
    try:
        import matplotlib
    except ImportError:
        raise InvalidInputError(
            "drawing a PNG needs matplotlib: pip install 'adaptr[plot]' (the terminal form needs nothing)"
        ) from None
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        for ref, s in series.items():
            line = None
            if s["loss"]:
                (line,) = ax.plot(*zip(*s["loss"], strict=True), label=f"{ref} loss")
            if s["eval_loss"]:
                color = line.get_color() if line else None
                ax.plot(*zip(*s["eval_loss"], strict=True), "--", marker="o", color=color,
                        label=f"{ref} eval loss")  # fmt: skip
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        out = Path(path)
        fig.savefig(out, format="png")
    finally:
        plt.close(fig)
    return out


def sparkline(values: Sequence[float], width: int = 40) -> str:
    """A one-line chart of ``values`` (resampled to at most ``width`` points)."""
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return ""
    if len(vals) > width:
        vals = [vals[int(i * len(vals) / width)] for i in range(width)]
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    return "".join(_SPARK[min(7, int((v - lo) / span * 7.999))] for v in vals)
