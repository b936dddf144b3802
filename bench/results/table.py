"""Render a paper table from its cells (:func:`bench.run.cells.expand` plans them and reads their
run folders; ``bench table`` and ``bench sweep`` run the missing ones): the markdown, its CSV and
its figures.

Each cell of ``results/<id>.md`` reads ``paper → measured ± std (Δ)``; the header states the
budget and device so a smoke number is never mistaken for a reproduction. A row whose rule does
not exist yet reads ``not implemented``; a column whose data cannot be found reads
``data unavailable`` while the other cells still run.

Results layout (one table, several budgets): ``results/<id>.md`` (with ``<id>.csv``, its curve
and latent CSVs and ``plots/<id>*.png``) is the table's *headline*: the largest budget measured
(smoke < short < full). A render at a smaller budget than the headline's goes beside it with the
budget in every file name (``<id>.smoke.md``, ``plots/<id>-fmnist.smoke.png``) and never touches
the headline's files; a render at a larger budget first renames the headline's files that way
(:func:`demote`), so nothing measured is lost. ``*.smoke.*`` files are git-ignored: a smoke run
proves the pipeline and is redone by every main job. Computed tables do not depend on the budget
and always write the headline.
"""
from __future__ import annotations

import datetime as dt
import math
import os
import re
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from bench.results import plots
from bench.results.io import read_csv, write_csv, write_text
from bench.results.run import device_name, git_commit

if TYPE_CHECKING:
    from bench.run.cells import Cell

# --------------------------------------------------------------------------- rendering

def number_format(table: DictConfig | None) -> str:
    """The format spec of a table's numbers: ``metric.digits`` decimals (2), fixed-point, or
    ``metric.notation: scientific`` for quantities spanning orders of magnitude (al-5's losses)."""
    metric = (table.get("metric", {}) if table is not None else {}) or {}
    letter = "e" if str(metric.get("notation", "fixed")) == "scientific" else "f"
    return f".{int(metric.get('digits', 2))}{letter}"


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{spec}}"


def lookup(summary: dict, field_key: str):
    """A summary value: final test/train metrics first, then the best validation epoch
    (``best/val_err1``, ``best/epoch``), then the last epoch's row (alignment, timing).
    ``align/signal_cos/@1`` means the second feedback point in forward order, whatever its module
    name (a BatchNorm or Dropout shifts the names, not the order)."""
    values = {**summary.get("last_epoch", {}), **summary.get("best", {}), **summary.get("final", {})}
    if "@" in field_key:
        prefix, index = field_key.split("@")
        keys = forward_order([k for k in values if k.startswith(prefix) and "/" not in k[len(prefix):]])
        position = int(index) if index != "last" else -1
        if not keys or (position >= len(keys)):
            return None
        field_key = keys[position]
    value = values.get(field_key)
    return None if value in (None, "") else float(value)


def measured_values(cells: list[Cell], field_key: str) -> list[float]:
    return [v for c in cells if c.status == "finished" and (v := lookup(c.summary, field_key)) is not None]


def declared_dataset(table: DictConfig, column: str) -> str | None:
    """The dataset a column's paper numbers are on (the column's data.name, else the table's common one)."""
    return (OmegaConf.select(table.columns[column], "data.name", default=None)
            or OmegaConf.select(table, "common.data.name", default=None))


def datasets_used(cells: list[Cell]) -> list[str]:
    return sorted({str(c.cfg.data.name) for c in cells if c.cfg is not None})


