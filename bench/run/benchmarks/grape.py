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
  the second pass evaluates the nonlinearity again (where BP multiplies by the stored
  derivative), the (W_1 F)ᵀ product over the classes and the modulated input. The ReLU case shows
  the rest once the transcendental is gone. Its updates are written in place (GradSlots,
  docs/architecture.md M8).
* GrAPE ÷ DFA is 1.29 in FLOPs (the tangent W_2 v_1 of the JVP: one more 256 × 1024 × 1024
  product). On top come the two N(0, I) perturbations of 256 × 1024, from PyTorch's CPU
  generator, one sequential Mersenne Twister that does not use the second thread. The ``grape
  floor`` rows time exactly those two costs next to DFA's update (:func:`grape_floor`): no
  implementation that draws N(0, I) from that generator can go below that ratio. Because the draws are
  serial and the products are not, the floor depends on the thread count, so GrAPE, DFA and the
  floor are timed again on one thread. Drawing each perturbation in four pieces on a thread pool
  made one draw faster alone but the perturbed forward slower (OpenMP's workers still spin after
  each product); it was not kept. What lies between the floor and GrAPE is listed in
  docs/architecture.md, M9.
"""
from __future__ import annotations

import random
import statistics
import time

import torch

from bench.results.run import device_name
from bench.run.benchmarks import BENCHMARKS
from bench.run.perf import time_update, build_module, flops, interleaved_times

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


def floor_ratios(timers: dict, repeats: int) -> tuple[float, float]:
    """(median of (dfa + tangent + draws) ÷ dfa, median of draws ÷ dfa) over ``repeats``, each
    repeat calling the three timers (each returns seconds) in a fresh shuffled order."""
    for f in timers.values():  # warm-up
        f()
    floors, shares = [], []
    for _ in range(repeats):
        order = list(timers)
        random.shuffle(order)
        t = {k: timers[k]() for k in order}
        floors.append((t["dfa"] + t["tangent"] + t["draws"]) / t["dfa"])
        shares.append(t["draws"] / t["dfa"])
    return statistics.median(floors), statistics.median(shares)


def grape_floor(dfa, x, y, width: int, repeats: int) -> tuple[float, float]:
    """The least a GrAPE update can cost here, as a ratio to DFA's, measured side by side: DFA's
    update plus the two things GrAPE cannot leave out on the grape-1 MLP, the tangent product
    W_2 v_1 (batch × width × width) and the two N(0, I) perturbations (batch × width each) from
    torch's CPU generator. Returns (floor ratio, share of the draws in DFA's time)."""
    gen = torch.Generator().manual_seed(0)
    w2 = torch.randn(width, width) / width ** 0.5
    v = torch.randn(x.shape[0], width)

    def tangent():
        start = time.perf_counter()
        torch.mm(v, w2.t())
        return time.perf_counter() - start

    def draws():
        start = time.perf_counter()
        torch.randn((x.shape[0], width), generator=gen)
        torch.randn((x.shape[0], width), generator=gen)
        return time.perf_counter() - start

    return floor_ratios({"dfa": lambda: time_update(dfa, x, y, 1), "tangent": tangent, "draws": draws}, repeats)


def floor_row(case: str, dfa, x, y, repeats: int, width: int = 1024) -> dict:
    floor, draws = grape_floor(dfa, x, y, width, repeats)
    return {"benchmark": "grape", "case": case, "rule": "grape floor (dfa + W2 v1 + 2 draws)", "versus": "dfa",
            "batch": x.shape[0], "ratio": floor, "target": "", "meets_target": "",
            "note": f"the two N(0, I) draws alone: {draws:.2f} of DFA's update"}


def ratio_rows(case, modules, x, y, pairs, repeats, iters, batch, base_for_bp="bp"):
    counts = {k: flops(m, x, y) for k, m in modules.items()}
    times, _ = interleaved_times(modules, x, y, repeats, iters, warmup=1)
    rows = []
    for rule, base, target in pairs:
        ratio = statistics.median(t / b for t, b in zip(times[rule], times[base]))
        to_bp = statistics.median(t / b for t, b in zip(times[rule], times[base_for_bp])) if base_for_bp else ""
        rows.append({"benchmark": "grape", "case": case, "rule": rule, "versus": base, "batch": batch,
                     "median_ms": 1000 * statistics.median(times[rule]), "ratio": ratio,
                     "ratio_to_bp": to_bp,
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
    rows.append(floor_row("grape-1 mlp 2x1024", mods["dfa"], x, y, 3 * repeats))
    # The draws are serial (one Mersenne Twister) while the products use every thread, so the
    # ratio depends on the thread count: the same pair on one thread.
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
        try:
            pair = {r: mods[r] for r in ("dfa", "grape")}
            case = "grape-1 mlp 2x1024, 1 thread"
            one = ratio_rows(case, pair, x, y, [("grape", "dfa", 1.5)], repeats, 3, 256, base_for_bp=None)
            one.append(floor_row(case, mods["dfa"], x, y, 3 * repeats))
            one_thread = device_name()
        finally:
            torch.set_num_threads(threads)
        for r in one:
            r["torch_threads"], r["device"] = 1, one_thread
        rows += one
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
        r.setdefault("torch_threads", torch.get_num_threads())
    return rows
