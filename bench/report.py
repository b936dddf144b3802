"""Reports and comparisons from run folders already on disk; nothing here trains.

``python -m bench report <id>`` writes ``results/<id>.md`` (the table of
:mod:`bench.results.table`, plus a Plots section) and, per column of the table, PNGs in
``results/plots/``:

* ``<id>-<column>-alignment.png``: update angle ∠(rule ΔW, BP ∂L/∂W) per layer over training
  steps, one panel per rule, one line per layer (seed 0, from ``probe.csv``);
* ``<id>-<column>-error.png``: train and validation error per epoch, one line per rule (seed 0,
  from ``metrics.csv``). Test error is measured once, after training, so it is in the table and
  not a curve;
* ``<id>-epoch-time.png``: train-only wall-clock per epoch, one bar per rule and column (mean
  over seeds and epochs, error bar = std over runs).

Every plotting function returns its ``matplotlib`` figure so tests can count series.
``python -m bench compare A B`` prints two runs or two tables side by side.
"""
from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from bench.config import ConfigError, run_name, slug, table_ids
from bench.results.io import read_csv, read_json, write_text
from bench.results.table import Cell, aggregate, expand, natural_key, write_table

UPDATE = "align/update/"


@dataclass
class RunData:
    row: str
    column: str
    seed: int
    summary: dict
    metrics: list[dict] = field(default_factory=list)
    probe: list[dict] = field(default_factory=list)


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def load_runs(cells: list[Cell]) -> list[RunData]:
    """Metrics and probe records of every finished or diverged cell."""
    runs = []
    for cell in cells:
        if cell.status not in ("finished", "diverged") or cell.cfg is None:
            continue
        # where the table expects the run now (the summary's own path may predate a move)
        run_dir = Path(cell.cfg.output.root) / run_name(cell.cfg)
        metrics = read_csv(run_dir / "metrics.csv") if (run_dir / "metrics.csv").exists() else []
        probe = read_csv(run_dir / "probe.csv") if (run_dir / "probe.csv").exists() else []
        runs.append(RunData(cell.row, cell.column, cell.seed, cell.summary, metrics, probe))
    return runs


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters or in CI
    import matplotlib.pyplot as plt

    return plt


def plot_alignment(runs: list[RunData], title: str):
    """One panel per rule, one line per layer: update angle (degrees) over training steps."""
    runs = [r for r in runs if r.seed == 0 and any(k.startswith(UPDATE) for row in r.probe for k in row)]
    if not runs:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(runs), 1, figsize=(7, 2.4 * len(runs)), sharex=True, squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        layers = sorted({k for row in run.probe for k in row if k.startswith(UPDATE)}, key=natural_key)
        for layer in layers:
            points = [(int(row["step"]), _float(row[layer])) for row in run.probe if row.get(layer) not in ("", None)]
            ax.plot([s for s, _ in points], [v for _, v in points], label=layer.removeprefix(UPDATE), lw=1.2)
        ax.set_title(run.row, fontsize=10)
        ax.set_ylabel("angle (°)")
        ax.set_ylim(0, 100)
        ax.axhline(90, color="grey", lw=0.5, ls=":")
        ax.legend(fontsize=7, ncol=min(len(layers), 4), loc="upper right")
    axes[-1, 0].set_xlabel("optimizer step")
    fig.suptitle(f"{title}: update angle to backprop, per layer")
    fig.tight_layout()
    return fig