def aggregate(table: DictConfig, cells: list[Cell]) -> list[dict]:
    """One record per (row, column, field): paper value, measured mean/std, Δ, status, and the data
    the cells ran on, with the paper's dataset in ``stands_in_for`` when that data is a stand-in."""
    fields = dict(table.get("metric", {}).get("fields", {"test": "test/err1"}))
    records = []
    for row in table.rows:
        paper_row = table.rows[row].get("paper") or {}
        for column in table.columns:
            group = [c for c in cells if c.row == row and c.column == column]
            if not group:
                continue
            statuses = {c.status for c in group}
            used, declared = datasets_used(group), declared_dataset(table, column)
            for name, key in fields.items():
                paper = OmegaConf.select(OmegaConf.create(paper_row), f"{column}.{name}", default=None)
                values = measured_values(group, key)
                mean = statistics.fmean(values) if values else None
                std = statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)
                # every run finished but none logged this field: the row has no such quantity
                # (al-5: a 1-component net has no s2-t2), not a cell still to run
                status = "finished" if values else "not applicable" if statuses == {"finished"} else next(
                    (s for s in ("not implemented", "data unavailable", "diverged", "failed", "pending") if s in statuses),
                    "pending")
                records.append({
                    "row": row, "column": column, "field": name, "paper": paper,
                    "measured_mean": mean, "measured_std": std, "seeds": len(values),
                    "delta": (mean - float(paper)) if (mean is not None and paper is not None) else None,
                    "status": status,
                    "reason": next((c.reason for c in group if c.reason), ""),
                    # where each diverged seed stopped (summary.json "divergence"), e.g. "3" or "3, 7"
                    "diverged_step": ", ".join(str(s) for s in sorted({c.summary["divergence"]["step"] for c in group
                                               if c.status == "diverged" and c.summary.get("divergence")})),
                    "data": ", ".join(used),
                    "stands_in_for": declared if (declared and used and used != [declared]) else "",
                })
    return records


def cell_text(rec: dict, spec: str = ".2f") -> str:
    paper = _fmt(rec["paper"], spec) if rec["paper"] is not None else "–"
    if rec["status"] == "not applicable":
        return "–" if rec["paper"] is None else f"{paper} → *not logged by this run*"
    if rec["status"] == "diverged" and rec.get("diverged_step"):
        return f"{paper} → *diverged (step {rec['diverged_step']})*"
    if rec["status"] != "finished":
        return f"{paper} → *{rec['status']}*"
    std = f" ± {_fmt(rec['measured_std'], spec)}" if rec["seeds"] > 1 else ""
    delta = f" ({rec['delta']:+{spec}})" if rec["delta"] is not None else ""
    return f"{paper} → **{_fmt(rec['measured_mean'], spec)}**{std}{delta}"


