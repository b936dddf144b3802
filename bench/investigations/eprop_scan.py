"""Why rlra-1's E-Prop row does not learn: the free phase's settling, and a scan of the settings.

Scellier & Bengio, "Equilibrium propagation: bridging the gap between energy-based models and
backpropagation" (2017); the E-Prop row of Ororbia et al., "Large-scale gradient-free deep
learning with recursive local representation alignment" (2020, arXiv:2002.03911), Table 1.

Two measurements on the rlra-1 net (5 × 256, hard-sigmoid units, Adam 2e-4, batch 32,
Fashion-MNIST, seed 0):

1. *Settling*: on a batch of 256 training images, the mean box-constrained residual
   |s − clip(s − ∂E/∂s, 0, 1)| and the energy's gap to its 1,000-step value after n free steps,
   from s = 0 (the paper's start) and from the clipped feed-forward pass
   (``algorithm.free_init=feedforward``), at initialisation with σ = 0.05 and σ = 0.1.
2. *Scan*: validation error after each epoch for each setting in ``SETTINGS`` on a training
   subset, two settings at a time (one thread each), with the train-only seconds per epoch.

    python -m bench.investigations.eprop_scan [--epochs 2] [--subset 10000] [--only NAME ...]
"""
from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from bench.algorithms import RULES
from bench.config import compose
from bench.data import create_datamodule
from bench.investigations.common import train_and_validate, write_report
from bench.models import create_model

PROTOCOL = ["algorithm.name=eprop", "model.name=mlp", "model.depth=5", "model.width=256", "model.init=gaussian",
            "model.sigma=0.05", "algorithm.optimizer=adam", "algorithm.lr=2e-4", "data.name=fmnist",
            "data.batch_size=32", "data.val_size=2000", "data.normalize=none", "seed=0"]

# name → overrides on PROTOCOL. The first is the rlra-1 row as published (50.45 % test error).
SETTINGS = {
    "row as published (one-sided, random sign, β 1, 100 free)": [],
    "symmetric nudging": ["algorithm.nudging=symmetric"],
    "symmetric, β 0.5": ["algorithm.nudging=symmetric", "algorithm.beta=0.5"],
    "symmetric, σ 0.1": ["algorithm.nudging=symmetric", "model.sigma=0.1"],
    "symmetric, σ 0.1, feed-forward start, 30 free": ["algorithm.nudging=symmetric", "model.sigma=0.1",
                                                      "algorithm.free_init=feedforward", "algorithm.n_free=30"],
    "symmetric, σ 0.1, lr 1e-3": ["algorithm.nudging=symmetric", "model.sigma=0.1", "algorithm.lr=1e-3"],
    "one-sided, σ 0.1": ["model.sigma=0.1"],
    "symmetric, σ 0.1, 24 nudged": ["algorithm.nudging=symmetric", "model.sigma=0.1", "algorithm.n_nudged=24"],
    # second round, around the best of the first (symmetric, σ 0.05, β 0.5)
    "symmetric, β 0.5, lr 1e-4": ["algorithm.nudging=symmetric", "algorithm.beta=0.5", "algorithm.lr=1e-4"],
    "symmetric, β 0.25": ["algorithm.nudging=symmetric", "algorithm.beta=0.25"],
    "symmetric, β 0.5, feed-forward start, 50 free": ["algorithm.nudging=symmetric", "algorithm.beta=0.5",
                                                     "algorithm.free_init=feedforward", "algorithm.n_free=50"],
    "symmetric, β 0.5, 24 nudged": ["algorithm.nudging=symmetric", "algorithm.beta=0.5", "algorithm.n_nudged=24"],
}
STEPS = (10, 20, 50, 100, 200)


def settling(sigma: float) -> list[str]:
    """Residual and energy gap after n free steps, from zero and from the feed-forward pass."""
    cfg = compose(overrides=[*PROTOCOL, f"model.sigma={sigma}", "data.train_subset=256"])
    torch.manual_seed(0)
    data = create_datamodule(cfg.data, 0)
    data.setup("fit")
    shape = tuple(data.input_shape)
    module = RULES.get("eprop")(cfg, create_model(cfg.model, shape, data.num_classes), data.num_classes, shape)
    x = torch.cat([xb for xb, _ in data.train_dataloader()])[:256]
    x = module.flatten(x)
    rows = []
    with torch.no_grad():
        settled = module.settle(x, module.zero_states(x), 1000)
        floor = float(module.energy(x, settled).mean())
        for start_name, start in (("zero", module.zero_states(x)), ("feed-forward", module.feedforward_states(x))):
            cells = []
            for n in STEPS:
                states = module.settle(x, start, n)
                grads = module.state_grad(x, states)
                res = torch.cat([(s - torch.clamp(s - g, 0, 1)).abs().flatten() for s, g in zip(states, grads)])
                gap = float(module.energy(x, states).mean()) - floor
                cells.append(f"{float(res.mean()):.1e} / {gap:.2e}")
            top = float(settled[-2].mean())
            rows.append(f"| {sigma} | {start_name} | " + " | ".join(cells) + f" | {floor:.1f} | {top:.3f} |")
    return rows


def scan_one(item: tuple[str, list[str], int, int | None]) -> tuple[str, list[float], float]:
    name, extra, epochs, subset = item
    torch.set_num_threads(1)
    start = time.time()
    errors = train_and_validate([*PROTOCOL, *extra], epochs, subset, label=name)
    return name, errors, (time.time() - start) / epochs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--subset", type=int, default=10000, help="train on this many images (0: all)")
    parser.add_argument("--only", nargs="*", default=None, help="setting names to run (default: all)")
    parser.add_argument("--out", default="results/investigations/eprop-scan.md")
    a = parser.parse_args(argv)
    subset = a.subset or None
    torch.set_num_threads(2)
    began = time.time()
    settle_rows = [row for sigma in (0.05, 0.1) for row in settling(sigma)]
    chosen = [(n, o, a.epochs, subset) for n, o in SETTINGS.items() if a.only is None or n in a.only]
    with ProcessPoolExecutor(2) as pool:
        results = list(pool.map(scan_one, chosen))
    command = f"python -m bench.investigations.eprop_scan --epochs {a.epochs} --subset {a.subset}"
    if a.only:
        command += " --only " + " ".join(repr(n) for n in a.only) + f" --out {a.out}"
    lines = ["# Equilibrium propagation on the rlra-1 net: settling and a settings scan", "",
             f"`{command}` (5 × 256 hard-sigmoid units, Adam 2e-4 unless stated, batch 32, Fashion-MNIST, seed 0; "
             f"{time.time() - began:.0f} s in all, two settings at a time on one thread each).", "",
             "## Free-phase settling at initialisation (batch of 256)", "",
             "Each cell: mean residual |s − clip(s − ∂E/∂s, 0, 1)| / energy gap to the 1,000-step energy "
             "(per sample). Last columns: that energy, and the mean state of the top hidden layer there.", "",
             "| σ | start | " + " | ".join(f"{n} steps" for n in STEPS) + " | energy at 1,000 | top hidden mean |",
             "|---|---|" + "---|" * len(STEPS) + "---|---|", *settle_rows, "",
             f"## Scan: validation error (%) after each epoch, {a.subset or 'all'} training images", "",
             "| setting | " + " | ".join(f"epoch {e}" for e in range(1, a.epochs + 1)) + " | s / epoch (train + validation) |",
             "|---|" + "---|" * a.epochs + "---|"]
    for name, errors, seconds in results:
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in errors) + f" | {seconds:.0f} |")
    write_report(a.out, lines)


if __name__ == "__main__":
    main()
