"""A run's identity, computed once: its config, name, config hash and folder.

:meth:`RunPlan.of` is called right after ``compose`` (by ``bench run``, by :func:`bench.run.cells.expand`
for every cell of a table, by :func:`bench.run.train.train` for a bare config) and the plan is what
travels from there: to the folder checks, the skip/resume decision, the checkpoint's config tag,
the W&B run name and the printed lines. Torch-free, so the CLI can make it before importing torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from bench.config import config_hash, run_name


@dataclass(frozen=True)
class RunPlan:
    cfg: DictConfig
    run_name: str  # bench.config.run_name: <budget>/<table>/<row>/<column>/s<seed>, or adhoc/…-<hash>/s<seed>
    config_hash: str  # bench.config.config_hash: what the run computes (where it goes and how fast excluded)
    run_dir: Path  # <output.root>/<run_name>, unless the caller names another folder

    @classmethod
    def of(cls, cfg: DictConfig, run_dir: str | Path | None = None) -> RunPlan:
        from bench.options import check_training_set

        check_training_set(cfg.data)
        digest = config_hash(cfg)
        name = run_name(cfg, digest)
        return cls(cfg, name, digest, Path(run_dir) if run_dir is not None else Path(cfg.output.root) / name)
