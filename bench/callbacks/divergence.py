"""Divergence guard: a run whose loss, a gradient or a weight becomes non-finite stops cleanly with
status ``diverged``, and says where and why.

The rule base calls :meth:`DivergenceGuard.check` from ``training_step`` (its ``_diverged`` hook)
every ``guard.every`` steps, after the rule's backward and before ``optimizer.step()``:

* one device sync per check, as before: the loss and a fused "any gradient non-finite" flag
  (``torch._amp_foreach_non_finite_check_and_unscale_`` with scale 1, which leaves every value
  unchanged) come back together; the value of a finite loss is kept as the last finite loss;
* on a non-finite value the step is refused (no non-finite gradient reaches the weights) and the
  guard names the first cause, in this order: a **weight** already non-finite (its previous
  update overflowed, or a rule's post-step constraint produced it), the **loss**, a **gradient**;
* at the end of every epoch it checks the weights once more, so an update that overflowed on the
  epoch's last step is caught before the checkpoint and the summary are written.

Under fp16 mixed precision the gradient flag is left to the grad scaler (an overflowing scaled
gradient is routine there: the scaler skips that step and lowers its scale), so the guard checks
the loss and the weights only. With ``guard.every`` > 1 the unchecked steps are not looked at.

``record`` holds what ``summary.json`` stores under ``divergence``: ``step`` (0-based training
step, = the number of optimizer updates applied before it, that produced the non-finite value:
for a weight, the step whose update made it non-finite), ``epoch``, ``quantity`` (``loss``,
``gradient of <param>`` or ``weight <param>``, parameter names as in the checkpoint's state dict),
``last_finite_loss`` and ``last_finite_loss_step`` (the latest finite loss the guard saw, which
is the diverged step's own when a gradient went non-finite; ``None`` if there was none). Under DDP the decision is shared by all ranks (any rank's
non-finite value stops all of them); the record is rank 0's view.
"""
from __future__ import annotations

import math

import torch
from lightning.pytorch.callbacks import Callback


def describe(record: dict) -> str:
    """The one line a user reads about a diverged run."""
    last = record.get("last_finite_loss")
    tail = (f"; last finite loss {last:.6g} at step {record.get('last_finite_loss_step')}" if last is not None
            else "; no finite loss was recorded before it")
    return f"the {record['quantity']} became non-finite at step {record['step']} (epoch {record['epoch']}){tail}"


def _nonfinite_flag(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """A 0-dim float32 tensor on ``device``: > 0 when any element of ``tensors`` is NaN or ±inf.
    One fused kernel per (device, dtype) group; no device sync."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    flags = []
    for (dev, _), group in groups.items():
        found = torch.zeros(1, device=dev, dtype=torch.float32)
        try:  # multiplies each tensor by exactly 1.0 in place and sets `found` on a non-finite value
            torch._amp_foreach_non_finite_check_and_unscale_(group, found, torch.ones(1, device=dev))
        except (RuntimeError, NotImplementedError):  # a dtype or device the fused kernel lacks
            found = torch.stack([~torch.isfinite(t).all() for t in group]).any().float().reshape(1)
        flags.append(found.to(device, non_blocking=True))
    return torch.cat(flags).sum() if flags else torch.zeros((), device=device)


class DivergenceGuard(Callback):
    def __init__(self):
        self.record: dict = {}
        self.last_finite_loss: float | None = None
        self.last_finite_loss_step: int | None = None
        self.check_grads = True

    # Checkpointed, so a run that diverges right after a resume still knows its last finite loss.
    def state_dict(self):
        return {"last_finite_loss": self.last_finite_loss, "last_finite_loss_step": self.last_finite_loss_step}

    def load_state_dict(self, state):
        self.last_finite_loss = state.get("last_finite_loss")
        self.last_finite_loss_step = state.get("last_finite_loss_step")

    def setup(self, trainer, pl_module, stage):
        pl_module.divergence_guard = self  # the rule base's `_diverged` hook calls `check`
        # an fp16 grad scaler skips overflowing steps itself (see the module docstring)
        self.check_grads = getattr(trainer.precision_plugin, "scaler", None) is None

    # ------------------------------------------------------------------ checks
    def check(self, pl_module, loss: torch.Tensor) -> bool:
        """Whether this step diverged (on any rank); called before ``optimizer.step()``."""
        loss = loss.detach().float().reshape(())
        values = [loss]
        if self.check_grads:
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            values.append(_nonfinite_flag(grads, loss.device))
        host = torch.stack(values).tolist()  # the one device sync of the check
        loss_value = host[0]
        if math.isfinite(loss_value):
            self.last_finite_loss, self.last_finite_loss_step = loss_value, int(pl_module.global_step)
        bad = not math.isfinite(loss_value) or (len(host) > 1 and host[1] > 0)
        trainer = pl_module.trainer
        bad = bool(trainer.strategy.reduce_boolean_decision(bad, all=False))
        if not bad:
            return False
        step = int(pl_module.global_step)
        quantity, step = self._cause(pl_module, loss_value, step)
        self._stop(trainer, pl_module, quantity, step)
        return True

    def on_train_epoch_end(self, trainer, pl_module):
        if getattr(pl_module, "status", None) == "diverged" or not getattr(pl_module, "guard_every", 1):
            return
        weights = list(self._weights(pl_module))
        if not weights:
            return
        finite = bool(torch.stack([torch.isfinite(w).all().to(weights[0][1].device) for _, w in weights]).all())
        if not bool(trainer.strategy.reduce_boolean_decision(not finite, all=False)):
            return
        # The last update of the epoch produced it; its gradients are still in .grad.
        step = int(pl_module.global_step) - 1
        grad = self._first_nonfinite((n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None)
        weight = self._first_nonfinite(weights)
        quantity = f"gradient of {grad}" if grad else (f"weight {weight}" if weight else "weight on another rank")
        self._stop(trainer, pl_module, quantity, step)

    # ------------------------------------------------------------------ attribution
    @staticmethod
    def _weights(pl_module):
        """Parameters, then floating buffers (feedback matrices); private ones (running metric
        sums, names starting with "_") are not weights."""
        yield from pl_module.named_parameters()
        for name, buf in pl_module.named_buffers():
            if buf.is_floating_point() and not name.rsplit(".", 1)[-1].startswith("_"):
                yield name, buf

    @staticmethod
    def _first_nonfinite(named) -> str | None:
        for name, t in named:
            if not bool(torch.isfinite(t).all()):
                return name
        return None

    def _cause(self, pl_module, loss_value: float, step: int) -> tuple[str, int]:
        weight = self._first_nonfinite(self._weights(pl_module))
        if weight:
            return f"weight {weight}", step - 1  # the previous step's update made it non-finite
        if not math.isfinite(loss_value):
            return "loss", step
        grad = self._first_nonfinite((n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None)
        if grad:
            return f"gradient of {grad}", step
        return "loss or a gradient on another rank", step

    def _stop(self, trainer, pl_module, quantity: str, step: int) -> None:
        pl_module.status = "diverged"
        trainer.should_stop = True
        self.record = {"step": step, "epoch": int(trainer.current_epoch), "quantity": quantity,
                       "last_finite_loss": self.last_finite_loss, "last_finite_loss_step": self.last_finite_loss_step}
