"""Reproduce a paper table: expand rows × columns × seeds, run what is missing, render the result.

Each cell of ``results/<id>.md`` reads ``paper → measured ± std (Δ)``; the header states the
budget and device so a smoke number is never mistaken for a reproduction. A row whose rule does
not exist yet reads ``not implemented``; a column whose data cannot be found reads
``data unavailable`` while the other cells still run.
"""
from __future__ import annotations

import datetime as dt
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from bench.config import compose, load_table, run_name, table_budget
from bench.results.io import write_csv, write_text
from bench.results.run import device_name, git_commit, read_summary

NOT_IMPLEMENTED = "not implemented"
DATA_UNAVAILABLE = "data unavailable"


@dataclass
class Cell:
    row: str
    column: str
    seed: int
    cfg: DictConfig | None = None
    status: str = "pending"  # pending | finished | diverged | failed | not implemented | data unavailable
    summary: dict = field(default_factory=dict)
    reason: str = ""

    @property
    def label(self) -> str:
        return f"{self.row} / {self.column} / s{self.seed}"


def row_algorithm(table: DictConfig, row: str) -> str:
    common = table.get("common") or {}
    return str(OmegaConf.select(table.rows[row], "algorithm.name", default=None)
               or OmegaConf.select(OmegaConf.create(common), "algorithm.name", default="bp"))


def expand(table_id: str, budget: str, output_root: str | None = None, overrides: list[str] = (),
           rows: list[str] | None = None, seeds: int | None = None) -> tuple[DictConfig, list[Cell]]:
    """All cells of a table at a budget, with their resolved configs (validated up front)."""
    from bench.algorithms import RULES  # import here: rendering a table needs no torch import chain

    table = load_table(table_id)
    cells = []
    if table.get("compute"):
        return table, cells
    for row in table.rows:
        if rows and row not in rows:
            continue
        _, scalars = table_budget(table, budget, table.rows[row])
        n_seeds = seeds or int(scalars.get("seeds", 1))
        for column in table.columns:
            for seed in range(n_seeds):
                cell = Cell(row, column, seed)
                algorithm = row_algorithm(table, row)
                if algorithm not in RULES:
                    cell.status, cell.reason = NOT_IMPLEMENTED, f"rule {algorithm!r} is not implemented yet"
                else:
                    extra = [f"seed={seed}"] + ([f"output.root={output_root}"] if output_root else []) + list(overrides)
                    cell.cfg = compose(table_id, row, column, budget, extra)
                    summary = read_summary(Path(cell.cfg.output.root) / run_name(cell.cfg))
                    if summary and summary["status"] in ("finished", "diverged", "failed"):
                        cell.status, cell.summary = summary["status"], summary
                cells.append(cell)
    return table, cells


def run_cells(cells: list[Cell], train_fn: Callable[[DictConfig], dict], progress=None,
              retry_failed: bool = False) -> None:
    """Run every pending cell in order; one failing cell never stops the others."""
    from bench.data import DataUnavailable

    unavailable: dict[str, str] = {}
    for cell in cells:
        if cell.status == "failed" and retry_failed:
            cell.status = "pending"
        if cell.status != "pending":
            if progress:
                progress(cell)
            continue
        data_name = str(cell.cfg.data.name)
        if data_name in unavailable:
            cell.status, cell.reason = DATA_UNAVAILABLE, unavailable[data_name]
        else:
            try:
                cell.summary = train_fn(cell.cfg)
                cell.status = cell.summary.get("status", "failed")
                cell.reason = cell.summary.get("error", "")
            except DataUnavailable as exc:
                unavailable[data_name] = str(exc)
                cell.status, cell.reason = DATA_UNAVAILABLE, str(exc)
            except Exception as exc:  # noqa: BLE001 - recorded in the table, the other cells go on
                cell.status, cell.reason = "failed", f"{type(exc).__name__}: {exc}"
        if progress:
            progress(cell)


# --------------------------------------------------------------------------- rendering