def render_markdown(table: DictConfig, budget: str, records: list[dict], cells: list[Cell]) -> str:
    fields = list(dict(table.get("metric", {}).get("fields", {"test": "test/err1"})))
    columns = list(table.columns)
    finished = [c for c in cells if c.status == "finished"]
    devices = sorted({c.summary.get("device", "") for c in finished}) or [device_name()]
    epochs = sorted({c.summary.get("epochs_done") for c in finished if c.summary.get("epochs_done") is not None})
    unit = table.get("metric", {}).get("unit", "")
    lines = [
        f"# {table.id}: {table.title}",
        "",
        *([computed_line(records)] if table.get("compute") else [
            f"- **budget: `{budget}`**" + (" — a smoke run proves the pipeline, it is **not** a reproduction" if budget == "smoke" else ""),
            f"- epochs trained: {', '.join(map(str, epochs)) or '–'}; seeds per cell: up to {max([r['seeds'] for r in records] or [0])}"]),
        f"- device: {'; '.join(devices)}",
        f"- rendered {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC} from commit `{git_commit()[:10]}`",
        f"- cells read `paper → measured ± std (Δ measured − paper)`, {table.get('metric', {}).get('name', 'metric')} in {unit or 'the paper’s unit'}; paper numbers are quoted from the paper, never measured here",
        "",
    ]
    for col in columns:  # a budget may run a column on a stand-in dataset: say so up front
        declared, used = declared_dataset(table, col), datasets_used([c for c in cells if c.column == col])
        if declared and used and used != [declared]:
            lines.insert(-1, f"- **column `{col}` runs on `{', '.join(used)}` at this budget** — a stand-in for "
                             f"`{declared}`, so its numbers are not comparable with the paper's")
    # A column run on the synthetic stand-in measured the pipeline, not the paper's data: its
    # accuracy cells read "data unavailable", with the stand-in's number beside it in brackets.
    synthetic_only = {col for col in columns
                      if datasets_used([c for c in cells if c.column == col]) == ["synthetic"]
                      and (declared_dataset(table, col) or "synthetic") != "synthetic"}
    header = ["row"] + [f"{col} {f}" for col in columns for f in fields]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    by_key = {(r["row"], r["column"], r["field"]): r for r in records}
    for row in table.rows:
        cells_txt = []
        for col in columns:
            for f in fields:
                rec = by_key.get((row, col, f))
                text = cell_text(rec, number_format(table)) if rec else "–"
                if rec and col in synthetic_only and rec["status"] == "finished":
                    paper = _fmt(rec["paper"], number_format(table)) if rec["paper"] is not None else "–"
                    text = f"{paper} → *data unavailable* (synthetic stand-in: {_fmt(rec['measured_mean'])})"
                cells_txt.append(text)
        lines.append("| " + " | ".join([row] + cells_txt) + " |")
    row_notes = [(row, spec.get("cited"), spec.get("note"), spec.get("columns")) for row, spec in table.rows.items()]
    row_notes = [n for n in row_notes if any(n[1:])]
    if row_notes:
        lines += ["", "## Row notes", ""]
        for row, cited, note, only in row_notes:
            parts = ([f"paper numbers cited from {cited}"] if cited else []) + ([str(note)] if note else []) + \
                    ([f"runs only in {', '.join(map(str, only))}"] if only else [])
            lines.append(f"- **{row}**: " + "; ".join(parts))
    lines += diagnostics_section(cells)
    reasons = sorted({(r["status"], r["reason"]) for r in records if r["status"] != "finished" and r["reason"]})
    if reasons:
        lines += ["", "## Why cells are empty", ""] + [f"- *{s}*: {why}" for s, why in reasons]
    section = decisions_section(table)
    if section:
        lines += [""] + section
    return "\n".join(lines) + "\n"


DECISIONS_HEADING = "## Protocol notes and decisions"


def decisions_section(table: DictConfig) -> list[str]:
    """The rendered table's notes-and-decisions section (empty when the table has neither)."""
    notes, decisions = table.get("notes") or [], table.get("decisions") or []
    if not (notes or decisions):
        return []
    return [DECISIONS_HEADING, ""] + [f"- {n}" for n in notes] + [f"- {d}" for d in decisions]


def computed_line(records: list[dict]) -> str:
    draws = max((int(r.get("seeds") or 0) for r in records), default=0)
    if draws > 1:  # random draws at initialisation (sfa-fig2): mean ± std over them
        return (f"- **computed from the models at initialisation, nothing trained**: mean ± std over {draws} "
                f"random draws per cell (same at every budget)")
    return "- **computed from the models with one dry forward, nothing trained**: exact at every budget"


