"""dfa_feedback: the memory-vs-speed trade-off of direct projection's feedback points.

Launay, Poli & Krzakala 2020 (dfa) §3.1: a convolutional feedback point receives B_i e over its
full C×H×W output, so B_i has C·H·W rows and the feedback matrices dwarf the network (dfa
Table 1). The suite offers two ways to shrink them, and this benchmark prices both against the
naive layout, on the same models, as ratios to BP timed side by side and interleaved:

* ``micro unified``: a point after every nonlinearity, one matrix U (l_max × e) sliced per point
  (Eq. 7–8): l_max·e floats. The default, and the issue's ≤ 0.85× / ≤ 1.0× BP update-time targets.
* ``micro independent``: the same points, one matrix per point: Σ l_i·e floats.
* ``macro unified``: a point after every block (a pooled stage, a residual block), local BP
  inside: fewer and often smaller points, more backward work per point.

For every variant the row gives the bytes of the feedback buffers the rule really allocated
(Σ numel·element_size over ``module.feedback``'s buffers) next to the closed form of
``bench.feedback.direct.feedback_memory`` (l_max·e or Σ l_i·e floats, 4 bytes each), and the
bytes of one step's projection B e (rows × Σ l_i floats, the transient cost of a full C×H×W
signal). The update time is forward + the rule's backward; the optimizer step is timed apart.
"""
from __future__ import annotations

import statistics

import torch

from bench.run.benchmarks import BENCHMARKS
from bench.feedback.direct import feedback_memory
from bench.run.perf import build_module, interleaved_times

CNN = ["model.name=cnn", "model.channels=[32,64,64]", "model.kernel=5", "model.activation=tanh"]
CASES = [
    # (name, model overrides, input shape, batch, variants, {variant: max ratio to BP})
    ("mlp-3x800-tanh", ["model.name=mlp", "model.depth=3", "model.width=800", "model.activation=tanh"],
     [1, 28, 28], 128, ["micro unified"], {"micro unified": 0.85}),
    ("dfa4-cnn", CNN, [3, 32, 32], 128, ["micro unified", "micro independent", "macro unified"],
     {"micro unified": 1.0}),
    ("resnet18-cifar", ["model.name=timm:resnet18", "model.cifar_stem=true"], [3, 32, 32], 16,
     ["micro unified", "micro independent", "macro unified"], {}),
    ("vgg16-cifar", ["model.name=timm:vgg16", "model.cifar_stem=true"], [3, 32, 32], 16,
     ["micro unified", "micro independent", "macro unified"], {}),
]
NUM_CLASSES = 10


def _overrides(variant: str) -> list[str]:
    granularity, layout = variant.split()
    return [f"algorithm.granularity={granularity}", f"algorithm.unified={str(layout == 'unified').lower()}"]


def feedback_bytes(module) -> dict:
    """Allocated bytes of the rule's feedback buffers, and of one step's projection B e."""
    stored = sum(b.numel() * b.element_size() for b in module.feedback.buffers())
    with torch.no_grad():
        projected = module.feedback.project(torch.zeros(1, NUM_CLASSES))
    # unified: the slices are views of one (rows × l_max) product; independent: one per point
    per_row = max(p.numel() for p, _ in projected) if module.feedback.unified else sum(p.numel() for p, _ in projected)
    return {"stored": stored, "projection_per_row": per_row * projected[0][0].element_size()}


def run_case(name, overrides, shape, batch, variants, targets, repeats: int, iters: int) -> list[dict]:
    modules = {"bp": build_module("bp", overrides, shape, NUM_CLASSES)}
    for v in variants:
        modules[v] = build_module("dfa", [*overrides, *_overrides(v)], shape, NUM_CLASSES)
    x, y = torch.randn(batch, *shape), torch.randint(0, NUM_CLASSES, (batch,))
    times, steps = interleaved_times(modules, x, y, repeats, iters, warmup=1)
    params = sum(p.numel() for p in modules["bp"].model.parameters())
    rows = []
    for k, m in modules.items():
        ratio = statistics.median(t / b for t, b in zip(times[k], times["bp"]))
        row = {"benchmark": "dfa_feedback", "case": name, "rule": "bp" if k == "bp" else "dfa",
               "variant": "" if k == "bp" else k, "batch": batch,
               "median_ms": 1000 * statistics.median(times[k]),
               "optimizer_step_ms": 1000 * statistics.median(steps[k]), "ratio_to_bp": ratio}
        target = targets.get(k)
        row["target"], row["meets_target"] = (f"<= {target}", ratio <= target) if target else ("", "")
        row["param_bytes"], row["repeats"] = 4 * params, repeats
        if k != "bp":
            granularity, layout = k.split()
            closed = feedback_memory(m.model, tuple(shape), NUM_CLASSES, granularity)
            measured = feedback_bytes(m)
            computed = closed["unified_bytes"] if layout == "unified" else closed["naive_bytes"]
            sizes = list(closed["points"].values())
            row.update({"points": len(sizes), "l_max": max(sizes), "sum_l": sum(sizes),
                        "feedback_bytes_measured": measured["stored"], "feedback_bytes_computed": computed,
                        "bytes_match": measured["stored"] == computed,
                        "feedback_to_param_bytes": measured["stored"] / (4 * params),
                        "projection_bytes_per_step": measured["projection_per_row"] * batch})
        rows.append(row)
    return rows


@BENCHMARKS.register("dfa_feedback")
def run(args) -> list[dict]:
    repeats = 5 if args.quick else args.repeats
    rows = []
    for name, overrides, shape, batch, variants, targets in CASES:
        big = batch < 64  # the ImageNet-family models: fewer repeats, each ~1 s on 2 CPU cores
        rows += run_case(name, overrides, shape, batch, variants, targets,
                         repeats=max(3, repeats // 3) if big else repeats, iters=2 if big else 5)
    for r in rows:
        r["torch_threads"] = torch.get_num_threads()
    return rows
