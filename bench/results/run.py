"""Reading a run folder: ``config.yaml``, ``metrics.csv`` (one row per epoch), ``probe.csv``,
``summary.json`` and ``last.ckpt``, which :class:`bench.run.recorder.RunRecorder` writes (every file
atomically), and the provenance (commit, device) a summary or a rendered table records.
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from omegaconf import OmegaConf

from bench.config import config_hash
from bench.results.io import read_json

FINAL_STATUSES = ("finished", "diverged", "failed")
CKPT_KEY = "bench"  # our entry in a Lightning checkpoint: {"config_hash": ...}


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(trainer=None) -> str:
    """The run's device (a Lightning ``Trainer``'s root device), else this machine's CPU."""
    import torch

    if trainer is not None and trainer.strategy.root_device.type == "cuda":
        return torch.cuda.get_device_name(trainer.strategy.root_device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def best_epoch(rows: list[dict], key: str = "val/err1") -> dict:
    """The epoch (1-based) with the lowest validation error and that error, as rlra Table 3 reports
    them ("valid err" and "best epoch"); empty when no epoch was validated."""
    scored = [(float(r[key]), i + 1) for i, r in enumerate(rows) if r.get(key) not in (None, "")]
    if not scored:
        return {}
    err, epoch = min(scored)  # ties: the earlier epoch
    best = {"best/val_err1": err, "best/epoch": float(epoch)}
    # a language model: the best validation perplexity and its epoch (GrAPE Table 3 reports it)
    ppl = [(float(r["val/ppl"]), i + 1) for i, r in enumerate(rows) if r.get("val/ppl") not in (None, "")]
    if ppl:
        value, at = min(ppl)
        best.update({"best/val_ppl": value, "best/ppl_epoch": float(at)})
    return best


def holds_config(run_dir: str | Path, digest: str) -> bool:
    """Whether the run folder's saved ``config.yaml`` (if any) has the config hash ``digest`` (the
    run's :attr:`bench.run.plan.RunPlan.config_hash`); a folder without one holds no other config."""
    saved = Path(run_dir) / "config.yaml"
    return not saved.exists() or config_hash(OmegaConf.load(saved)) == digest


def read_summary(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / "summary.json"
    return read_json(path) if path.exists() else None
