"""The training loop the investigations share: one rule on one config, plain Python, no Lightning,
so a measurement can look inside a step (``on_step``) and runs in seconds."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from bench.algorithms import RULES
from bench.config import compose
from bench.data import create_datamodule
from bench.models import create_model


def validation_error(module, loader) -> float:
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((module.predict(x).argmax(1) == y).sum())  # an energy model answers with its settled state
            total += len(y)
    return 100.0 - 100.0 * correct / total


def train_and_validate(overrides: list[str], epochs: int, subset: int | None = None,
                       on_step: Callable[[int], None] | None = None, label: str = "") -> list[float]:
    """Validation error (%) after each epoch of the composed run; ``on_step(step)`` after every step."""
    cfg = compose(overrides=[*overrides, *([f"data.train_subset={subset}"] if subset else [])])
    torch.manual_seed(int(cfg.seed))
    data = create_datamodule(cfg.data, int(cfg.seed))
    data.setup("fit")
    shape = tuple(data.input_shape)
    module = RULES.get(str(cfg.algorithm.name))(cfg, create_model(cfg.model, shape, data.num_classes),
                                               data.num_classes, shape)
    optimizer = torch.optim.Adam(module.parameters(), lr=float(cfg.algorithm.lr))
    errors, step = [], 0
    for epoch in range(1, epochs + 1):
        for x, y in data.train_dataloader():
            for p in module.parameters():
                p.grad = None
            surrogate, _, _ = module.objective(x, y)
            surrogate.backward()
            optimizer.step()
            step += 1
            if on_step is not None:
                on_step(step)
        errors.append(validation_error(module, data.val_dataloader()))
        print(f"{label}: epoch {epoch} validation error {errors[-1]:.2f} %", flush=True)
    return errors


def write_report(path: str, lines: list[str]) -> None:
    """The investigation's Markdown evidence, under results/investigations/."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")
