"""Equilibrium-propagation perf: what one E-Prop update costs, as a ratio to backprop.

An E-Prop update (bench/algorithms/equilibrium.py) relaxes the network instead of differentiating it,
so its cost is the number of relaxation steps times one energy-gradient step. Two settings on the
rlra-1 net (5×256, 28×28 inputs), at rlra-1's batch of 32 and at 128:

* ``eprop (Scellier & Bengio)`` — the rule's defaults: one-sided nudging, free phase from s = 0,
  100 free + 12 nudged steps (112 relaxation steps);
* ``eprop (rlra-1 row)`` — the table row's measured setting: symmetric nudging (two nudged phases),
  feed-forward free-phase start, 50 free + 2 × 12 nudged steps (74 relaxation steps).

Rules are interleaved in a shuffled order on the same batch and each ratio is the median of
per-repeat ratios, as in :mod:`bench.run.perf`. ``ratio_to_default`` is the row setting's time over
the defaults' time in the same repeat, the saving the table row buys.
"""
from __future__ import annotations

import statistics

import torch

from bench.run.benchmarks import BENCHMARKS
from bench.run.perf import build_module, interleaved_times

MLP = ["model.name=mlp", "model.depth=5", "model.width=256"]
DEFAULTS = "eprop (Scellier & Bengio)"
ROW = "eprop (rlra-1 row)"
VARIANTS = {
    DEFAULTS: [],
    ROW: ["algorithm.nudging=symmetric", "algorithm.beta=0.5", "algorithm.free_init=feedforward",
          "algorithm.n_free=50"],
}


def update_rows(repeats: int, batches=(32, 128)) -> list[dict]:
    rows = []
    for batch in batches:
        modules = {"bp": build_module("bp", [*MLP, "model.activation=tanh"], [1, 28, 28])}
        modules.update({label: build_module("eprop", [*MLP, *extra], [1, 28, 28]) for label, extra in VARIANTS.items()})
        x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))  # pixels in [0, 1], as rlra-1
        times, steps = interleaved_times(modules, x, y, repeats, iters=2, warmup=1)
        for k in modules:
            rows.append({"benchmark": "update_time", "case": "rlra1-mlp-5x256", "rule": k, "batch": batch,
                         "median_ms": 1000 * statistics.median(times[k]),
                         "optimizer_step_ms": 1000 * statistics.median(steps[k]),
                         "ratio_to_bp": statistics.median(t / b for t, b in zip(times[k], times["bp"])),
                         "ratio_to_default": (statistics.median(t / d for t, d in zip(times[k], times[DEFAULTS]))
                                              if k != "bp" else ""),
                         "target": "", "meets_target": "", "repeats": repeats})
    return rows


@BENCHMARKS.register("eprop")
def run(args) -> list[dict]:
    return update_rows(5 if args.quick else args.repeats)