def natural_key(name: str) -> list:
    """'net.11' after 'net.3': layer names in forward order."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def forward_order(keys: list[str]) -> list[str]:
    """Per-layer keys in the model's forward order. Runs record them in forward order (the
    probe's order: ``classifier`` after ``hidden.0.fc``); older summaries hold them sorted as
    strings, which only a natural sort ('net.11' after 'net.3') can put back in order."""
    return sorted(keys, key=natural_key) if keys == sorted(keys) else list(keys)


def diagnostics_section(cells: list[Cell]) -> list[str]:
    """Time, memory and last-epoch alignment of every finished run (seed 0): the *why* beside the *what*."""
    runs = [c for c in cells if c.status == "finished" and c.seed == 0]
    if not runs:
        return []
    lines = ["", "## Time, memory and alignment (seed 0, last epoch)", "",
             "Update angle: ∠(rule ΔW, BP ∂L/∂W) per layer, input → output, in degrees (0 = backprop).", "",
             "| row | column | epoch s (train only) | median step ms | peak MB (CPU: process RSS) | update angle per layer |",
             "|---|---|---|---|---|---|"]
    for c in runs:
        t, last = c.summary.get("time", {}), c.summary.get("last_epoch", {})
        layers = forward_order([k for k, v in last.items() if k.startswith("align/update/") and v not in ("", None)])
        if c.cfg is not None:  # the run's probe.csv header is the model's forward order, whatever the names
            probe = c.run_dir / "probe.csv"
            if probe.exists():
                with open(probe) as f:
                    header = f.readline().strip().split(",")
                layers = sorted(layers, key=lambda k: header.index(k) if k in header else len(header))
        angles = [f"{float(last[k]):.1f}" for k in layers]
        lines.append(f"| {c.row} | {c.column} | {_fmt(t.get('epoch_s_mean'))} | {_fmt(t.get('step_median_ms'), '.3f')} | "
                     f"{_fmt(c.summary.get('memory', {}).get('peak_mb'), '.0f')} | {' / '.join(angles) or '–'} |")
    return lines


def _column_label(table: DictConfig, column: str, cells: list[Cell]) -> str:
    used = sorted({str(c.cfg.data.name) for c in cells if c.column == column and c.cfg is not None})
    declared = OmegaConf.select(table.columns[column], "data.name", default=column)
    return column if (not used or used == [declared]) else f"{column} (run on {', '.join(used)}: stand-in)"


def figure_note(table: DictConfig, records: list[dict], cells: list[Cell], budget: str | None = None) -> str:
    """The provenance line of a table's figure (:func:`bench.results.plots.provenance`)."""
    if table.get("compute"):  # computed at initialisation: the points are random draws, not seeds
        draws = max((int(r.get("seeds") or 0) for r in records), default=0)
        return plots.provenance(None, seeds=draws, devices=[device_name()], draws="random draw")
    return plots.cells_provenance(table, cells, budget)


def plot_figure(table: DictConfig, records: list[dict], cells: list[Cell], path: Path,
                spec: DictConfig | None = None, note: str | None = None) -> tuple[Path, list[int]]:
    """A paper figure whose points are table rows (``kind: rows``, the default): x is a config
    value of each row (``figure.x``, from the run's config, or from the row itself in a computed
    table), one panel per field in ``figure.series``, one line per column. Error bars are the
    seed std, drawn only where a point is the mean of more than one seed; a panel's y axis never
    spans less than ``plots.MIN_REL_SPAN`` of its values, so one seed's noise stays flat. The
    figure states its budget, epochs, seeds, device and stand-ins (``note``, default from the
    cells). Options: ``log_x``, ``log_y``, ``labels`` (per series), ``x_label``.
    Returns the PNG's path and the number of lines drawn in each panel."""
    plt = plots.pyplot()
    spec = table.figure if spec is None else spec
    x_of = {}
    for c in cells:
        if c.cfg is not None:
            x_of[c.row] = float(OmegaConf.select(c.cfg, str(spec.x)))
    rows = table.get("rows") or {}
    for row in rows:  # computed tables have no cells: x is a value the row sets
        if row not in x_of and OmegaConf.select(rows[row], str(spec.x), default=None) is not None:
            x_of[row] = float(OmegaConf.select(rows[row], str(spec.x)))
    series = list(spec.series)
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.6), squeeze=False)
    for ax, name in zip(axes[0], series):
        drawn, spread = [], 0.0
        for column in table.columns:
            points = sorted((x_of[r["row"]], r["measured_mean"], r["measured_std"] or 0.0, int(r.get("seeds") or 1))
                            for r in records
                            if r["column"] == column and r["field"] == name and r["measured_mean"] is not None
                            and r["row"] in x_of)
            if points:
                xs, ys, errs, seeds = zip(*points)
                label = _column_label(table, column, cells)
                if max(seeds) > 1:  # a spread was measured: show it
                    ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=label)
                    spread = max(spread, *errs)
                else:  # one seed: no bars (a bar of 0 would claim a spread nobody measured)
                    ax.plot(xs, ys, marker="o", label=label)
                drawn += ys
        ax.set_xlabel(str(spec.get("x_label", spec.x)))
        ax.set_ylabel(str(spec.get("labels", {}).get(name, name)))
        if spec.get("log_x"):
            ax.set_xscale("log")
        if spec.get("log_y"):
            ax.set_yscale("log")
        plots.floor_span(ax, drawn, spread)
        ax.legend(title=str(spec.get("legend_title", "column (dataset)")))
    lines = [len(ax.get_legend_handles_labels()[1]) for ax in axes[0]]
    fig.suptitle(f"{table.id}: {spec.get('title', table.title)}", fontsize=10)
    plots.annotate(fig, note if note is not None else figure_note(table, records, cells))
    return plots.save(fig, path), lines


