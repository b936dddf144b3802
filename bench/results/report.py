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

Every plotting function returns its ``matplotlib`` figure so tests can count series. Every
figure goes through :mod:`bench.results.plots` (the suite's one plotting setup): it states its
budget, epochs, seeds, device and stand-ins on itself. A report at a budget smaller than the
table's headline goes to ``<id>.<budget>.md`` and ``*.<budget>.png`` beside it
(:func:`bench.results.table.result_suffix`).

``python -m bench compare A B`` prints two runs or two tables side by side, with one warning
line per difference in data, model or budget between the two sides.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bench.config import ConfigError, slug, table_ids
from bench.results import plots
from bench.results.io import read_csv, read_json, write_text
from bench.results.table import aggregate, datasets_used, declared_dataset, natural_key, result_suffix, write_table
from bench.run.cells import Cell, expand  # the table's cells and their run folders (torch-free)

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
        run_dir = cell.run_dir  # where the table expects the run now (the summary's own path may predate a move)
        metrics = read_csv(run_dir / "metrics.csv") if (run_dir / "metrics.csv").exists() else []
        probe = read_csv(run_dir / "probe.csv") if (run_dir / "probe.csv").exists() else []
        runs.append(RunData(cell.row, cell.column, cell.seed, cell.summary, metrics, probe))
    return runs


def runs_note(runs: list[RunData], budget: str | None, stand_ins: list[str] = (), seed0: bool = False) -> str:
    """The provenance line of a report plot drawn from ``runs``."""
    per_cell: dict[tuple, int] = {}
    for r in runs:
        per_cell[(r.row, r.column)] = per_cell.get((r.row, r.column), 0) + 1
    seeds = 1 if seed0 and runs else max(per_cell.values(), default=0)
    note = plots.provenance(budget, [r.summary.get("epochs_done") for r in runs if r.summary.get("epochs_done")],
                            seeds, [r.summary.get("device", "") for r in runs], stand_ins)
    return note + (" · seed 0 of each cell" if seed0 else "")


def plot_alignment(runs: list[RunData], title: str, note: str | None = None):
    """One panel per rule, one line per layer: update angle (degrees) over training steps."""
    runs = [r for r in runs if r.seed == 0 and any(k.startswith(UPDATE) for row in r.probe for k in row)]
    if not runs:
        return None
    plt = plots.pyplot()
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
        ax.legend(fontsize=7, ncol=min(len(layers), 4), loc="upper right", title="layer")
    axes[-1, 0].set_xlabel("optimizer step")
    fig.suptitle(f"{title}: update angle to backprop, per layer")
    plots.annotate(fig, note if note is not None else runs_note(runs, None, seed0=True))
    return fig


def plot_error_curves(runs: list[RunData], title: str, note: str | None = None):
    """Train (left) and validation (right) error per epoch, one line per rule."""
    runs = [r for r in runs if r.seed == 0 and r.metrics]
    if not runs:
        return None
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, key, name in ((axes[0], "train/err1", "train error (running, during the epoch)"),
                          (axes[1], "val/err1", "validation error (end of epoch)")):
        for run in runs:
            points = [(int(m["epoch"]) + 1, _float(m.get(key))) for m in run.metrics]
            ax.plot([e for e, _ in points], [v for _, v in points], marker="o", ms=3, label=run.row)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("epoch")
        plots.integer_ticks(ax)
    axes[0].set_ylabel("error (%)")
    plots.floor_span(axes[0], [v for line in axes[0].get_lines() + axes[1].get_lines() for v in line.get_ydata()
                               if not math.isnan(v)])
    axes[1].legend(fontsize=8, title="rule")
    fig.suptitle(title)
    plots.annotate(fig, note if note is not None else runs_note(runs, None, seed0=True))
    return fig


def plot_epoch_time(runs: list[RunData], title: str, note: str | None = None):
    """Grouped bars: mean train-only seconds per epoch for each rule, one bar series per column."""
    runs = [r for r in runs if r.summary.get("time", {}).get("epoch_s")]
    if not runs:
        return None
    plt = plots.pyplot()
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
        multi = any(sum(1 for r in runs if r.row == row and r.column == column) > 1 for row in rows)
        ax.bar(xs, means, width, yerr=stds if multi else None, label=column, capsize=3)  # bars only with >1 run
    ax.set_xticks(range(len(rows)), rows, rotation=20, ha="right")
    ax.set_ylabel("seconds per epoch (train only)")
    ax.legend(fontsize=8, title="column")
    ax.set_title(title)
    plots.annotate(fig, note if note is not None else runs_note(runs, None))
    return fig


def _stand_ins(table: DictConfig, cells: list[Cell], column: str | None = None) -> list[str]:
    out = []
    for col in table.columns:
        if column is not None and col != column:
            continue
        declared, used = declared_dataset(table, col), datasets_used([c for c in cells if c.column == col])
        if declared and used and used != [declared]:
            out.append(f"{', '.join(used)} stands in for {declared}")
    return out


def make_plots(table: DictConfig, budget: str, cells: list[Cell], plots_dir: Path, suffix: str = "") -> dict[Path, object]:
    """Render every plot of a table; return {png path: figure} (figures are closed once saved).
    ``suffix`` goes before ``.png`` (``.smoke`` beside a larger headline)."""
    runs = load_runs(cells)
    figures: dict[Path, object] = {}
    for column in table.columns:
        in_column = [r for r in runs if r.column == column]
        label = f"{table.id} {column} ({budget})"
        note = runs_note(in_column, budget, _stand_ins(table, cells, column), seed0=True)
        for kind, fn in (("alignment", plot_alignment), ("error", plot_error_curves)):
            fig = fn(in_column, label, note)
            if fig is not None:
                figures[plots_dir / f"{table.id}-{slug(column)}-{kind}{suffix}.png"] = fig
    fig = plot_epoch_time(runs, f"{table.id}: wall-clock per epoch ({budget})",
                          runs_note(runs, budget, _stand_ins(table, cells)))
    if fig is not None:
        figures[plots_dir / f"{table.id}-epoch-time{suffix}.png"] = fig
    return figures


def report(table_id: str, budget: str, output_root: str | None = None, results: str | Path = "results",
           overrides: list[str] = ()) -> tuple[Path, list[Path], dict[Path, object]]:
    """Write ``results/<id>.md`` (+ csv) and the PNGs, or their ``.<budget>`` names beside a
    larger headline; return (md, pngs, figures)."""
    results = Path(results)
    table, cells = expand(table_id, budget, output_root=output_root, overrides=list(overrides))
    suffix = result_suffix(results, table, budget)  # a larger headline's files are renamed first
    figures = make_plots(table, budget, cells, results / "plots", suffix)
    pngs = [plots.save(fig, path, dpi=110) for path, fig in figures.items()]
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


def table_metrics(table_id: str, budget: str, output_root: str | None = None,
                  meta: dict | None = None) -> dict[str, float]:
    """Measured mean per ``row / column / field`` of a table's finished cells. ``meta``, if given,
    receives what the cells ran on (:func:`run_meta`'s keys)."""
    table, cells = expand(table_id, budget, output_root=output_root)
    if meta is not None:
        configs = [c.cfg for c in cells if c.cfg is not None]
        meta.update({
            "data": {"name": ", ".join(sorted({str(c.data.name) for c in configs}))},
            "model": {"name": ", ".join(sorted({str(c.model.name) for c in configs}))},
            "budget": budget,
            "epochs": sorted({int(c.summary["epochs_done"]) for c in cells
                              if c.status == "finished" and c.summary.get("epochs_done") is not None}),
        })
    return {f"{r['row']} / {r['column']} / {r['field']}": _float(r["measured_mean"])
            for r in aggregate(table, cells)}


# data keys that say where or how fast the data is read, not what it is
LOCATION_KEYS = {"root", "download", "num_workers", "pin_memory", "eval_batch_size"}


def run_meta(run_dir: Path) -> dict:
    """What a run measured on: its ``data`` and ``model`` config (from ``config.yaml``, else the
    names in ``summary.json``), its budget and the epochs it trained."""
    summary = read_json(run_dir / "summary.json")
    cfg = OmegaConf.load(run_dir / "config.yaml") if (run_dir / "config.yaml").exists() else None
    section = lambda key: (OmegaConf.to_container(cfg[key], resolve=True)  # noqa: E731
                           if cfg is not None and key in cfg else ({"name": summary[key]} if summary.get(key) else None))
    return {"data": section("data"), "model": section("model"),
            "budget": summary.get("budget") or (cfg.get("budget") if cfg is not None else None),
            "epochs": [int(summary["epochs_done"])] if summary.get("epochs_done") is not None else []}


def resolve(target: str, budget: str, output_root: str | None) -> tuple[str, dict[str, float], dict]:
    """(name, metrics, meta) of a run folder or a table id at ``budget``."""
    path = Path(target)
    if (path / "summary.json").exists():
        return str(path), run_metrics(path), run_meta(path)
    if target in table_ids():
        meta: dict = {}
        return f"{target} ({budget})", table_metrics(target, budget, output_root, meta), meta
    raise ConfigError(f"compare: {target!r} is neither a run folder (with summary.json) nor a table id; "
                      f"tables: {', '.join(table_ids())}")


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _epochs(epochs: list[int]) -> str:
    return f"{', '.join(map(str, epochs))} epoch{'' if epochs == [1] else 's'}" if epochs else "epochs unknown"


def differences(meta_a: dict, meta_b: dict) -> list[str]:
    """One ``warning:`` line per way the two sides differ in data, model or budget (nothing for
    what a side does not record)."""
    warnings = []
    for part in ("data", "model"):
        a, b = _flat(meta_a.get(part)), _flat(meta_b.get(part))
        if not a or not b:
            continue
        if part == "data":
            a, b = ({k: v for k, v in x.items() if k not in LOCATION_KEYS} for x in (a, b))
        # a key one side does not record (a table side records only names) is unknown, not different
        keys = [k for k in sorted(set(a) & set(b), key=lambda k: (k != "name", k)) if a[k] != b[k]]
        if keys:
            shown = "; ".join(f"{k} {a.get(k, '–')} vs {b.get(k, '–')}" for k in keys[:4])
            warnings.append(f"warning: A and B differ in {part}: {shown}" + (f"; … ({len(keys) - 4} more)" if len(keys) > 4 else ""))
    ba, bb = meta_a.get("budget"), meta_b.get("budget")
    ea, eb = meta_a.get("epochs") or [], meta_b.get("epochs") or []
    if (ba and bb and ba != bb) or (ea and eb and ea != eb):
        warnings.append(f"warning: A and B differ in budget: {ba or 'no budget'}, {_epochs(ea)} vs "
                        f"{bb or 'no budget'}, {_epochs(eb)}")
    return warnings


def compare_text(a: tuple, b: tuple) -> str:
    """Side by side: metric | A | B | B − A, one line per metric either side has, after one
    warning line per difference in data, model or budget (when ``a`` and ``b`` carry their
    meta as a third item)."""
    (name_a, va), (name_b, vb) = a[:2], b[:2]
    warnings = differences(a[2], b[2]) if len(a) > 2 and len(b) > 2 else []
    keys = sorted(set(va) | set(vb), key=natural_key)

    def fmt(v):
        return "–" if v is None or math.isnan(v) else f"{v:.4g}"

    rows = [("metric", "A", "B", "B − A")]
    for k in keys:
        x, y = va.get(k), vb.get(k)
        diff = y - x if (x is not None and y is not None and not math.isnan(x) and not math.isnan(y)) else None
        rows.append((k, fmt(x), fmt(y), "–" if diff is None else f"{diff:+.4g}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"A: {name_a}", f"B: {name_b}", *warnings, ""]
    for i, r in enumerate(rows):
        lines.append("  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
