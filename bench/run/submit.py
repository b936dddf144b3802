"""SLURM route: submit a table's pending cells through submitit, one array task per run.

``python -m bench submit <id> --slurm partition=… nodes=… gpus_per_node=… [time_min=…]`` expands
the same grid as ``bench sweep --local`` and submits each pending cell as one task of a job array.
A task runs ``bench run`` for its cell (the same command as the local runner and W&B agents)
with ``gpus_per_node`` processes per node, which is what Lightning's SLURM environment needs for
DDP: ``trainer.devices = gpus_per_node``, ``trainer.num_nodes = nodes``, ``strategy = ddp``.

Preemption and time limits: submitit signals the job before it is killed and calls
:meth:`RunJob.checkpoint`, which requeues the same command; the run then resumes from its last
epoch checkpoint (``last.ckpt``, written every epoch), so at most the current epoch is lost.
"""
from __future__ import annotations

import sys
from pathlib import Path

from bench.config import ConfigError
from bench.run.cells import Cell

# key: (type, submitit parameter). Values are checked before anything is submitted.
SLURM_KEYS = {
    "partition": (str, "slurm_partition"),
    "nodes": (int, "nodes"),
    "gpus_per_node": (int, "gpus_per_node"),
    "cpus_per_task": (int, "cpus_per_task"),
    "time_min": (int, "timeout_min"),
    "mem_gb": (int, "mem_gb"),
    "account": (str, "slurm_account"),
    "qos": (str, "slurm_qos"),
    "constraint": (str, "slurm_constraint"),
    "array_parallelism": (int, "slurm_array_parallelism"),
}
REQUIRED = ("partition", "nodes", "gpus_per_node")


def parse_slurm(items: list[str]) -> dict:
    """``["partition=gpu", "nodes=2", …]`` → typed dict; a malformed item is one ConfigError line."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--slurm: expected key=value, got {item!r}; keys: {', '.join(SLURM_KEYS)}")
        key, value = item.split("=", 1)
        if key not in SLURM_KEYS:
            raise ConfigError(f"--slurm: unknown key {key!r}; valid keys: {', '.join(SLURM_KEYS)}")
        kind = SLURM_KEYS[key][0]
        if kind is int:
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"--slurm {key}: expected a positive integer, got {value!r}")
            out[key] = int(value)
        else:
            if not value or any(c.isspace() for c in value):
                raise ConfigError(f"--slurm {key}: expected a non-empty word, got {value!r}")
            out[key] = value
    missing = [k for k in REQUIRED if k not in out]
    if missing:
        raise ConfigError(f"--slurm: missing {', '.join(missing)} (e.g. partition=gpu nodes=1 gpus_per_node=8)")
    return out


def executor_parameters(slurm: dict) -> dict:
    params = {SLURM_KEYS[k][1]: v for k, v in slurm.items()}
    # One task per GPU: Lightning's SLURMEnvironment maps SLURM_PROCID/SLURM_LOCALID to ranks.
    params["tasks_per_node"] = slurm["gpus_per_node"]
    params.setdefault("timeout_min", 24 * 60)
    return params


def cell_args(cell: Cell, slurm: dict | None, overrides: list[str]) -> list[str]:
    """``bench run`` arguments of a cell; with ``slurm``, the DDP layout of the allocation."""
    from bench.config import slug

    cfg = cell.cfg
    args = [f"table={cfg.table}", f"row={slug(cell.row)}", f"column={slug(cell.column)}", f"budget={cfg.budget}",
            f"seed={cell.seed}", f"output.root={Path(cfg.output.root).resolve()}", "output.progress=none"]
    if slurm is not None:
        args += ["trainer.accelerator=gpu", f"trainer.devices={slurm['gpus_per_node']}",
                 f"trainer.num_nodes={slurm['nodes']}", "trainer.strategy=ddp"]
    return args + list(overrides)


class RunJob:
    """The submitted callable: ``bench run <args>`` in the job; requeued as is on preemption."""

    def __call__(self, args: list[str]) -> dict:
        from bench.cli import main

        try:
            summary = main(["run", *args])  # the run's summary (None for a cell its row does not run)
        except SystemExit as exc:
            if exc.code not in (0, None):
                raise RuntimeError(f"bench run {' '.join(args)} exited with status {exc.code}") from None
            summary = None
        return summary or {}

    def checkpoint(self, args: list[str]):
        import submitit

        # The run checkpoints every epoch; resubmitting the same command resumes it.
        return submitit.helpers.DelayedSubmission(RunJob(), args)


def submit(cells: list[Cell], executor, slurm: dict | None = None, overrides: list[str] = (),
           retry_failed: bool = False) -> list:
    """Submit every pending cell (and failed ones with ``retry_failed``) as one job array."""
    todo = [c for c in cells if c.status == "pending" or (retry_failed and c.status == "failed")]
    if not todo:
        return []
    with executor.batch():
        jobs = [executor.submit(RunJob(), cell_args(c, slurm, overrides)) for c in todo]
    return jobs


def make_executor(folder: Path, slurm: dict | None, job_name: str):
    import submitit

    if slurm is None:
        executor = submitit.LocalExecutor(folder=folder, python=sys.executable)
        executor.update_parameters(timeout_min=24 * 60)
        return executor
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(name=job_name, **executor_parameters(slurm))
    return executor
