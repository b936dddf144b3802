"""Train-only wall-clock per epoch, median step time and peak memory (docs/architecture.md).

Epoch time runs from the epoch's start to the end of its last training batch, so validation is
excluded; probe time is subtracted (the probe reports it separately). CUDA is synchronised
before every clock read. Under DDP the epoch time is the maximum over ranks.
"""
from __future__ import annotations

import resource
import statistics
import time

import torch
from lightning.pytorch.callbacks import Callback

from bench.models.base import is_language_model


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class EpochTimer(Callback):
    def __init__(self):
        self.history: list[dict] = []

    def state_dict(self):
        return {"history": self.history}

    def load_state_dict(self, state):
        self.history = list(state.get("history", []))

    def _now(self, pl_module) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._steps: list[float] = []
        self._tokens = 0  # target tokens trained on this epoch (language models: token ids in)
        self._probe_at_start = pl_module.probe_seconds
        self._start = self._end = self._now(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch_start = self._now(pl_module)
        self._probe_at_batch = pl_module.probe_seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._end = self._now(pl_module)
        self._steps.append(self._end - self._batch_start - (pl_module.probe_seconds - self._probe_at_batch))
        if is_language_model(pl_module.model):
            self._tokens += batch[1].numel()

    def on_train_epoch_end(self, trainer, pl_module):
        probe_s = pl_module.probe_seconds - self._probe_at_start
        epoch_s = self._end - self._start - probe_s
        epoch_s = float(trainer.strategy.reduce(torch.tensor(epoch_s, device=pl_module.device), reduce_op="max"))
        values = {
            "time/epoch_s": epoch_s,
            "time/step_median_ms": 1000.0 * statistics.median(self._steps) if self._steps else float("nan"),
            "time/probe_s": probe_s,
            "mem/peak_mb": peak_memory_mb(pl_module.device),
        }
        if self._tokens:  # training tokens per second of train-only time, over all ranks
            tokens = float(trainer.strategy.reduce(torch.tensor(float(self._tokens), device=pl_module.device), reduce_op="sum"))
            values["time/tokens_per_s"] = tokens / epoch_s if epoch_s > 0 else float("nan")
            values["data/tokens"] = tokens
        pl_module.log_dict(values, on_epoch=True, sync_dist=False)
        self.history.append({"epoch": trainer.current_epoch, **values})
