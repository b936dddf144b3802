"""rec-LRA perf (issue 5): update time as a ratio to backprop, and error-synapse memory per model.

* **update time** — forward + the rule's update up to every ``.grad`` (``objective`` +
  ``backward``), the optimizer step timed apart (for rec-LRA it also steps the error synapses), on

  - the rlra-1 MLP (5×256 tanh, 28×28 inputs, batch 128, as the core case ``rlra1-mlp-5x256``),
    with Eq. 6's error update and with the appendix's ``state`` rule that rlra-1 uses, each eager
    and with ``algorithm.compile=true``; and the state rule at rlra-1's own batch of 32;
  - timm ResNet-18 with the CIFAR stem at 32×32 (batch 16), block_update ``rlra`` (conv error
    synapses into the inner maps, 3×3 and 1×1) and ``local_bp`` (the paper's alternative).

  Rules are interleaved in a shuffled order on the same batch; the ratio is the median over
  repeats of (rule time / BP time in that repeat), as in :mod:`bench.run.perf`.
* **error-synapse memory** — bytes of the error synapses (dense / conv / low-rank) of each
  variant on each model, next to the model's own parameter bytes.
"""
from __future__ import annotations

import statistics

import torch

from bench.run.benchmarks import BENCHMARKS
from bench.run.perf import build_module, interleaved_times

MLP = ["model.name=mlp", "model.depth=5", "model.width=256", "model.activation=tanh"]
RESNET = ["model.name=timm:resnet18", "model.cifar_stem=true"]
# (case, model overrides, input shape, batch, {label: (rule, rule overrides)}, target ratio)
TIME_CASES = [
    ("rlra1-mlp-5x256", MLP, [1, 28, 28], 128,
     {"rlra": ("rlra", []), "rlra (state)": ("rlra", ["algorithm.error_update=state"]),
      "rlra (compiled)": ("rlra", ["algorithm.compile=true"]),
      "rlra (state, compiled)": ("rlra", ["algorithm.error_update=state", "algorithm.compile=true"])}, 1.0),
    # rlra-1's own protocol batch (32): per-op overhead weighs most here
    ("rlra1-mlp-5x256", MLP, [1, 28, 28], 32,
     {"rlra (state)": ("rlra", ["algorithm.error_update=state"]),
      "rlra (state, compiled)": ("rlra", ["algorithm.error_update=state", "algorithm.compile=true"])}, 1.0),
    ("resnet18-cifar-32x32", RESNET, [3, 32, 32], 16,
     {"rlra (1x1 conv synapses)": ("rlra", ["algorithm.block_update=rlra", "algorithm.synapse_kernel=1"]),
      "rlra (3x3 conv synapses)": ("rlra", ["algorithm.block_update=rlra", "algorithm.synapse_kernel=3"]),
      "rlra (local_bp)": ("rlra", ["algorithm.block_update=local_bp"])}, 1.0),
]
MEMORY_CASES = [
    ("rlra1-mlp-5x256", MLP, [1, 28, 28]),
    ("dfa4-cnn", ["model.name=cnn", "model.channels=[32,64,64]", "model.kernel=5"], [3, 32, 32]),
    ("resnet18-cifar-32x32", RESNET, [3, 32, 32]),
    ("presnet18-64-cifar-32x32", ["model.name=presnet18", "model.masks=64"], [3, 32, 32]),
]
MEMORY_VARIANTS = {
    "rlra (1x1 conv synapses)": ["algorithm.block_update=rlra", "algorithm.map_synapse=conv", "algorithm.synapse_kernel=1"],
    "rlra (3x3 conv synapses)": ["algorithm.block_update=rlra", "algorithm.map_synapse=conv", "algorithm.synapse_kernel=3"],
    "rlra (lowrank r=16)": ["algorithm.block_update=rlra", "algorithm.map_synapse=lowrank"],
    "rlra (local_bp)": ["algorithm.block_update=local_bp"],
}


def update_rows(repeats: int) -> list[dict]:
    rows = []
    for case, model, shape, batch, variants, target in TIME_CASES:
        modules = {"bp": build_module("bp", model, shape)}
        modules.update({label: build_module(rule, [*model, *extra], shape) for label, (rule, extra) in variants.items()})
        x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
        big = shape[0] == 3  # ResNet-18: one update per repeat, fewer repeats
        iters, reps = (1, min(repeats, 7)) if big else (5, repeats)
        times, steps = interleaved_times(modules, x, y, reps, iters, warmup=1 if big else 2)
        for k in modules:
            ratio = statistics.median(t / b for t, b in zip(times[k], times["bp"]))
            rows.append({"benchmark": "update_time", "case": case, "rule": k, "batch": batch,
                         "median_ms": 1000 * statistics.median(times[k]),
                         "optimizer_step_ms": 1000 * statistics.median(steps[k]), "ratio_to_bp": ratio,
                         "target": f"<= {target}" if k != "bp" else "",
                         "meets_target": (ratio <= target) if k != "bp" else "", "repeats": reps})
    return rows


def memory_rows() -> list[dict]:
    rows = []
    for case, model, shape in MEMORY_CASES:
        resnet = any(m in model[0] for m in ("resnet", "presnet"))
        variants = MEMORY_VARIANTS if resnet else {"rlra": [], "lra_e": []}
        for label, extra in variants.items():
            rule = "lra_e" if label == "lra_e" else "rlra"
            module = build_module(rule, [*model, *extra], shape)
            mem = module.error_synapse_memory()
            rows.append({"benchmark": "error_synapse_memory", "case": case, "rule": label,
                         "dense_bytes": mem["dense"], "conv_bytes": mem["conv"], "lowrank_bytes": mem["lowrank"],
                         "total_bytes": mem["total"],
                         "model_param_bytes": sum(p.numel() * p.element_size() for p in module.model.parameters()),
                         "total_mib": round(mem["total"] / 2 ** 20, 3)})
    return rows


@BENCHMARKS.register("rlra")
def run(args) -> list[dict]:
    repeats = 5 if args.quick else args.repeats
    return update_rows(repeats) + memory_rows()