def run_curves(cells: list[Cell], key: str, file: str = "probe.csv", x: str = "step") -> dict[tuple[str, str], dict[str, list]]:
    """Quantities recorded over training in each run folder's ``probe.csv`` (or ``metrics.csv``,
    one row per epoch), per (row, column): {line: [(x, mean over finished seeds), ...]} with x the
    CSV's ``step`` or ``epoch`` column. ``key`` ending in ``/`` is a prefix (one line per layer,
    named by the rest of the key); otherwise one line named ``key``."""
    per_cell: dict[tuple[str, str], dict[str, dict[int, list[float]]]] = {}
    for c in cells:
        if c.status != "finished" or c.cfg is None:
            continue
        path = c.run_dir / file
        if not path.exists():
            continue
        lines = per_cell.setdefault((c.row, c.column), {})
        seen = 0.0  # x: tokens — training tokens seen by the end of each epoch (language models' data/tokens)
        for rec in read_csv(path):
            if x == "tokens":
                seen += float(rec.get("data/tokens") or 0.0)
            for k, v in rec.items():
                if v in ("", None) or not (k == key or (key.endswith("/") and k.startswith(key))):
                    continue
                name = k[len(key):] if key.endswith("/") else k
                at = int(seen) if x == "tokens" else int(rec[x]) + (x == "epoch")
                lines.setdefault(name, {}).setdefault(at, []).append(float(v))
    # lines keep the CSV's column order, which is the model's forward order (input → output)
    return {cell: {name: [(step, statistics.fmean(vs)) for step, vs in sorted(points.items())]
                   for name, points in lines.items()}
            for cell, lines in per_cell.items()}


def plot_curves(table: DictConfig, cells: list[Cell], out_dir: Path, spec: DictConfig, suffix: str = "",
                note: str | None = None) -> list[tuple[Path, int, list[dict]]]:
    """A paper figure of quantities over training (``kind: curves``), read from ``probe.csv``
    (``file: metrics.csv`` with ``x: epoch`` for per-epoch quantities such as ``val/err1``):

    * ``lines: layers`` (default): one PNG per row (and column), one line per layer of ``key``
      (sfa Figure 3: the update angle of every layer over training, one panel per rule);
    * ``lines: rows``: one PNG per column, one line per row (sfa Figure 5: the fraction of
      flipped signs of every freezing condition).

    ``rows`` limits the figure to some rows; ``title``, ``x_label``, ``y_label``, ``ylim``,
    ``hlines`` (reference lines) and ``legend_title`` set the axes.

    Lines are the mean over the finished seeds at each step. Each PNG states its budget, epochs,
    seeds, device and stand-ins (``note``, default from the cells); ``suffix`` goes before
    ``.png`` (``.smoke`` beside a larger headline). Returns, per PNG, its path, the number of
    lines drawn and the plotted points (for the figure's CSV)."""
    from bench.config import slug

    key, by = str(spec.key), str(spec.get("lines", "layers"))
    if by not in ("layers", "rows"):
        raise ValueError(f"figure lines: {by!r}; valid choices: layers, rows")
    only = [str(r) for r in spec.get("rows", None) or table.rows]
    # epochs are counted from 1 on the x axis (epoch 1 = after one pass), steps from 0
    x = str(spec.get("x", "step"))
    if x not in ("step", "epoch", "tokens"):
        raise ValueError(f"figure x: {x!r}; valid choices: step, epoch, tokens")
    curves = {k: v for k, v in run_curves(cells, key, str(spec.get("file", "probe.csv")), x).items() if k[0] in only}
    name = f"-{slug(spec.name)}" if spec.get("name") else ""
    panels: list[tuple[str, str, dict[str, list]]] = []  # (file stem, subtitle, {line label: points})
    for column in table.columns:
        col = f"-{slug(column)}" if len(table.columns) > 1 else ""
        if by == "rows":
            lines = {}
            for row in table.rows:
                for label, points in curves.get((row, column), {}).items():
                    lines[row if len(curves.get((row, column))) == 1 else f"{row} {label}"] = points
            panels.append((f"{table.id}{name}{col}", _column_label(table, column, cells), lines))
        else:
            for row in table.rows:
                if (row, column) in curves:
                    panels.append((f"{table.id}{name}-{slug(row)}{col}", f"{row} / {_column_label(table, column, cells)}",
                                   curves[(row, column)]))
    note = plots.cells_provenance(table, cells) if note is None else note
    out = []
    for stem, subtitle, lines in panels:
        if not lines:
            continue
        path, n = draw_curves(table, spec, out_dir / f"{stem}{suffix}.png", subtitle, lines, note, by=by)
        points = [{"png": path.name, "line": label, "step": s, "value": v} for label, pts in lines.items() for s, v in pts]
        out.append((path, n, points))
    return out


