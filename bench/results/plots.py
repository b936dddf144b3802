"""The one plotting setup of the suite: style, the provenance line every figure carries, the
axis rules that keep noise from reading as an effect, and atomic saving.

Every figure (paper figures in :mod:`bench.results.table`, t-SNE maps in
:mod:`bench.results.latents`, report plots in :mod:`bench.results.report`) goes through here, so every
PNG states on itself what was measured: the budget, the epochs trained, the seeds behind each
point, the device, and any stand-in dataset.

Axis rules:

* error bars only when a point is the mean of more than one seed (a bar of 0 from one seed
  would claim a spread that was never measured);
* a y axis never spans less than :data:`MIN_REL_SPAN` of the largest value drawn (and never
  less than the seed spread), so a flat line from one seed stays flat instead of being
  stretched over the whole panel;
* epochs are counted in whole numbers (integer ticks).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

# a panel's y span is at least this fraction of its largest |value| (one seed: 62.31–62.40 %
# is drawn over ≥ 6.2 points, i.e. flat, not as a trend)
MIN_REL_SPAN = 0.10

STYLE = {
    "figure.dpi": 100,
    "savefig.dpi": 120,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "legend.fontsize": 7,
    "legend.title_fontsize": 7,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
}


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display on clusters or in CI), with the
    suite's style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(STYLE)
    return plt


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def provenance(budget: str | None, epochs: Iterable[int] = (), seeds: int = 0, devices: Iterable[str] = (),
               stand_ins: Iterable[str] = (), draws: str = "seed") -> str:
    """The line a figure carries: ``budget short · 20 epochs · 1 seed per point (no spread
    measured) · cpu (...) · fmnist stands in for cifar10``."""
    epochs = sorted({int(e) for e in epochs})
    devices = sorted({d for d in devices if d})
    parts = [f"budget {budget}" if budget else "computed, nothing trained"]
    if budget:
        parts.append(f"{', '.join(map(str, epochs))} epoch{'' if epochs == [1] else 's'}" if epochs
                     else "epochs unknown")
    if seeds == 1:
        parts.append(f"1 {draws} per point (no spread measured)")
    elif seeds > 1:
        parts.append(f"{seeds} {draws}s per point (mean ± std)")
    parts.append("; ".join(devices) if devices else "device unknown")
    parts += list(stand_ins)
    return " · ".join(parts)


def cells_provenance(table, cells, budget: str | None = None) -> str:
    """:func:`provenance` of a table's cells (finished ones are what a figure draws)."""
    from omegaconf import OmegaConf

    finished = [c for c in cells if c.status == "finished"]
    if budget is None:
        budget = next((str(c.cfg.budget) for c in cells if c.cfg is not None and c.cfg.get("budget")), None)
    per_point: dict[tuple, int] = {}
    for c in finished:
        per_point[(c.row, c.column)] = per_point.get((c.row, c.column), 0) + 1
    stand_ins = []
    for column in table.get("columns") or {}:
        declared = OmegaConf.select(table.columns[column], "data.name", default=None)
        used = sorted({str(c.cfg.data.name) for c in cells if c.column == column and c.cfg is not None})
        if declared and used and used != [declared]:
            stand_ins.append(f"{', '.join(used)} stands in for {declared}")
    return provenance(budget if not table.get("compute") else None,
                      [c.summary.get("epochs_done") for c in finished if c.summary.get("epochs_done") is not None],
                      max(per_point.values(), default=0),
                      [c.summary.get("device", "") for c in finished], stand_ins)


def distinct_styles(n: int) -> list[dict]:
    """``n`` line styles no two of which look alike: tab20's colours, then the same colours with
    another marker and dash, so a plot of 21 rules does not give three of them the same blue."""
    from matplotlib import colormaps

    colours = colormaps["tab20"].colors
    markers, dashes = ["o", "s", "^", "D"], ["-", "--", "-.", ":"]
    return [{"color": colours[i % 20], "marker": markers[(i // 20) % 4], "linestyle": dashes[(i // 20) % 4]}
            for i in range(n)]


def annotate(fig, text: str) -> None:
    """Write ``text`` along the bottom of the figure, outside every axis, and lay the figure out
    around it."""
    fig.text(0.5, 0.005, text, ha="center", va="bottom", fontsize=6.5, color="0.25", wrap=True)
    fig.tight_layout(rect=(0, 0.045 + 0.02 * (len(text) > 150), 1, 1))


def integer_ticks(ax) -> None:
    """Whole-number ticks on the x axis (epochs)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def floor_span(ax, values: Iterable[float], spread: float = 0.0, rel: float = MIN_REL_SPAN) -> tuple[float, float]:
    """Widen the y axis to at least ``rel`` × max|value| (and 4 × the seed spread), centred on the
    data, so that noise never fills a panel. Returns the limits set (or kept)."""
    values = [float(v) for v in values]
    if not values:
        return ax.get_ylim()
    lo, hi = ax.get_ylim()
    need = max(rel * max(abs(v) for v in values), 4.0 * spread)
    if ax.get_yscale() == "log" or hi - lo >= need or need == 0.0:
        return lo, hi
    mid = (min(values) + max(values)) / 2
    lo, hi = mid - need / 2, mid + need / 2
    if min(values) >= 0 > lo:  # a non-negative quantity keeps 0 as its floor
        lo, hi = 0.0, max(need, max(values))
    ax.set_ylim(lo, hi)
    return lo, hi


def save(fig, path: str | Path, dpi: int | None = None) -> Path:
    """Write a figure atomically (a killed render leaves the old PNG or the new one) and close it."""
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=dpi or STYLE["savefig.dpi"])
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)
    return path


def figure_text(fig) -> str:
    """Every piece of text drawn on a figure (titles, labels, legends, annotations): what a
    reader of the PNG can read. For tests."""
    texts = [t.get_text() for t in fig.texts]
    if getattr(fig, "_suptitle", None) is not None:
        texts.append(fig._suptitle.get_text())
    for ax in fig.axes:
        texts += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        legend = ax.get_legend()
        if legend is not None:
            texts.append(legend.get_title().get_text())
            texts += [t.get_text() for t in legend.get_texts()]
    return "\n".join(t for t in texts if t)
