"""rec-LRA with sign units: every reading of Eq. 3–4 the text allows, trained side by side.

Ororbia, Mali, Kifer & Giles, "Large-scale gradient-free deep learning with recursive local
representation alignment" (2020, arXiv:2002.03911), Eq. 3–4: y_i = φ_i(h_i − β d_i), e_i = z_i − y_i,
with φ = sign among the paper's examples ("a non-differentiable function such as the signum").
Readings of where the error units live (``algorithm.target_space``):

* ``activity`` (the text: "the error neurons e_i then compare the target y_i to the original
  activity z_i"): e_i = sign(h_i) − sign(h_i − βd_i), non-zero (±2) only where the displacement
  flips a unit, |h_i| < β|d_i|;
* ``preactivation``: the target is the shifted pre-activation h_i − βd_i ("all that is required
  for computing a target at i is its original pre-activation vector"), e_i = βd_i at every unit.

Each reading runs at the rlra-1 row's tuned values (β 0.5, σ 0.025) and at the rule's defaults
(β 0.1205, σ 0.05), on the rlra-1 protocol (5 × 256, Adam 2e-4, batch 32, state error rule,
Fashion-MNIST, seed 0).

    python -m bench.investigations.rlra_sign_units [--epochs 3] [--subset N]
"""
from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor
import torch

from bench.investigations.common import train_and_validate, write_report

PROTOCOL = ["algorithm.name=rlra", "algorithm.error_update=state", "model.name=mlp", "model.depth=5",
            "model.width=256", "model.activation=sign", "model.init=gaussian", "algorithm.optimizer=adam",
            "algorithm.lr=2e-4", "data.name=fmnist", "data.batch_size=32", "data.val_size=2000",
            "data.normalize=none", "seed=0"]
SETTINGS = {"rlra-1 row (β 0.5, σ 0.025)": ["algorithm.beta=0.5", "algorithm.error_sigma=0.025", "model.sigma=0.025"],
            "rule defaults (β 0.1205, σ 0.05)": ["model.sigma=0.05"]}
READINGS = ("activity", "preactivation")


DEFAULT_OUT = "results/investigations/rlra-sign-units.md"


def train_one(key: tuple[str, str], epochs: int, subset: int | None) -> list[float]:
    torch.set_num_threads(1)
    setting, reading = key
    return train_and_validate([*PROTOCOL, *SETTINGS[setting], f"algorithm.target_space={reading}"], epochs, subset,
                              label=f"{setting}, {reading}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--subset", type=int, default=None, help="train on this many images (default: all)")
    parser.add_argument("--out", default=DEFAULT_OUT)
    a = parser.parse_args(argv)
    start = time.time()
    keys = [(setting, reading) for setting in SETTINGS for reading in READINGS]
    with ProcessPoolExecutor(2) as pool:  # two runs at a time, one thread each
        results = dict(zip(keys, pool.map(train_one, keys, [a.epochs] * len(keys), [a.subset] * len(keys))))
    command = (f"python -m bench.investigations.rlra_sign_units --epochs {a.epochs}" + (f" --subset {a.subset}" if a.subset else "")
               + (f" --out {a.out}" if a.out != DEFAULT_OUT else ""))
    lines = ["# rec-LRA with sign units: where the error units live", "",
             f"`{command}` (5 × 256 sign units, Adam 2e-4, batch 32, state error rule, Fashion-MNIST, seed 0; "
             f"{time.time() - start:.0f} s in all, two runs at a time on one thread each).", "",
             "| setting | target_space | " + " | ".join(f"val err % after epoch {e}" for e in range(1, a.epochs + 1)) + " |",
             "|---|---|" + "---|" * a.epochs]
    for (setting, reading), errors in results.items():
        lines.append(f"| {setting} | {reading} | " + " | ".join(f"{v:.2f}" for v in errors) + " |")
    write_report(a.out, lines)


if __name__ == "__main__":
    main()