def plot_error_curves(runs: list[RunData], title: str):
    """Train (left) and validation (right) error per epoch, one line per rule."""
    runs = [r for r in runs if r.seed == 0 and r.metrics]
    if not runs:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, key, name in ((axes[0], "train/err1", "train error (running, during the epoch)"),
                          (axes[1], "val/err1", "validation error (end of epoch)")):
        for run in runs:
            points = [(int(m["epoch"]) + 1, _float(m.get(key))) for m in run.metrics]
            ax.plot([e for e, _ in points], [v for _, v in points], marker="o", ms=3, label=run.row)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("epoch")
    axes[0].set_ylabel("error (%)")
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_epoch_time(runs: list[RunData], title: str):
    """Grouped bars: mean train-only seconds per epoch for each rule, one bar series per column."""
    runs = [r for r in runs if r.summary.get("time", {}).get("epoch_s")]
    if not runs:
        return None
    plt = _pyplot()
    rows = list(dict.fromkeys(r.row for r in runs))
    columns = list(dict.fromkeys(r.column for r in runs))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows) * max(1, len(columns)) + 2), 3.6))
    width = 0.8 / len(columns)
    for j, column in enumerate(columns):
        means, stds = [], []
        for row in rows:
            per_run = [statistics.fmean(r.summary["time"]["epoch_s"]) for r in runs if r.row == row and r.column == column]
            means.append(statistics.fmean(per_run) if per_run else 0.0)
            stds.append(statistics.stdev(per_run) if len(per_run) > 1 else 0.0)
        xs = [i + (j - (len(columns) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, means, width, yerr=stds, label=column, capsize=3)
    ax.set_xticks(range(len(rows)), rows, rotation=20, ha="right")
    ax.set_ylabel("seconds per epoch (train only)")
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def save_png(fig, path: Path) -> Path:
    """Write a figure atomically (a killed report leaves the old PNG or the new one)."""
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)
    return path


def make_plots(table: DictConfig, budget: str, cells: list[Cell], plots_dir: Path) -> dict[Path, object]:
    """Render every plot of a table; return {png path: figure} (figures are closed once saved)."""
    runs = load_runs(cells)
    figures: dict[Path, object] = {}
    for column in table.columns:
        in_column = [r for r in runs if r.column == column]
        label = f"{table.id} {column} ({budget})"
        for kind, fn in (("alignment", plot_alignment), ("error", plot_error_curves)):
            fig = fn(in_column, label)
            if fig is not None:
                figures[plots_dir / f"{table.id}-{slug(column)}-{kind}.png"] = fig
    fig = plot_epoch_time(runs, f"{table.id}: wall-clock per epoch ({budget})")
    if fig is not None:
        figures[plots_dir / f"{table.id}-epoch-time.png"] = fig
    return figures


def report(table_id: str, budget: str, output_root: str | None = None, results: str | Path = "results",
           overrides: list[str] = ()) -> tuple[Path, list[Path], dict[Path, object]]:
    """Write ``results/<id>.md`` (+ csv) and the PNGs; return (md, pngs, figures)."""
    results = Path(results)
    table, cells = expand(table_id, budget, output_root=output_root, overrides=list(overrides))
    figures = make_plots(table, budget, cells, results / "plots")
    pngs = [save_png(fig, path) for path, fig in figures.items()]
    md, text = write_table(table, budget, cells, out_dir=results)
    if pngs:
        text += "\n## Plots\n\n" + "\n".join(f"![{p.stem}](plots/{p.name})" for p in pngs) + "\n"
        write_text(md, text)
    return md, pngs, figures


# --------------------------------------------------------------------------- compare

def run_metrics(run_dir: Path) -> dict[str, float]:
    """The comparable numbers of one run: final metrics, time, memory, last-epoch alignment."""
    summary = read_json(run_dir / "summary.json")
    values = {k: _float(v) for k, v in summary.get("final", {}).items()}
    t = summary.get("time", {})
    values.update({"time/epoch_s_mean": _float(t.get("epoch_s_mean")), "time/step_median_ms": _float(t.get("step_median_ms")),
                   "mem/peak_mb": _float(summary.get("memory", {}).get("peak_mb")),
                   "epochs_done": _float(summary.get("epochs_done"))})
    values.update({k: _float(v) for k, v in summary.get("last_epoch", {}).items() if k.startswith("align/")})
    return values


def table_metrics(table_id: str, budget: str, output_root: str | None = None) -> dict[str, float]:
    """Measured mean per ``row / column / field`` of a table's finished cells."""
    table, cells = expand(table_id, budget, output_root=output_root)
    return {f"{r['row']} / {r['column']} / {r['field']}": _float(r["measured_mean"])
            for r in aggregate(table, cells)}


def resolve(target: str, budget: str, output_root: str | None) -> tuple[str, dict[str, float]]:
    path = Path(target)
    if (path / "summary.json").exists():
        return str(path), run_metrics(path)
    if target in table_ids():
        return f"{target} ({budget})", table_metrics(target, budget, output_root)
    raise ConfigError(f"compare: {target!r} is neither a run folder (with summary.json) nor a table id; "
                      f"tables: {', '.join(table_ids())}")


def compare_text(a: tuple[str, dict], b: tuple[str, dict]) -> str:
    """Side by side: metric | A | B | B − A, one line per metric either side has."""
    (name_a, va), (name_b, vb) = a, b
    keys = sorted(set(va) | set(vb), key=natural_key)

    def fmt(v):
        return "–" if v is None or math.isnan(v) else f"{v:.4g}"

    rows = [("metric", "A", "B", "B − A")]
    for k in keys:
        x, y = va.get(k), vb.get(k)
        diff = y - x if (x is not None and y is not None and not math.isnan(x) and not math.isnan(y)) else None
        rows.append((k, fmt(x), fmt(y), "–" if diff is None else f"{diff:+.4g}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"A: {name_a}", f"B: {name_b}", ""]
    for i, r in enumerate(rows):
        lines.append("  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
