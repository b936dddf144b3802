"""Which way Eq. 6's ΔE is stepped: rec-LRA's error synapses under the three ``error_update`` rules.

Ororbia, Mali, Kifer & Giles, "Large-scale gradient-free deep learning with recursive local
representation alignment" (2020, arXiv:2002.03911), Eq. 6: ΔE_{j→i} = −γ d_i e_jᵀ. Stepped like
Eq. 5's ΔW (θ ← θ − λΔθ) it grows the displacement d_i = E e_j along itself; stepped the other way
(the appendix's derived descent direction) it shrinks it (bench/algorithms/rlra.py, "The sign of
ΔE"). This trains the rlra-1 net (5 × 256 tanh, σ = 0.05, Adam 2e-4, batch 32, Fashion-MNIST) for
3 epochs under ``displacement``, ``displacement_descent`` and ``state`` from the same seed, and
records the mean norm of each synapse's displacement and source error along the way and the
validation error after each epoch.

    python -m bench.investigations.rlra_error_sign [--epochs 3] [--subset N]
"""
from __future__ import annotations

import argparse
import time

import torch

import bench.algorithms.rlra as rlra
from bench.investigations.common import train_and_validate, write_report

RULES_MEASURED = ("displacement", "displacement_descent", "state")
PROTOCOL = ["model.name=mlp", "model.depth=5", "model.width=256", "model.activation=tanh", "model.init=gaussian",
            "model.sigma=0.05", "algorithm.optimizer=adam", "algorithm.lr=2e-4", "data.name=fmnist",
            "data.batch_size=32", "data.val_size=2000", "data.normalize=none", "seed=0"]


def measure(rule: str, epochs: int, subset: int | None, log_every: int) -> list[dict]:
    """One run: a row per logged step (norms) and per epoch end (validation error)."""
    seen: list[tuple[float, float]] = []
    rows: list[dict] = []
    real = rlra._outer_sum

    def spy(signal, error, scale):  # every ΔE of the closed form passes here: (d_i or z_i, e_j)
        seen.append((float(signal.norm(dim=1).mean()), float(error.norm(dim=1).mean())))
        return real(signal, error, scale)

    def on_step(step: int) -> None:
        if step == 1 or step % log_every == 0:
            rows.append({"rule": rule, "step": step, "displacement": [d for d, _ in seen],
                         "source_error": [e for _, e in seen]})
        seen.clear()

    rlra._outer_sum = spy
    try:
        errors = train_and_validate(["algorithm.name=rlra", f"algorithm.error_update={rule}", *PROTOCOL], epochs,
                                    subset, on_step, label=rule)
    finally:
        rlra._outer_sum = real
    return rows + [{"rule": rule, "epoch": e, "val_err": v} for e, v in enumerate(errors, start=1)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--subset", type=int, default=None, help="train on this many images (default: all)")
    parser.add_argument("--log-every", type=int, default=1875)
    parser.add_argument("--out", default="results/investigations/rlra-error-sign.md")
    a = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.time()
    rows = [r for rule in RULES_MEASURED for r in measure(rule, a.epochs, a.subset, a.log_every)]
    command = f"python -m bench.investigations.rlra_error_sign --epochs {a.epochs}" + (f" --subset {a.subset}" if a.subset else "")
    lines = ["# rec-LRA: which way Eq. 6's ΔE is stepped", "",
             f"`{command}` (the rlra-1 net: 5 × 256 tanh, Adam 2e-4, batch 32, Fashion-MNIST, seed 0; "
             f"{time.time() - start:.0f} s on {torch.get_num_threads()} thread).", ""]
    lines += ["Mean per-sample norm of each error synapse's displacement d_i (or z_i for `state`), synapses in the "
              "rule's order (skip synapses from the output, then pairwise ones), and of its source error e_j.", "",
              "| rule | step | ‖d‖ per synapse | ‖e_j‖ per synapse |", "|---|---|---|---|"]
    for r in rows:
        if "displacement" in r:
            lines.append(f"| {r['rule']} | {r['step']} | {' / '.join(f'{v:.3g}' for v in r['displacement'])} | "
                         f"{' / '.join(f'{v:.3g}' for v in r['source_error'])} |")
    lines += ["", "| rule | " + " | ".join(f"val err % after epoch {e}" for e in range(1, a.epochs + 1)) + " |",
              "|---|" + "---|" * a.epochs]
    for rule in RULES_MEASURED:
        errs = [r["val_err"] for r in rows if r["rule"] == rule and "val_err" in r]
        lines.append(f"| {rule} | " + " | ".join(f"{v:.2f}" for v in errs) + " |")
    write_report(a.out, lines)


if __name__ == "__main__":
    main()
