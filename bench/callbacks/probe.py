"""Alignment probe: every ``probe.every`` steps, compare the rule with backprop on the same step.

It runs at ``on_before_optimizer_step``: the rule's ``.grad`` is set and the weights are those the
update was computed from. The true gradient comes from switching the rule off in place
(``AlgorithmModule.true_gradient``) and ``torch.autograd.grad`` into fresh tensors — no model
copy, ``.grad`` untouched. The step's RNG state is replayed so dropout masks match, and norm-layer
running statistics are restored so probing never changes training.

Logged per probe to every logger, kept per probe in ``probe.csv`` and as epoch means in
``metrics.csv`` of the run folder:
  align/update/<layer>      ∠(rule ΔW, BP ∂L/∂W) in degrees       (0 for BP)
  align/ratio/<layer>       ‖rule ΔW‖ / ‖BP ∂L/∂W‖                 (Moskovitz et al. Fig. 2)
  align/signal/<point>      mean over samples of ∠(δh_i, ∂L/∂h_i)  (Launay et al. Eq. 6)
  align/signal_std/<point>  its std over the batch
  align/signal_cos/<point>  mean (and ``_std``) over samples of the cosine of that angle (Launay Tables 2, 4)
  align/wb/<layer>          ∠(W, B) for rules with a per-layer feedback tensor
With ``probe.sign_flips`` on, every probe and every epoch end also records the cumulative
fraction of weights that changed sign since initialisation (sfa Fig. 5;
:mod:`bench.metrics.sign_flips`): ``signs/flipped/<layer>`` and ``signs/flipped_all``. They
are cumulative, so their ``metrics.csv`` value is the epoch's last, not its mean.
"""
from __future__ import annotations

import time

import torch

from bench.callbacks.sign_flips import SignFlipTracking
from bench.feedback.restore import restoring
from bench.metrics.alignment import angle_deg, norm_ratio, per_sample_angles_deg
from bench.metrics.gradients import layer_weights, loss_gradients
from bench.models.base import is_language_model


def preserved_buffers(model: torch.nn.Module):
    """Every (non-mask) buffer of ``model`` restored on exit: the replay must not move BN statistics."""
    return restoring(b for b in model.buffers() if b.dtype != torch.bool)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batch_mean_std(trainer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) std of per-sample values over the global batch: under DDP each rank
    holds its slice, so the moments are summed over ranks, and 2 ranks at batch b report what
    one process at batch 2b does."""
    if trainer.world_size == 1:
        return x.mean(), (x.std() if x.numel() > 1 else x.new_zeros(()))
    x = x.double()
    n, s, sq = trainer.strategy.reduce(torch.stack([x.new_tensor(float(x.numel())), x.sum(), (x * x).sum()]),
                                       reduce_op="sum")
    mean = s / n
    var = (sq - n * mean * mean) / (n - 1) if n > 1 else x.new_zeros(())
    return mean, var.clamp_min(0.0).sqrt()


class AlignmentProbe(SignFlipTracking):
    """Measures a step the rule prepared for it: the rule's public side is
    :attr:`~bench.algorithms.base.AlgorithmModule.probe_requested` (this step is one to measure)
    and :meth:`~bench.algorithms.base.AlgorithmModule.probe_step` (its batch and RNG state)."""

    def __init__(self):
        super().__init__()
        self.records: list[dict] = []

    def state_dict(self):
        return {"records": self.records, **self.sign_flip_state()}

    def load_state_dict(self, state):
        self.records = list(state.get("records", []))
        self.load_sign_flip_state(state)

    def record(self, trainer, pl_module, values: dict[str, float]) -> None:
        """Log one row to every logger (rank 0) and keep it for ``probe.csv`` and the epoch means."""
        # Straight to the loggers: self.log's epoch aggregation costs per key per call (architecture decision 5),
        # which at ~30 keys was most of the probe's time. Epoch means come from epoch_means().
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=int(pl_module.global_step))
        self.records.append({"step": int(pl_module.global_step), "epoch": int(trainer.current_epoch), **values})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not pl_module.probe_requested:
            return
        device = pl_module.device
        _sync(device)
        start = time.perf_counter()
        values = self.measure(trainer, pl_module)
        if self.sign_flips is not None:
            values.update(self.sign_flips.fractions())
        self.record(trainer, pl_module, values)
        _sync(device)
        pl_module.probe_seconds += time.perf_counter() - start

    def epoch_means(self, epoch: int) -> dict[str, float]:
        """Mean of every probe quantity over the probes taken in ``epoch`` (the metrics.csv row);
        for the cumulative sign-flip fractions, the epoch's last value."""
        rows = [r for r in self.records if r["epoch"] == epoch]
        keys = dict.fromkeys(k for r in rows for k in r if k.startswith("align/"))  # forward order, as probed
        means = {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in keys}
        for r in rows:  # records are in step order: the last one wins
            means.update({k: v for k, v in r.items() if k.startswith("signs/")})
        return means

    @staticmethod
    def weights(pl_module) -> list[tuple[str, torch.nn.Parameter]]:
        """Layer weights (matrices and kernels); biases and norm scales are left out of the report."""
        return layer_weights(pl_module.model)

    def measure(self, trainer, pl_module) -> dict[str, float]:
        step = pl_module.probe_step()
        x, y = step.x, step.y
        tap = pl_module.tap
        named = self.weights(pl_module)
        rule_grads = [p.grad for _, p in named]
        rule_signals = [h.grad for h in tap.outputs] if (tap is not None and tap.outputs) else []
        with step.replayed_rng(), preserved_buffers(pl_module.model):
            bp_grads, bp_signals = loss_gradients(pl_module, x, y, [p for _, p in named], true=True)
        if trainer.world_size > 1:  # the rule's .grad is already averaged over ranks
            bp_grads = [trainer.strategy.reduce(g, reduce_op="mean") if g is not None else None for g in bp_grads]

        values: dict[str, torch.Tensor] = {}
        for (name, _), g_rule, g_bp in zip(named, rule_grads, bp_grads):
            if g_rule is None or g_bp is None:
                continue
            layer = name.removesuffix(".weight")
            values[f"align/update/{layer}"] = angle_deg(g_rule, g_bp)
            values[f"align/ratio/{layer}"] = norm_ratio(g_rule, g_bp)
        names = tap.names if tap is not None else []
        for point, s_rule, s_bp in zip(names, rule_signals, bp_signals):
            if s_rule is None or s_bp is None:
                continue
            if is_language_model(pl_module.model):  # (B, T, d): one angle per token, mean and std over the batch's tokens
                s_rule, s_bp = s_rule.reshape(-1, s_rule.shape[-1]), s_bp.reshape(-1, s_bp.shape[-1])
            angles = per_sample_angles_deg(s_rule, s_bp)
            values[f"align/signal/{point}"], values[f"align/signal_std/{point}"] = batch_mean_std(trainer, angles)
            # Launay et al. report the cosine itself (Tables 2 and 4): mean and std over the batch
            cosines = torch.cos(torch.deg2rad(angles))
            values[f"align/signal_cos/{point}"], values[f"align/signal_cos_std/{point}"] = batch_mean_std(trainer, cosines)
        for layer, (w, b) in pl_module.feedback_weight_pairs().items():
            values[f"align/wb/{layer}"] = angle_deg(w.detach(), b)
        if not values:
            return {}
        # one device→host transfer for all of them
        return dict(zip(values, torch.stack(list(values.values())).tolist()))

