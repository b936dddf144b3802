"""CI accuracy regression: every registered rule on a fixed fast config, against ``results/baselines``.

The baseline file holds the shared config (a dotlist) and, per rule, its own overrides (a rule that
needs another model or a cheaper inner loop), the test accuracy measured when the baseline was
written, the tolerance, and the exact command, commit and machine that produced it. ``make regress``
reruns every rule and fails when a rule's accuracy moves by more than its tolerance **in either
direction**: a drop is a regression, and a jump means the rule computes something else than when
its baseline was taken (both need a look, and a deliberate change is recorded with ``make
baseline``). A registered rule without a baseline fails the test suite (tests/test_regress.py), so
a new rule cannot skip the guard.

Runs are deterministic on one machine (seeded, in-memory data, a fixed thread count); the tolerance
absorbs BLAS differences across CPUs.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import tempfile
from pathlib import Path

from bench.config import compose
from bench.console import interactive
from bench.results.io import write_json
from bench.results.run import device_name, git_commit

# A fast config: 1 epoch of a 3×256 tanh MLP on 5,000 FMNIST images, a few seconds per rule.
DEFAULT_CONFIG = [
    "data.name=fmnist", "data.train_subset=5000", "data.batch_size=64",
    "model.name=mlp", "model.depth=3", "model.width=256", "model.activation=tanh",
    "model.init=gaussian", "model.sigma=0.05",
    "algorithm.optimizer=adam", "algorithm.lr=1e-3",
    "trainer.epochs=1", "trainer.threads=2", "seed=0",
    "probe.every=0", "output.checkpoint=false", "output.progress=none",
]
TOLERANCE = 1.5  # accuracy points, either direction
# Rules that need something else than the shared config, and why. Two rules sit near chance on
# this one-epoch config (baseline: tp 12.9 %, sdfa 18.3 %): their guard flags a jump (the rule
# changed) but cannot flag a drop.
RULE_OVERRIDES: dict[str, list[str]] = {
    # Equilibrium propagation relaxes the network for every batch: a smaller subset and shorter
    # relaxations keep it to seconds. With the rule's defaults (one-sided nudging) it sat at 14.3 %
    # here, a guard that cannot flag a drop; rlra-1's symmetric setting (its E-Prop decision) with
    # the feed-forward start learns to ~51 % on 2,000 images at Adam 2e-4 (32 % on 1,000 at 1e-3).
    "eprop": ["data.train_subset=2000", "algorithm.lr=2e-4", "algorithm.nudging=symmetric", "algorithm.beta=0.5",
              "algorithm.free_init=feedforward", "algorithm.n_free=20", "algorithm.n_nudged=4"],
    # Associated Learning trains its folded MLP (f/g/h/bridges), not the zoo MLP, at the authors' lr
    # 1e-4 and batch 32 for 3 epochs (468 steps). Its inference path h_1∘…∘h_K returns the same
    # scores for every input until the g/h autoencoders spread the class codes apart (~200–300
    # steps at lr 1e-4): 1 epoch at lr 1e-3 and batch 64 (78 steps) ended on that plateau at 10.0 %.
    "al": ["model.name=al_mlp", "algorithm.lr=1e-4", "data.batch_size=32", "trainer.epochs=3"],
}


def rule_config(config: list[str], rule: str, overrides: list[str], output_root: str):
    """The shared config with the rule's overrides; a rule that names another model drops the shared
    model's keys (they describe the zoo MLP)."""
    if any(o.startswith("model.name=") for o in overrides):
        config = [c for c in config if not c.startswith("model.")]
    return compose(overrides=[*config, f"algorithm.name={rule}", *overrides, f"output.root={output_root}"])


def registered_rules() -> list[str]:
    from bench.algorithms import RULES

    return RULES.names()