def draw_curves(table: DictConfig, spec: DictConfig, path: Path, subtitle: str, lines: dict[str, list],
                note: str, by: str = "layers") -> tuple[Path, int]:
    """One curve PNG: ``lines`` is {label: [(x, value), ...]}; returns its path and the number of
    lines drawn. Epochs get whole-number ticks; without ``ylim`` the y axis never spans less than
    ``plots.MIN_REL_SPAN`` of the values."""
    plt = plots.pyplot()
    key, x = str(spec.key), str(spec.get("x", "step"))
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for label, points in lines.items():
        ax.plot([s for s, _ in points], [v for _, v in points], lw=1.3, marker="o" if len(points) < 15 else None,
                ms=3, label=label)
    ax.set_xlabel(str(spec.get("x_label", {"step": "optimizer step", "tokens": "training tokens seen"}.get(x, "epoch"))))
    ax.set_ylabel(str(spec.get("y_label", key)))
    if spec.get("log_y"):
        ax.set_yscale("log")
    if x == "epoch":
        plots.integer_ticks(ax)
    if spec.get("ylim") is not None:
        ax.set_ylim(*[float(v) for v in spec.ylim])
    else:
        plots.floor_span(ax, [v for pts in lines.values() for _, v in pts])
    for y in spec.get("hlines", []) or []:
        ax.axhline(float(y), color="grey", lw=0.6, ls=":")
    ax.legend(ncol=1 if len(lines) < 6 else 2, title=str(spec.get("legend_title", "row" if by == "rows" else "layer")))
    ax.set_title(f"{table.id}: {spec.get('title', table.title)}\n{subtitle}", fontsize=9)
    plots.annotate(fig, note)
    n = len(ax.get_lines()) - len(spec.get("hlines", []) or [])
    return plots.save(fig, path), n


def figure_specs(table: DictConfig) -> list[DictConfig]:
    """The table's figures: ``figure:`` is one mapping or a list of them, each with a ``kind``."""
    spec = table.get("figure")
    if spec is None:
        return []
    specs = list(spec) if OmegaConf.is_list(spec) else [spec]
    for s in specs:
        if str(s.get("kind", "rows")) not in FIGURE_KINDS:
            raise ValueError(f"table {table.id}: figure kind {s.get('kind')!r}; valid choices: {', '.join(FIGURE_KINDS)}")
    return specs


FIGURE_KINDS = ("rows", "curves", "tsne")


