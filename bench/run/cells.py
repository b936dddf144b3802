"""A paper table's cells: expand rows × columns × seeds into runs, each with its plan, and run the
missing ones in this process (``bench table``; ``bench sweep --local`` runs them as subprocesses,
:mod:`bench.run.sweep`).

A row whose rule does not exist yet is ``not implemented``; a column whose data cannot be found is
``data unavailable`` while the other cells still run. Rendering the cells is :mod:`bench.results.table`'s job.
Torch-free: expanding a table (to render it, or to check its folders) imports no torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from bench.config import compose, load_table, row_columns, run_name, table_budget
from bench.results.run import holds_config, read_summary
from bench.run.plan import RunPlan

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
    plan: RunPlan | None = None  # the run's name, hash and folder, made once by expand()

    @property
    def label(self) -> str:
        return f"{self.row} / {self.column} / s{self.seed}"

    @property
    def run_dir(self) -> Path:
        """Where the table expects the cell's run now (a summary's own ``run`` path may predate a move)."""
        if self.plan is not None:
            return self.plan.run_dir
        return Path(self.cfg.output.root) / run_name(self.cfg)  # a cell built by hand (tests)


def row_algorithm(table: DictConfig, row: str) -> str:
    common = table.get("common") or {}
    return str(OmegaConf.select(table.rows[row], "algorithm.name", default=None)
               or OmegaConf.select(OmegaConf.create(common), "algorithm.name", default="bp"))


def expand(table_id: str, budget: str, output_root: str | None = None, overrides: list[str] = (),
           rows: list[str] | None = None, seeds: int | None = None) -> tuple[DictConfig, list[Cell]]:
    """All cells of a table at a budget, with their resolved configs (validated up front) and plans."""
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
        for column in row_columns(table, row):
            for seed in range(n_seeds):
                cell = Cell(row, column, seed)
                algorithm = row_algorithm(table, row)
                if algorithm not in RULES:
                    cell.status, cell.reason = NOT_IMPLEMENTED, f"rule {algorithm!r} is not implemented yet"
                else:
                    extra = [f"seed={seed}"] + ([f"output.root={output_root}"] if output_root else []) + list(overrides)
                    cell.cfg = compose(table_id, row, column, budget, extra)
                    cell.plan = RunPlan.of(cell.cfg)
                    summary = read_summary(cell.plan.run_dir)
                    # a folder from another config (a default changed since) is not this cell's
                    # result: leave it pending, and training it then fails with the one-line
                    # "holds a run of a different config" instead of rendering stale numbers
                    if summary and summary["status"] in ("finished", "diverged", "failed") \
                            and holds_config(cell.plan.run_dir, cell.plan.config_hash):
                        cell.status, cell.summary = summary["status"], summary
                cells.append(cell)
    return table, cells


def run_cells(cells: list[Cell], train_fn: Callable[[RunPlan], dict], progress=None,
              retry_failed: bool = False) -> None:
    """Run every pending cell in order, ``train_fn(cell.plan)`` (:func:`bench.run.train.train`); one
    failing cell never stops the others. The caller has checked the cells' trainer values
    (``bench.cli.check_folders``), so a plan is not checked again."""
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
                cell.summary = train_fn(cell.plan or RunPlan.of(cell.cfg))
                cell.status = cell.summary.get("status", "failed")
                cell.reason = cell.summary.get("error", "")
            except DataUnavailable as exc:
                unavailable[data_name] = str(exc)
                cell.status, cell.reason = DATA_UNAVAILABLE, str(exc)
            except Exception as exc:  # noqa: BLE001 - recorded in the table, the other cells go on
                cell.status, cell.reason = "failed", f"{type(exc).__name__}: {exc}"
        if progress:
            progress(cell)
