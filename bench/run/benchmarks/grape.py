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
``flops_ratio`` is the same ratio in matrix-product FLOPs (torch's FlopCounterMode), the arithmetic
a faster implementation cannot remove:

* PEPITA ÷ BP is 1.01 in FLOPs. BP's backward does two products per layer (the weight gradient
  and the input gradient); PEPITA's second pass does one per layer (the forward on x − F e; the
  first layer by linearity, bench/algorithms/pepita.py) and its update one more. "Two forward
  passes and no backward" is the same arithmetic as a backward. What PEPITA adds is elementwise:
  the second pass evaluates the nonlinearity again (two tanh of 256 × 1024 per step, 0.75 ms of a
  16 ms step on 2 threads, where BP multiplies by the stored derivative) and the (W_1 F)ᵀ product
  over the classes (0.4 ms). The ReLU case shows the rest once the transcendental is gone.
* GrAPE ÷ DFA is 1.29 in FLOPs (the tangent W_2 v_1 of the JVP: one more 256 × 1024 × 1024
  product). The rest of the gap is the two N(0, I) perturbations of 256 × 1024: PyTorch's CPU
  normal_ runs on one thread (a sequential Mersenne Twister), 0.9 ms each on this machine, and the
  B update's small products and Python (1.1 ms). Drawing each perturbation in four pieces on a
  thread pool took one draw from 0.89 to 0.63 ms alone, but made the perturbed forward slower
  (12.3 against 11.7 ms), where OpenMP's workers still spin after each product; it was not kept.
"""
from __future__ import annotations

import statistics
import time

import torch

from bench.run.benchmarks import BENCHMARKS
from bench.run.perf import build_module, flops, interleaved_times

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
    counts = {k: flops(m, x, y) for k, m in modules.items()}
    times, _ = interleaved_times(modules, x, y, repeats, iters, warmup=1)
    rows = []
    for rule, base, target in pairs:
        ratio = statistics.median(t / b for t, b in zip(times[rule], times[base]))
        rows.append({"benchmark": "grape", "case": case, "rule": rule, "versus": base, "batch": batch,
                     "median_ms": 1000 * statistics.median(times[rule]), "ratio": ratio,
                     "ratio_to_bp": statistics.median(t / b for t, b in zip(times[rule], times["bp"])),
                     "flops_ratio": counts[rule] / counts[base],
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