def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def lookup(summary: dict, field_key: str):
    """A summary value: final test/train metrics first, then the last epoch's row (alignment,
    timing). ``align/signal_cos/@1`` means the second feedback point in forward order, whatever
    its module name (a BatchNorm or Dropout shifts the names, not the order)."""
    values = {**summary.get("last_epoch", {}), **summary.get("final", {})}
    if "@" in field_key:
        prefix, index = field_key.split("@")
        keys = sorted((k for k in values if k.startswith(prefix) and "/" not in k[len(prefix):]), key=natural_key)
        position = int(index) if index != "last" else -1
        if not keys or (position >= len(keys)):
            return None
        field_key = keys[position]
    value = values.get(field_key)
    return None if value in (None, "") else float(value)


def measured_values(cells: list[Cell], field_key: str) -> list[float]:
    return [v for c in cells if c.status == "finished" and (v := lookup(c.summary, field_key)) is not None]


def aggregate(table: DictConfig, cells: list[Cell]) -> list[dict]:
    """One record per (row, column, field): paper value, measured mean/std, Δ, status."""
    fields = dict(table.get("metric", {}).get("fields", {"test": "test/err1"}))
    records = []
    for row in table.rows:
        paper_row = table.rows[row].get("paper") or {}
        for column in table.columns:
            group = [c for c in cells if c.row == row and c.column == column]
            if not group:
                continue
            statuses = {c.status for c in group}
            for name, key in fields.items():
                paper = OmegaConf.select(OmegaConf.create(paper_row), f"{column}.{name}", default=None)
                values = measured_values(group, key)
                mean = statistics.fmean(values) if values else None
                std = statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)
                status = "finished" if values else next(
                    (s for s in ("not implemented", "data unavailable", "diverged", "failed", "pending") if s in statuses),
                    "pending")
                records.append({
                    "row": row, "column": column, "field": name, "paper": paper,
                    "measured_mean": mean, "measured_std": std, "seeds": len(values),
                    "delta": (mean - float(paper)) if (mean is not None and paper is not None) else None,
                    "status": status,
                    "reason": next((c.reason for c in group if c.reason), ""),
                })
    return records


def cell_text(rec: dict, digits: int = 2) -> str:
    paper = _fmt(rec["paper"], digits) if rec["paper"] is not None else "–"
    if rec["status"] != "finished":
        return f"{paper} → *{rec['status']}*"
    std = f" ± {_fmt(rec['measured_std'], digits)}" if rec["seeds"] > 1 else ""
    delta = f" ({rec['delta']:+.{digits}f})" if rec["delta"] is not None else ""
    return f"{paper} → **{_fmt(rec['measured_mean'], digits)}**{std}{delta}"


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
        *(["- **computed from the models with one dry forward, nothing trained**: exact at every budget"]
          if table.get("compute") else [
            f"- **budget: `{budget}`**" + (" — a smoke run proves the pipeline, it is **not** a reproduction" if budget == "smoke" else ""),
            f"- epochs trained: {', '.join(map(str, epochs)) or '–'}; seeds per cell: up to {max([r['seeds'] for r in records] or [0])}"]),
        f"- device: {'; '.join(devices)}",
        f"- rendered {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC} from commit `{git_commit()[:10]}`",
        f"- cells read `paper → measured ± std (Δ measured − paper)`, {table.get('metric', {}).get('name', 'metric')} in {unit or 'the paper’s unit'}; paper numbers are quoted from the paper, never measured here",
        "",
    ]
    for col in columns:  # a budget may run a column on a stand-in dataset: say so up front
        declared = OmegaConf.select(table.columns[col], "data.name", default=None)
        used = sorted({str(c.cfg.data.name) for c in cells if c.column == col and c.cfg is not None})
        if declared and used and used != [declared]:
            lines.insert(-1, f"- **column `{col}` runs on `{', '.join(used)}` at this budget** — a stand-in for "
                             f"`{declared}`, so its numbers are not comparable with the paper's")
    header = ["row"] + [f"{col} {f}" for col in columns for f in fields]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    by_key = {(r["row"], r["column"], r["field"]): r for r in records}
    for row in table.rows:
        cells_txt = []
        for col in columns:
            for f in fields:
                rec = by_key.get((row, col, f))
                cells_txt.append(cell_text(rec, int(table.get("metric", {}).get("digits", 2))) if rec else "–")
        lines.append("| " + " | ".join([row] + cells_txt) + " |")
    lines += diagnostics_section(cells)
    reasons = sorted({(r["status"], r["reason"]) for r in records if r["status"] != "finished" and r["reason"]})
    if reasons:
        lines += ["", "## Why cells are empty", ""] + [f"- *{s}*: {why}" for s, why in reasons]
    notes = table.get("notes")
    decisions = table.get("decisions")
    if notes or decisions:
        lines += ["", "## Protocol notes and decisions", ""]
        lines += [f"- {n}" for n in (notes or [])] + [f"- {d}" for d in (decisions or [])]
    return "\n".join(lines) + "\n"


