"""Writing a run folder while the run trains: ``config.yaml``, ``metrics.csv`` (one row per epoch),
``probe.csv``, ``summary.json`` and ``last.ckpt``, every file atomically (the folder is read by
:mod:`bench.results.run`).

:class:`RunRecorder` is a Lightning ``Checkpoint`` callback: Lightning calls checkpoint callbacks
*after* the LightningModule's epoch-end hook, which is when the epoch's train metrics exist,
and checkpointing each epoch is its job anyway (resume loses at most the current epoch).
"""
from __future__ import annotations

import math
import os
import random
import traceback
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint
from omegaconf import OmegaConf

from bench.results.io import write_csv, write_json, write_text
from bench.results.run import CKPT_KEY, best_epoch, device_name, git_commit
from bench.run.plan import RunPlan


def _plain(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    return value


class RunRecorder(Checkpoint):
    def __init__(self, plan: RunPlan, probe=None, timer=None, checkpoint: bool = True, guard=None):
        self.plan, self.run_dir, self.cfg = plan, plan.run_dir, plan.cfg
        self.probe, self.timer, self.checkpoint = probe, timer, checkpoint
        self.guard = guard  # DivergenceGuard: where and why a diverged run stopped
        self.rows: list[dict] = []

    @property
    def ckpt_path(self) -> Path:
        return self.run_dir / "last.ckpt"

    def state_dict(self):
        # Python's and NumPy's generators are seeded by seed_everything but, unlike torch's (saved
        # by the rule base), not saved by Lightning; a rule or model that draws from them would
        # otherwise resume on another stream. Plain lists and ints: Lightning loads checkpoints
        # with weights_only=True, which refuses NumPy arrays.
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        return {"rows": self.rows, "rng_python": random.getstate(),
                "rng_numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]}

    def load_state_dict(self, state):
        import numpy as np

        self.rows = list(state.get("rows", []))
        if "rng_python" in state:
            random.setstate(state["rng_python"])
        if "rng_numpy" in state:
            kind, keys, pos, has_gauss, gauss = state["rng_numpy"]
            np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))

    def on_fit_start(self, trainer, pl_module):
        # Lightning restores callback state before this hook. On a resume the checkpoint's rows
        # are the record: the files may hold an epoch the checkpoint does not (a kill between the
        # CSV write and the checkpoint rename), which is trained again.
        if trainer.is_global_zero and trainer.ckpt_path is not None:
            self._write_tables()

    def _write_tables(self):
        write_csv(self.run_dir / "metrics.csv", self.rows)
        if self.probe is not None and self.probe.records:
            write_csv(self.run_dir / "probe.csv", self.probe.records)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        # train() compares this with the run's config before resuming: a checkpoint copied in
        # from another config is refused with one line instead of a state-dict traceback.
        checkpoint[CKPT_KEY] = {"config_hash": self.plan.config_hash}

    def setup(self, trainer, pl_module, stage):
        if trainer.is_global_zero and stage == "fit":
            # A kill between a temp write and its rename leaves the temp file; the real file is
            # intact, so the leftover is garbage, never state.
            for stale in self.run_dir.glob(".*.tmp"):
                stale.unlink(missing_ok=True)
            write_text(self.run_dir / "config.yaml", OmegaConf.to_yaml(self.cfg))

    def on_train_epoch_end(self, trainer, pl_module):
        row = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        row.update({k: _plain(v) for k, v in sorted(trainer.callback_metrics.items())})
        if self.probe is not None:
            row.update(self.probe.epoch_means(trainer.current_epoch))
        self.rows.append(row)
        if trainer.is_global_zero:
            self._write_tables()
        if self.checkpoint:
            # Lightning saves on rank 0 only; write to a temp name and rename, so a kill never
            # leaves a truncated checkpoint behind.
            tmp = self.run_dir / ".last.ckpt.tmp"
            trainer.save_checkpoint(tmp, weights_only=False)
            if trainer.is_global_zero:
                # fsync before the rename: after a machine crash (not only a kill) the name must
                # not point at blocks that never reached the disk.
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, self.ckpt_path)
        if trainer.is_global_zero:
            self.write_summary(trainer, pl_module, "running")

    def on_exception(self, trainer, pl_module, exception):
        # An interruption is not a failure: Ctrl-C, or SIGTERM from the sweep runner, a scheduler
        # or `kill` (Lightning raises SIGTERMException, a SystemExit). The summary stays "running",
        # so the next invocation resumes from last.ckpt instead of skipping the run as failed.
        if trainer.is_global_zero and not isinstance(exception, (KeyboardInterrupt, SystemExit)):
            self.write_summary(trainer, pl_module, "failed",
                               error="".join(traceback.format_exception_only(type(exception), exception)).strip())

    def write_summary(self, trainer, pl_module, status: str, final: dict | None = None, error: str | None = None):
        epochs = self.timer.history if self.timer is not None else []
        epoch_times = [e["time/epoch_s"] for e in epochs]
        summary = {
            "status": status,
            "run": str(self.run_dir),
            "table": self.cfg.table, "row": self.cfg.row, "column": self.cfg.column,
            "budget": self.cfg.budget, "seed": int(self.cfg.seed),
            "algorithm": self.cfg.algorithm.name, "model": self.cfg.model.name, "data": self.cfg.data.name,
            "epochs_done": len(self.rows),
            "last_epoch": self.rows[-1] if self.rows else {},
            "final": final or {},
            "best": best_epoch(self.rows),
            "time": {
                "epoch_s_mean": sum(epoch_times) / len(epoch_times) if epoch_times else None,
                "epoch_s": epoch_times,
                "step_median_ms": epochs[-1]["time/step_median_ms"] if epochs else None,
                # from the (checkpointed) timer history, so a resumed run counts its earlier epochs
                "probe_s_total": sum(e["time/probe_s"] for e in epochs) if epochs else None,
            },
            "memory": {"peak_mb": max((e["mem/peak_mb"] for e in epochs), default=None)},
            "git_commit": git_commit(),
            "torch": torch.__version__,
            "lightning": L.__version__,
            "device": device_name(trainer),
            "world_size": trainer.world_size if trainer is not None else 1,
            # replaced-backward rules report the layers they converted
            "converted_layers": list(getattr(pl_module, "converted", []) or []),
        }
        tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
        if tokenizer:  # a text corpus: the tokenizer actually used (library and kind, vocabulary, config hash, file)
            summary["tokenizer"] = dict(tokenizer)
        if error:
            summary["error"] = error
        if status == "diverged" and self.guard is not None and self.guard.record:
            summary["divergence"] = dict(self.guard.record)  # step, epoch, quantity, last finite loss
        write_json(self.run_dir / "summary.json", summary)
        return summary