def render_figures(table: DictConfig, records: list[dict], cells: list[Cell], out_dir: Path, suffix: str = "",
                   budget: str | None = None) -> tuple[list[Path], list[dict]]:
    """Every figure of the table; returns the PNGs and the plotted points of curve figures.
    A t-SNE figure (``kind: tsne``, bench/results/latents.py) writes its separation scores to
    ``<id>-latents.csv`` beside the table. ``suffix`` goes before every extension (``.smoke``
    beside a larger headline)."""
    from bench.config import slug

    pngs, points = [], []
    note = figure_note(table, records, cells, budget)
    specs = figure_specs(table)
    for spec in specs:
        kind = str(spec.get("kind", "rows"))
        if kind == "rows":
            if not any(r["measured_mean"] is not None for r in records):
                continue
            stem = table.id + (f"-{slug(spec.name)}" if spec.get("name") and len(specs) > 1 else "")
            png, _ = plot_figure(table, records, cells, out_dir / "plots" / f"{stem}{suffix}.png", spec, note)
            pngs.append(png)
        elif kind == "tsne":
            if not any(c.status == "finished" for c in cells):
                continue
            from bench.results.latents import tsne_figure

            png, scores, _ = tsne_figure(table, cells, out_dir / "plots" / f"{table.id}{suffix}.png")
            write_csv(out_dir / f"{table.id}-latents{suffix}.csv", scores)
            pngs.append(png)
        else:
            for png, _, pts in plot_curves(table, cells, out_dir / "plots", spec, suffix, note):
                pngs.append(png)
                points += pts
    return pngs, points


# --------------------------------------------------------------------------- results layout

BUDGET_ORDER = ("smoke", "short", "full")  # a budget not listed ranks below smoke
LINK = re.compile(r"\]\(([^)\s:]+)\)")  # relative markdown link targets (no URLs)


def budget_rank(budget: str | None) -> int:
    return BUDGET_ORDER.index(str(budget)) if str(budget) in BUDGET_ORDER else -1


def with_suffix(name: str | Path, suffix: str) -> Path:
    """``rlra-1.md`` → ``rlra-1.smoke.md``, ``plots/x.png`` → ``plots/x.smoke.png``."""
    p = Path(name)
    return p.with_name(f"{p.stem}{suffix}{p.suffix}")


def headline_budget(out_dir: str | Path, table_id: str) -> str | None:
    """The budget of the table's headline result in ``out_dir`` (``<id>.csv``'s budget column,
    else the ``budget:`` line of ``<id>.md``); None when there is none."""
    out_dir = Path(out_dir)
    csv_path, md = out_dir / f"{table_id}.csv", out_dir / f"{table_id}.md"
    if csv_path.exists():
        rows = read_csv(csv_path)
        if rows and rows[0].get("budget"):
            return rows[0]["budget"]
    if md.exists():
        m = re.search(r"budget: `([^`]+)`", md.read_text())
        return m.group(1) if m else None
    return None


def demote(out_dir: str | Path, table_id: str, budget: str) -> list[Path]:
    """Rename the headline's files (``<id>.md``, ``<id>.csv`` and every file its md links to) to
    their ``.<budget>`` names, with the md's links rewritten; returns the new paths."""
    out_dir, suffix = Path(out_dir), f".{budget}"
    md = out_dir / f"{table_id}.md"
    moved = []
    text = md.read_text() if md.exists() else ""
    for target in dict.fromkeys(LINK.findall(text)):
        src = out_dir / target
        if src.is_file() and not src.stem.endswith(suffix):
            dst = out_dir / with_suffix(target, suffix)
            os.replace(src, dst)
            moved.append(dst)
            text = text.replace(f"]({target})", f"]({with_suffix(target, suffix).as_posix()})")
    csv_path = out_dir / f"{table_id}.csv"
    if csv_path.exists():
        os.replace(csv_path, out_dir / f"{table_id}{suffix}.csv")
        moved.append(out_dir / f"{table_id}{suffix}.csv")
    if md.exists():
        write_text(out_dir / f"{table_id}{suffix}.md", text)
        md.unlink()
        moved.append(out_dir / f"{table_id}{suffix}.md")
    return moved