def natural_key(name: str) -> list:
    """'net.11' after 'net.3': layer names in forward order."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


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
        layers = sorted((k for k, v in last.items() if k.startswith("align/update/") and v not in ("", None)), key=natural_key)
        angles = [f"{float(last[k]):.1f}" for k in layers]
        lines.append(f"| {c.row} | {c.column} | {_fmt(t.get('epoch_s_mean'))} | {_fmt(t.get('step_median_ms'), 3)} | "
                     f"{_fmt(c.summary.get('memory', {}).get('peak_mb'), 0)} | {' / '.join(angles) or '–'} |")
    return lines


def plot_figure(table: DictConfig, records: list[dict], cells: list[Cell], path: Path) -> tuple[Path, list[int]]:
    """A paper figure whose points are table rows: x is a config value of each row (``figure.x``),
    one panel per field in ``figure.series``, one line per column; error bars are the seed std.
    Returns the PNG's path and the number of lines drawn in each panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = table.figure
    x_of = {}
    for c in cells:
        if c.cfg is not None:
            x_of[c.row] = float(OmegaConf.select(c.cfg, str(spec.x)))
    series = list(spec.series)
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.6), squeeze=False)
    for ax, name in zip(axes[0], series):
        for column in table.columns:
            points = sorted((x_of[r["row"]], r["measured_mean"], r["measured_std"] or 0.0) for r in records
                            if r["column"] == column and r["field"] == name and r["measured_mean"] is not None)
            if points:
                xs, ys, errs = zip(*points)
                used = sorted({str(c.cfg.data.name) for c in cells if c.column == column and c.cfg is not None})
                declared = OmegaConf.select(table.columns[column], "data.name", default=column)
                label = column if used == [declared] else f"{column} (run on {', '.join(used)}: stand-in)"
                ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=label)
        ax.set_xlabel(str(spec.get("x_label", spec.x)))
        ax.set_ylabel(str(spec.get("labels", {}).get(name, name)))
        if spec.get("log_x"):
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    lines = [len(ax.containers) for ax in axes[0]]  # errorbar() adds one container per line
    fig.suptitle(f"{table.id}: {spec.get('title', table.title)}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path, lines


def write_table(table: DictConfig, budget: str, cells: list[Cell], out_dir: str | Path = "results") -> tuple[Path, str]:
    if table.get("compute"):  # computed from the models, nothing trained (bench/results/computed.py)
        from bench.results.computed import COMPUTED

        records = COMPUTED.get(str(table.compute))(table)
    else:
        records = aggregate(table, cells)
    text = render_markdown(table, budget, records, cells)
    out_dir = Path(out_dir)
    if table.get("figure") and any(c.status == "finished" for c in cells):
        png, _ = plot_figure(table, records, cells, out_dir / "plots" / f"{table.id}.png")
        text += f"\n![{table.id}](plots/{png.name})\n"
    md = out_dir / f"{table.id}.md"
    write_text(md, text)
    write_csv(out_dir / f"{table.id}.csv", [{"budget": budget, **r} for r in records])
    return md, text