def measure(config: list[str], rules: dict[str, list[str]]) -> dict[str, float]:
    """Test accuracy of every rule (name → its overrides) on the shared config."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from bench.run.train import train

    quiet = not interactive()
    accuracies = {}
    with tempfile.TemporaryDirectory() as tmp, Progress(
            TextColumn("[bold]regress {task.fields[rule]}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            disable=quiet) as progress:
        task = progress.add_task("regress", total=len(rules), rule="")
        for rule, overrides in rules.items():
            progress.update(task, rule=rule)
            summary = train(rule_config(config, rule, overrides, tmp))
            if summary["status"] != "finished":
                raise RuntimeError(f"regress: {rule} ended with status {summary['status']}: {summary.get('error', '')}")
            accuracies[rule] = round(100.0 - summary["final"]["test/err1"], 3)
            if quiet:
                print(f"regress {rule}: {accuracies[rule]:.2f} %", flush=True)
            progress.advance(task)
    return accuracies


def write_baseline(path: Path, only: list[str] | None = None) -> dict:
    """Measure (every registered rule, or ``only``) and write the baseline file; rules not measured
    keep their previous entry."""
    rules = {r: RULE_OVERRIDES.get(r, []) for r in (only or registered_rules())}
    accuracies = measure(DEFAULT_CONFIG, rules)
    old = json.loads(path.read_text()) if path.exists() else {}
    entries = dict(old.get("rules", {})) if only else {}
    machine, commit = device_name(), git_commit()
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    for rule, acc in accuracies.items():
        shared = [c for c in DEFAULT_CONFIG if not (c.startswith("model.") and any(o.startswith("model.name=") for o in rules[rule]))]
        command = " ".join(["python -m bench run", *map(shlex.quote, [*shared, f"algorithm.name={rule}", *rules[rule]])])
        entries[rule] = {"test_acc": acc, "tolerance": TOLERANCE, "overrides": rules[rule], "command": command,
                         "git_commit": commit, "machine": machine, "written": when}
    write_json(path, {
        "about": "test accuracy (%) of every registered rule on a fixed fast FMNIST config, measured by "
                 "`make baseline` (python -m bench regress --write); `make regress` flags a move beyond the "
                 "tolerance in either direction",
        "config": DEFAULT_CONFIG, "rules": dict(sorted(entries.items())),
    })
    return accuracies


def compare(baseline: dict, accuracies: dict[str, float]) -> tuple[list[tuple], list[str]]:
    """Rows (rule, baseline, measured, Δ, tolerance, ok) and the rules that moved beyond tolerance."""
    rows, failed = [], []
    for rule, ref in baseline["rules"].items():
        delta = accuracies[rule] - ref["test_acc"]
        ok = abs(delta) <= ref["tolerance"]
        failed += [] if ok else [rule]
        rows.append((rule, ref["test_acc"], accuracies[rule], delta, ref["tolerance"], ok))
    return rows, failed


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from bench.run.train import quiet_lightning

    quiet_lightning()
    path = Path(args.baseline)
    if args.write:
        accuracies = write_baseline(path, getattr(args, "only", None))
        print(f"wrote {path}: {json.dumps(accuracies)}")
        return 0
    if not path.exists():
        print(f"error: no baseline at {path}; create it with `make baseline`", file=sys.stderr)
        return 2
    baseline = json.loads(path.read_text())
    missing = sorted(set(registered_rules()) - set(baseline["rules"]))
    if missing:
        print(f"error: {path} has no baseline for {', '.join(missing)}; measure it with "
              f"`python -m bench regress --write --only {' '.join(missing)}`", file=sys.stderr)
        return 2
    rules = {r: ref.get("overrides", []) for r, ref in baseline["rules"].items() if r in registered_rules()}
    accuracies = measure(list(baseline["config"]), rules)
    baseline = {**baseline, "rules": {r: ref for r, ref in baseline["rules"].items() if r in rules}}
    rows, failed = compare(baseline, accuracies)
    table = Table(title=f"accuracy regression vs {path} ({device_name()})")
    for col in ("rule", "baseline %", "measured %", "Δ", "tolerance (±)", "ok"):
        table.add_column(col)
    for rule, ref, acc, delta, tol, ok in rows:
        table.add_row(rule, f"{ref:.2f}", f"{acc:.2f}", f"{delta:+.2f}", f"{tol:.2f}", "yes" if ok else "NO")
    Console().print(table)
    if failed:
        print(f"regress: FAILED for {', '.join(failed)} (moved by more than the tolerance; a jump means the rule "
              f"changed: rerun `make baseline` if the change is deliberate)")
        return 1
    print(f"regress: {len(rows)} passed, 0 failed")
    return 0
