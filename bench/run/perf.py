"""``make perf``: speed of every rule as a ratio to backprop, measured side by side in one process.

These machines are noisy, so nothing here is a test and every number is a ratio taken with the
rules interleaved: each repeat times every rule once, in a shuffled order, on the same batch, and
the reported ratio is the median over repeats of (rule time / BP time in that repeat).

* **update time** = forward + the rule's backward, up to the point where every ``.grad`` is set
  (``objective`` + ``backward``); the optimizer step, identical for every rule, is timed apart.
* **suite overhead** = the suite's train-only BP epoch (EpochTimer) ÷ a plain PyTorch loop over
  the same in-memory data with the same model, optimizer and batch size. Two more rows split it:
  a minimal manual-optimization LightningModule on the same data ÷ the plain loop (what Lightning's
  Trainer itself costs per step), and the suite ÷ that minimal module (what the suite adds).
* **probe overhead** = probe seconds ÷ train seconds at the default probe interval.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.config import compose
from bench.results.io import write_csv
from bench.results.run import device_name

UPDATE_CASES = [
    # (name, model overrides, data shape, rules, targets {rule: max ratio})
    ("mlp-3x800-tanh", ["model.name=mlp", "model.depth=3", "model.width=800", "model.activation=tanh"],
     [1, 28, 28], {"fa": 1.05, "dfa": 0.85, "usf_init": 1.05, "usf_sn": 1.05, "kp": 1.15}),
    ("sfa-mnist-cnn", ["model.name=sfa_mnist"], [1, 28, 28], {"fa": 1.05, "usf_init": 1.05, "usf_sn": 1.05, "kp": 1.15}),
    ("dfa4-cnn", ["model.name=cnn", "model.channels=[32,64,64]", "model.kernel=5", "model.activation=tanh"],
     [3, 32, 32], {"dfa": 1.0}),
    ("rlra1-mlp-5x256", ["model.name=mlp", "model.depth=5", "model.width=256", "model.activation=tanh"],
     [1, 28, 28], {"rlra": 1.0}),
]


def build_module(rule: str, model_overrides: list[str], shape: list[int], num_classes: int = 10, seed: int = 0):
    from bench.algorithms import RULES
    from bench.models import create_model

    cfg = compose(overrides=[f"algorithm.name={rule}", f"seed={seed}", "data.name=synthetic",
                             f"data.shape=[{','.join(map(str, shape))}]", *model_overrides])
    torch.manual_seed(seed)
    model = create_model(cfg.model, tuple(shape), num_classes)
    return RULES.get(rule)(cfg, model, num_classes, tuple(shape))


def flops(module, x, y) -> int:
    """Floating-point operations of one update (forward + the rule's backward), by torch's counter."""
    from torch.utils.flop_counter import FlopCounterMode, addmm_flop

    # torch counts addmm but not its in-place form, which rules that write updates straight into
    # their .grad buffers use (PEPITA): without this their products would go uncounted. The
    # mapping takes torch's own addmm formula unwrapped (FlopCounterMode wraps it again).
    in_place = {torch.ops.aten.addmm_: addmm_flop.__wrapped__}
    with FlopCounterMode(display=False, custom_mapping=in_place) as counter:
        surrogate, _, _ = module.objective(x, y)
        surrogate.backward()
    for p in module.parameters():
        p.grad = None
    return counter.get_total_flops()


def time_update(module, x, y, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        for p in module.parameters():  # the rule's own parameters too (error synapses, inverses)
            p.grad = None
        surrogate, _, _ = module.objective(x, y)
        surrogate.backward()
    return (time.perf_counter() - start) / iters


def _time_step(optimizer, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        optimizer.step()
    return (time.perf_counter() - start) / iters


def interleaved_times(modules: dict, x, y, repeats: int, iters: int, warmup: int = 2) -> tuple[dict, dict]:
    """Seconds per update and per optimizer step of every module, one entry per repeat. Each repeat
    times every module once, in a fresh random order, on the same batch, so slow phases of a noisy
    machine hit all of them alike; callers report medians of per-repeat ratios."""
    optimizers = {k: torch.optim.Adam(m.parameters(), lr=1e-6, fused=True) for k, m in modules.items()}
    for k, m in modules.items():  # warm-up: allocator, kernels, optimizer state
        time_update(m, x, y, warmup)
        optimizers[k].step()
    times = {k: [] for k in modules}
    steps = {k: [] for k in modules}
    order = list(modules)
    for _ in range(repeats):
        random.shuffle(order)
        for k in order:
            times[k].append(time_update(modules[k], x, y, iters))
            steps[k].append(_time_step(optimizers[k], iters))
    return times, steps


def update_ratios(repeats: int, batch: int = 128, iters: int = 5, cases=UPDATE_CASES) -> list[dict]:
    rows = []
    for case, overrides, shape, targets in cases:
        rules = ["bp", *targets]
        modules = {r: build_module(r, overrides, shape) for r in rules}
        x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
        times, steps = interleaved_times(modules, x, y, repeats, iters)
        for r in rules:
            ratios = [t / b for t, b in zip(times[r], times["bp"])]
            ratio = statistics.median(ratios)
            target = targets.get(r)
            rows.append({
                "benchmark": "update_time", "case": case, "rule": r, "batch": batch,
                "median_ms": 1000 * statistics.median(times[r]),
                "optimizer_step_ms": 1000 * statistics.median(steps[r]),
                "ratio_to_bp": ratio, "target": f"<= {target}" if target else "",
                "meets_target": (ratio <= target) if target else "",
            })
    return rows


def _epoch_data(limit_batches: int | None):
    """FMNIST when installed (the issue's protocol), else the synthetic stand-in of the same shape."""
    from bench.data import DataUnavailable, create_datamodule

    for name in ("fmnist", "synthetic"):
        cfg = compose(overrides=["algorithm.name=bp", "model.name=mlp", "model.depth=5", "model.width=256",
                                 "model.activation=tanh", "data.batch_size=32", f"data.name={name}",
                                 "data.n_train=60000", "algorithm.lr=2e-4", "probe.every=0", "output.checkpoint=false",
                                 "output.progress=none", "trainer.epochs=1"])
        if limit_batches:
            cfg.data.train_subset = limit_batches * 32
        try:
            dm = create_datamodule(cfg.data, seed=0)
            dm.prepare_data()
            dm.setup("fit")
            return cfg, dm
        except DataUnavailable:
            continue
    raise RuntimeError("no data for the epoch benchmark")


def plain_epoch(cfg, dm) -> float:
    """The floor: the same model, data, optimizer and batch size in a hand-written loop."""
    from bench.models import create_model

    torch.manual_seed(0)
    model = create_model(cfg.model, dm.input_shape, dm.num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.algorithm.lr, fused=True)
    loader = dm.train_dataloader()
    start = time.perf_counter()
    for x, y in loader:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def lightning_floor_epoch(cfg, dm) -> float:
    """The same loop as :func:`plain_epoch` as a bare manual-optimization LightningModule under a
    Trainer with logging, checkpoints, progress and summary off: the per-step cost of Lightning's
    loop, hooks and optimizer wrapper that any Lightning-based suite pays."""
    import lightning as L

    from bench.models import create_model

    class Bare(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            torch.manual_seed(0)
            self.model = create_model(cfg.model, dm.input_shape, dm.num_classes)

        def training_step(self, batch, batch_idx):
            x, y = batch
            opt = self.optimizers()
            opt.zero_grad(set_to_none=True)
            self.manual_backward(F.cross_entropy(self.model(x), y))
            opt.step()

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=cfg.algorithm.lr, fused=True)

        def train_dataloader(self):
            return dm.train_dataloader()

    class Clock(L.Callback):  # epoch start to last batch end, as EpochTimer measures
        def on_train_epoch_start(self, *_):
            self.start = time.perf_counter()

        def on_train_batch_end(self, *_):
            self.end = time.perf_counter()

    clock = Clock()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[clock])
    trainer.fit(Bare())
    return clock.end - clock.start


def suite_epoch(cfg, out_root: Path, tag: str) -> tuple[float, float]:
    from bench.run.train import train

    cfg = cfg.copy()
    cfg.output.root = str(out_root / tag)
    summary = train(cfg)
    return summary["time"]["epoch_s_mean"], summary["time"]["probe_s_total"]


def epoch_ratios(repeats: int, out_root: Path, limit_batches: int | None = None) -> list[dict]:
    cfg, dm = _epoch_data(limit_batches)
    suite, plain, bare = [], [], []
    for i in range(repeats):
        suite.append(suite_epoch(cfg, out_root, f"suite{i}")[0])
        plain.append(plain_epoch(cfg, dm))
        bare.append(lightning_floor_epoch(cfg, dm))
    ratio = statistics.median(s / p for s, p in zip(suite, plain))
    case = f"mlp-5x256-tanh {cfg.data.name} b32"
    row = {"benchmark": "", "case": case, "rule": "bp", "batch": 32, "optimizer_step_ms": "", "target": "", "meets_target": ""}
    rows = [{**row, "benchmark": "suite_epoch", "median_ms": 1000 * statistics.median(suite), "ratio_to_bp": ratio,
             "target": "<= 1.2 (vs plain PyTorch loop)", "meets_target": ratio <= 1.2},
            {**row, "benchmark": "plain_epoch", "median_ms": 1000 * statistics.median(plain), "ratio_to_bp": 1.0},
            {**row, "benchmark": "lightning_floor_epoch (vs plain loop)", "median_ms": 1000 * statistics.median(bare),
             "ratio_to_bp": statistics.median(b / p for b, p in zip(bare, plain))},
            {**row, "benchmark": "suite_over_lightning_floor", "median_ms": "",
             "ratio_to_bp": statistics.median(s / b for s, b in zip(suite, bare))}]
    # Probe overhead at the default interval, on the same epoch.
    default_every = int(compose().probe.every)
    probed = cfg.copy()
    probed.probe.every = default_every
    fractions = []
    for i in range(max(1, repeats // 2)):
        epoch_s, probe_s = suite_epoch(probed, out_root, f"probe{i}")
        fractions.append(probe_s / epoch_s)
    frac = statistics.median(fractions)
    rows.append({"benchmark": "probe_overhead", "case": f"every {default_every} steps", "rule": "bp", "batch": 32,
                 "median_ms": "", "optimizer_step_ms": "", "ratio_to_bp": frac, "target": "<= 0.05 of epoch time",
                 "meets_target": frac <= 0.05})
    return rows


def _print(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    cols = list(dict.fromkeys(k for r in rows for k in r if k not in ("device", "repeats", "torch_threads")))
    table = Table(title=title)
    for col in cols:
        table.add_column(col)
    for r in rows:
        table.add_row(*[f"{r.get(c):.3f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols])
    Console().print(table)


def main(args: argparse.Namespace) -> None:
    import tempfile

    from bench.run.benchmarks import BENCHMARKS
    from bench.run.train import quiet_lightning

    quiet_lightning()
    repeats = 5 if args.quick else args.repeats
    device = device_name()
    out = Path(args.out)
    only = getattr(args, "only", None)
    if only in (None, "core"):
        rows = update_ratios(repeats)
        with tempfile.TemporaryDirectory() as tmp:
            rows += epoch_ratios(2 if args.quick else 3, Path(tmp), limit_batches=200 if args.quick else None)
        for r in rows:
            r["device"], r["repeats"] = device, repeats
            r["torch_threads"] = torch.get_num_threads()
        write_csv(out, rows)
        _print(rows, f"perf ({device}); ratios are medians of per-repeat ratios")
        print(f"wrote {out}")
    if only is None:
        names = BENCHMARKS.names()
    else:
        names = [] if only == "core" else [only]
    for name in names:
        rows = BENCHMARKS.get(name)(args)  # an unknown name is one line listing the valid ones
        for r in rows:
            r.setdefault("device", device)
        path = out.with_name(f"{name}.csv")
        write_csv(path, rows)
        _print(rows, f"perf: {name} ({device})")
        print(f"wrote {path}")
