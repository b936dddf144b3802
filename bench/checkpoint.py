"""Checkpoints are data, never code: every load in the suite is ``torch.load(weights_only=True)``.

A ``last.ckpt`` is a pickle, and a pickle can name any callable to run while it loads. Output
roots are shared (clusters, several W&B agents), so a file in a run folder is untrusted input.
Every checkpoint the suite reads goes through :func:`load_checkpoint`, and Lightning's own resume
path (``trainer.fit(ckpt_path=...)``) goes through :class:`SafeCheckpointIO`, which the trainer
gets as a plugin. Both pass ``weights_only=True`` explicitly: an explicit ``True`` also wins over
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` in the environment, which a ``None`` would not.

The suite's own checkpoints hold only tensors, numbers, strings and plain containers (the run
recorder stores NumPy's RNG state as lists for this reason), so nothing is added to torch's
weights-only allowlist; a class ever added there must be plain data, never a callable that does
work when it is called.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from bench.config import ConfigError

# The suite's checkpoints hold only tensors and plain data, so torch's weights-only allowlist is
# enough; a class a future checkpoint needs goes through torch.serialization.add_safe_globals here.


class UnsafeCheckpoint(ConfigError):
    """A checkpoint holding something other than plain data: refused with one line (CLI exit 2)."""


def _reason(exc: BaseException) -> str:
    """The one informative line of torch's multi-paragraph weights-only refusal."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "nsupported" in line:
            return line.removeprefix("Please file an issue with the following so that we can make `weights_only=True` compatible with your use case: ")
    return lines[0] if lines else type(exc).__name__


def load_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """``torch.load(path, weights_only=True)``; a file that is not plain data raises one line
    (:class:`UnsafeCheckpoint`) naming it, and a file that cannot be read at all a
    :class:`~bench.config.ConfigError`. Its payload never runs."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpoint(f"checkpoint {path} was refused: it holds more than tensors and plain data "
                               f"({_reason(exc)}), so loading it could run code; it was not written by this "
                               f"suite as it is now. Delete it (the run starts over)") from None
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised as one line naming the file
        raise ConfigError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {_reason(exc)}); "
                          f"delete it to start the run over") from None


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` whose loads are always ``weights_only=True``.

    Lightning's resume path is ``Trainer.fit(ckpt_path=...)`` → checkpoint connector
    ``resume_start`` → ``strategy.load_checkpoint`` → ``strategy.checkpoint_io.load_checkpoint``
    (→ ``lightning.fabric.utilities.cloud_io._load`` → ``torch.load``). Passed to the Trainer in
    ``plugins``, this class is that ``checkpoint_io`` for every strategy the suite uses (single
    device and DDP), whatever ``weights_only`` the caller asks for."""

    def load_checkpoint(self, path, map_location: Callable | None = None, weights_only: bool | None = None) -> dict:
        fs_path = Path(path)
        if not fs_path.exists():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return load_checkpoint(fs_path, map_location=map_location if map_location is not None else "cpu")
