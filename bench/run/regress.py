"""CI accuracy regression: rerun fixed fast FMNIST configs and compare with ``results/baselines``.

The baseline file holds the config (a dotlist), and per rule the test accuracy measured when the
baseline was written and the tolerance: the run fails when a rule's accuracy falls more than its
tolerance below the baseline. Runs are deterministic on one machine (seeded, in-memory data,
fixed thread count); the tolerance absorbs BLAS differences across CPUs.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import tempfile
from pathlib import Path

from bench.config import compose
from bench.console import interactive
from bench.results.io import write_json
from bench.results.run import device_name, git_commit

# A fast config: 2 epochs of a 3×256 tanh MLP on 10,000 FMNIST images (~1 min for all rules).
DEFAULT_CONFIG = [
    "data.name=fmnist", "data.train_subset=10000", "data.batch_size=64",
    "model.name=mlp", "model.depth=3", "model.width=256", "model.activation=tanh",
    "model.init=gaussian", "model.sigma=0.05",
    "algorithm.optimizer=adam", "algorithm.lr=1e-3",
    "trainer.epochs=2", "trainer.threads=2", "seed=0",
    "probe.every=0", "output.checkpoint=false", "output.progress=none",
]
DEFAULT_RULES = {"bp": 1.5, "fa": 1.5, "dfa": 1.5}  # tolerance in accuracy points


def measure(config: list[str], rules: list[str]) -> dict[str, float]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from bench.run.train import train

    quiet = not interactive()
    accuracies = {}
    with tempfile.TemporaryDirectory() as tmp, Progress(
            TextColumn("[bold]regress {task.fields[rule]}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            disable=quiet) as progress:
        task = progress.add_task("regress", total=len(rules), rule="")
        for rule in rules:
            progress.update(task, rule=rule)
            cfg = compose(overrides=[*config, f"algorithm.name={rule}", f"output.root={tmp}"])
            summary = train(cfg)
            if summary["status"] != "finished":
                raise RuntimeError(f"regress: {rule} ended with status {summary['status']}: {summary.get('error', '')}")
            accuracies[rule] = round(100.0 - summary["final"]["test/err1"], 3)
            progress.advance(task)
    return accuracies


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from bench.run.train import quiet_lightning

    quiet_lightning()
    path = Path(args.baseline)
    if args.write:
        accuracies = measure(DEFAULT_CONFIG, list(DEFAULT_RULES))
        write_json(path, {
            "about": "test accuracy (%) of a fixed fast FMNIST config, measured by `python -m bench regress --write`",
            "config": DEFAULT_CONFIG,
            "rules": {r: {"test_acc": a, "tolerance": DEFAULT_RULES[r]} for r, a in accuracies.items()},
            "device": device_name(), "git_commit": git_commit(),
            "written": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        })
        print(f"wrote {path}: {json.dumps(accuracies)}")
        return 0
    if not path.exists():
        print(f"error: no baseline at {path}; create it with `python -m bench regress --write`")
        return 2
    baseline = json.loads(path.read_text())
    accuracies = measure(list(baseline["config"]), list(baseline["rules"]))
    table = Table(title=f"accuracy regression vs {path} ({device_name()})")
    for col in ("rule", "baseline %", "measured %", "Δ", "tolerance", "ok"):
        table.add_column(col)
    failed = []
    for rule, ref in baseline["rules"].items():
        delta = accuracies[rule] - ref["test_acc"]
        ok = delta >= -ref["tolerance"]
        failed += [] if ok else [rule]
        table.add_row(rule, f"{ref['test_acc']:.2f}", f"{accuracies[rule]:.2f}", f"{delta:+.2f}",
                      f"{ref['tolerance']:.2f}", "yes" if ok else "NO")
    Console().print(table)
    if failed:
        print(f"regress: FAILED for {', '.join(failed)}")
        return 1
    print(f"regress: {len(baseline['rules'])} passed, 0 failed")
    return 0