def result_suffix(out_dir: str | Path, table: DictConfig, budget: str) -> str:
    """Where a render at ``budget`` goes: ``""`` (the headline ``<id>.md``) when no headline
    exists, it is of the same budget or of a smaller one (which :func:`demote` first renames to
    ``<id>.<its budget>.*``); else ``".<budget>"``, beside the larger headline, which it never
    touches. Computed tables are the same at every budget: always the headline."""
    if table.get("compute"):
        return ""
    current = headline_budget(out_dir, table.id)
    if current is None or current == str(budget):
        return ""
    if budget_rank(budget) > budget_rank(current):
        demote(out_dir, table.id, current)
        return ""
    return f".{budget}"


def refresh_decisions(table: DictConfig, out_dir: str | Path = "results") -> list[Path]:
    """Rewrite the notes-and-decisions section of every rendered ``<id>*.md`` from the table config,
    leaving the measured cells, figures and headers as rendered. Run folders do not survive between
    sessions here, so a decision written after its measurement (which cites that measurement) would
    otherwise reach the published table only by rerunning it."""
    section = decisions_section(table)
    changed = []
    for md in sorted(Path(out_dir).glob(f"{table.id}*.md")):
        if md.stem != table.id and not md.stem.startswith(f"{table.id}."):
            continue  # another table whose id starts with this one's (rlra-1 vs rlra-10)
        lines = md.read_text().split("\n")
        if DECISIONS_HEADING not in lines:
            continue
        start = lines.index(DECISIONS_HEADING)
        end = start + 2
        while end < len(lines) and lines[end].startswith("- "):
            end += 1
        updated = "\n".join(lines[:start] + section + lines[end:])
        if updated != "\n".join(lines):
            write_text(md, updated)
            changed.append(md)
    return changed


def write_table(table: DictConfig, budget: str, cells: list[Cell], out_dir: str | Path = "results") -> tuple[Path, str]:
    """Render the table at ``budget`` into ``out_dir`` (see the module docstring for the layout);
    returns the md written and its text."""
    if table.get("compute"):  # computed from the models, nothing trained (bench/results/computed.py)
        from bench.results.computed import COMPUTED

        records = COMPUTED.get(str(table.compute))(table, budget)
    else:
        if OmegaConf.select(table, "metric.class_distance") is not None:  # a trained layer's class distances
            from bench.results.latents import add_class_distances

            add_class_distances(table, cells)
        records = aggregate(table, cells)
    text = render_markdown(table, budget, records, cells)
    out_dir = Path(out_dir)
    suffix = result_suffix(out_dir, table, budget)
    if suffix:
        lines = text.split("\n")
        lines.insert(2, f"- **not the headline**: [`{table.id}.md`]({table.id}.md) holds the larger "
                        f"`{headline_budget(out_dir, table.id)}` budget; this file is the `{budget}` render beside it")
        text = "\n".join(lines)
    pngs, points = render_figures(table, records, cells, out_dir, suffix, budget)
    for png in pngs:
        text += f"\n![{png.stem}](plots/{png.name})\n"
    latents = f"{table.id}-latents{suffix}.csv"
    if any(str(spec.get("kind")) == "tsne" for spec in figure_specs(table)) and (out_dir / latents).exists():
        text += (f"\nHow well each run's top latent layer separates the classes (silhouette by true class, "
                 f"5-NN accuracy): [{latents}]({latents}).\n")
    if points:  # the curves as numbers, beside the PNGs
        curves = f"{table.id}-curves{suffix}.csv"
        write_csv(out_dir / curves, [{"budget": budget, **p} for p in points])
        text += f"\nThe plotted curves as numbers: [{curves}]({curves}).\n"
    md = out_dir / f"{table.id}{suffix}.md"
    write_text(md, text)
    write_csv(out_dir / f"{table.id}{suffix}.csv", [{"budget": budget, **r} for r in records])
    if not suffix:  # the headline changed: the README's measured numbers follow it
        from bench.results.readme import refresh_if_repo_results

        refresh_if_repo_results(out_dir)
    return md, text
