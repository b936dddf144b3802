"""grape: the cost of the forward-gradient family, side by side and interleaved (``bench perf --only grape``).

* GrAPE ÷ DFA on the grape-1 MLP (2 × 1024 tanh, 784 inputs) at batch 256: target ≤ 1.5. GrAPE's
  extra cost is the tangent carried through the training forward (one fused pass:
  bench/feedback/forward_gradient.py; Baydin et al. 2022 measured a JVP at ≈ 1.4× a forward) and
  the B update (l_i × e products).
* PEPITA ÷ BP on the same MLP: target ≤ 1.0 (two forward passes, no backward), and on its ReLU
  variant (PEPITA's own activation).
* The JVP pass alone ÷ a plain no-grad forward, on the same MLP.
* GrAPE ÷ BP on LeNet-4 (28×28, batch 256) and on the small transformer (2 × 128, 64 tokens, batch 16).

"Update time" is bench.run.perf's: forward + the rule's backward until every ``.grad`` is set.
"""
from __future__ import annotations

import statistics
import time

import torch

from bench.run.benchmarks import BENCHMARKS
from bench.run.perf import build_module, interleaved_times

MLP = ["model.name=mlp", "model.depth=2", "model.width=1024", "model.activation=tanh"]


def jvp_vs_forward(module, x, repeats: int) -> float:
    """Median over repeats of (perturbed no-grad JVP pass) / (plain no-grad forward), interleaved."""
    ratios = []
    for _ in range(repeats + 1):
        with torch.no_grad():
            t0 = time.perf_counter()
            module.model(x)
            t1 = time.perf_counter()
            module.forward_gradient_pass(x, cut=False)
            t2 = time.perf_counter()
        ratios.append((t2 - t1) / (t1 - t0))
    return statistics.median(ratios[1:])


def ratio_rows(case, modules, x, y, pairs, repeats, iters, batch):
    times, _ = interleaved_times(modules, x, y, repeats, iters, warmup=1)
    rows = []
    for rule, base, target in pairs:
        ratio = statistics.median(t / b for t, b in zip(times[rule], times[base]))
        rows.append({"benchmark": "grape", "case": case, "rule": rule, "versus": base, "batch": batch,
                     "median_ms": 1000 * statistics.median(times[rule]), "ratio": ratio,
                     "ratio_to_bp": statistics.median(t / b for t, b in zip(times[rule], times["bp"])),
                     "target": f"<= {target}" if target else "", "meets_target": (ratio <= target) if target else "",
                     "repeats": repeats})
    return rows


@BENCHMARKS.register("grape")
def run(args) -> list[dict]:
    repeats = 5 if args.quick else args.repeats
    rows = []
    shape = [1, 28, 28]
    mods = {r: build_module(r, MLP, shape) for r in ("bp", "dfa", "grape", "pepita")}
    x, y = torch.randn(256, *shape), torch.randint(0, 10, (256,))
    rows += ratio_rows("grape-1 mlp 2x1024", mods, x, y, [("grape", "dfa", 1.5), ("pepita", "bp", 1.0)],
                       repeats, 3, 256)
    rows.append({"benchmark": "grape", "case": "grape-1 mlp 2x1024", "rule": "jvp pass", "versus": "forward",
                 "batch": 256, "ratio": jvp_vs_forward(mods["grape"], x, repeats), "target": "", "meets_target": ""})
    # PEPITA evaluates the nonlinearity twice where BP evaluates it once and multiplies by its
    # derivative: with tanh (grape-1's choice) that is a transcendental per unit more; with ReLU
    # (PEPITA's own code, GiorgiaD/PEPITA) it is a comparison.
    relu = [*MLP[:-1], "model.activation=relu"]
    pep = {r: build_module(r, relu, shape) for r in ("bp", "pepita")}
    rows += ratio_rows("grape-1 mlp 2x1024, relu", pep, x, y, [("pepita", "bp", 1.0)], repeats, 3, 256)
    lenet = {r: build_module(r, ["model.name=lenet4"], shape) for r in ("bp", "grape")}
    rows += ratio_rows("lenet4", lenet, x, y, [("grape", "bp", None)], repeats, 3, 256)
    tf = ["model.name=transformer", "model.n_layer=2", "model.n_embd=128", "model.n_head=4"]
    trans = {r: build_module(r, tf, [64], num_classes=256) for r in ("bp", "grape")}
    xt, yt = torch.randint(0, 256, (16, 64)), torch.randint(0, 256, (16, 64))
    rows += ratio_rows("transformer 2x128", trans, xt, yt, [("grape", "bp", None)], repeats, 2, 16)
    for r in rows:
        r["torch_threads"] = torch.get_num_threads()
    return rows
