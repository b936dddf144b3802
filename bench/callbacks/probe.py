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
:mod:`bench.callbacks.sign_flips`): ``signs/flipped/<layer>`` and ``signs/flipped_all``. They
are cumulative, so their ``metrics.csv`` value is the epoch's last, not its mean.
"""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext

import torch
from lightning.pytorch.callbacks import Callback

from bench.callbacks.sign_flips import SignFlips
from bench.metrics.alignment import angle_deg, norm_ratio, per_sample_angles_deg


@contextmanager
def preserved_buffers(model: torch.nn.Module):
    saved = [(b, b.detach().clone()) for b in model.buffers() if b.dtype != torch.bool]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, copy in saved:
                b.copy_(copy)


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


class AlignmentProbe(Callback):
    def __init__(self):
        self.records: list[dict] = []
        self.sign_flips: SignFlips | None = None
        self._sign_state: dict | None = None  # from a checkpoint, applied once the tracker exists

    def state_dict(self):
        state = {"records": self.records}
        if self.sign_flips is not None:
            state["sign_flips"] = self.sign_flips.state_dict()
        return state

    def load_state_dict(self, state):
        self.records = list(state.get("records", []))
        self._sign_state = state.get("sign_flips")

    def on_train_start(self, trainer, pl_module):
        # After any checkpoint restore (some strategies restore after on_fit_start): a fresh run
        # takes the signs of the initial weights, a resumed one the checkpoint's masks.
        if not bool(pl_module.cfg.probe.get("sign_flips", False)) or self.sign_flips is not None:
            return
        self.sign_flips = SignFlips(self.weights(pl_module))
        if self._sign_state is not None:
            self.sign_flips.load_state_dict(self._sign_state)
            self._sign_state = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.sign_flips is not None:  # after the step and the rule's constraints (E/I, Const)
            self.sign_flips.update()

    def on_train_epoch_end(self, trainer, pl_module):
        if self.sign_flips is None:
            return
        values = self.sign_flips.fractions()
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=int(pl_module.global_step))
        self.records.append({"step": int(pl_module.global_step), "epoch": int(trainer.current_epoch), **values})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not getattr(pl_module, "_probe_due", False):
            return
        device = pl_module.device
        _sync(device)
        start = time.perf_counter()
        values = self.measure(trainer, pl_module)
        if self.sign_flips is not None:
            values.update(self.sign_flips.fractions())
        # Straight to the loggers: self.log's epoch aggregation costs ~1 ms per key per call,
        # which at ~30 keys was most of the probe's time. Epoch means come from epoch_means().
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=int(pl_module.global_step))
        self.records.append({"step": int(pl_module.global_step), "epoch": int(trainer.current_epoch), **values})
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
        return [(n, p) for n, p in pl_module.model.named_parameters() if p.requires_grad and p.ndim >= 2]

    def measure(self, trainer, pl_module) -> dict[str, float]:
        x, y = pl_module._probe_batch
        tap = pl_module.tap
        named = self.weights(pl_module)
        rule_grads = [p.grad for _, p in named]
        rule_signals = [h.grad for h in tap.outputs] if (tap is not None and tap.outputs) else []
        model = pl_module.model
        cpu_state, cuda_state = pl_module._probe_rng
        with torch.random.fork_rng(devices=[device] if (device := x.device).type == "cuda" else []):
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, device)
            with preserved_buffers(model), pl_module.true_gradient():
                if tap is not None:
                    tap.clear()
                with (tap.settings(capture=True) if tap is not None else nullcontext()):
                    logits = model(x)
                points = list(tap.outputs) if tap is not None else []
                loss = pl_module.loss_fn(logits, y)
                grads = torch.autograd.grad(loss, [p for _, p in named] + points, allow_unused=True)
        if tap is not None:
            tap.clear()
        bp_grads, bp_signals = grads[: len(named)], grads[len(named):]
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

