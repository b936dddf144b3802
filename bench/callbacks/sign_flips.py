"""The callback side of sign-flip tracking (sfa §5.5, Figure 5); the measure itself is
:class:`bench.metrics.sign_flips.SignFlips`.

The check runs after every optimizer step (after the rule's own constraints, E/I and Const), so
no flip between two probes is missed; it costs one compare per weight per step, so it is off
unless ``probe.sign_flips`` is true. :class:`SignFlipTracking` holds the Lightning hooks that
drive the tracker; :class:`bench.callbacks.probe.AlignmentProbe` is one, so the fractions are
recorded with every probe and at every epoch end, in ``probe.csv`` as ``signs/flipped/<layer>``
and ``signs/flipped_all``, and the masks travel in the probe's checkpoint state, so a resumed
run keeps counting from where it stopped.
"""
from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from bench.metrics.gradients import layer_weights
from bench.metrics.sign_flips import SignFlips


class SignFlipTracking(Callback):
    """Builds a :class:`SignFlips` tracker at train start (when ``probe.sign_flips`` is on),
    updates it after every training batch and hands its fractions to :meth:`record` at every
    epoch end. Subclasses say where a record goes."""

    def __init__(self):
        self.sign_flips: SignFlips | None = None
        self._sign_state: dict | None = None  # from a checkpoint, applied once the tracker exists

    def record(self, trainer, pl_module, values: dict[str, float]) -> None:
        raise NotImplementedError

    def sign_flip_state(self) -> dict:
        """The tracker's part of the callback's checkpoint state ({} when tracking is off)."""
        return {"sign_flips": self.sign_flips.state_dict()} if self.sign_flips is not None else {}

    def load_sign_flip_state(self, state: dict) -> None:
        self._sign_state = state.get("sign_flips")

    def on_train_start(self, trainer, pl_module):
        # After any checkpoint restore (some strategies restore after on_fit_start): a fresh run
        # takes the signs of the initial weights, a resumed one the checkpoint's masks.
        if not bool(pl_module.cfg.probe.get("sign_flips", False)) or self.sign_flips is not None:
            return
        self.sign_flips = SignFlips(layer_weights(pl_module.model))
        if self._sign_state is not None:
            self.sign_flips.load_state_dict(self._sign_state)
            self._sign_state = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.sign_flips is not None:  # after the step and the rule's constraints (E/I, Const)
            self.sign_flips.update()

    def on_train_epoch_end(self, trainer, pl_module):
        if self.sign_flips is not None:
            self.record(trainer, pl_module, self.sign_flips.fractions())
