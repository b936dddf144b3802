"""``python -m bench leaderboard <workload>``: which rule reaches a target validation accuracy first.

Measured the way AlgoPerf measures time-to-result (Dahl et al., *Benchmarking neural network
training algorithms*, 2023, arXiv:2306.07179): the clock is **train-only** (the epoch timer's
seconds, which leave out validation and the probe), and the **first evaluation** that reaches the
target counts (here an evaluation is the end-of-epoch validation pass). A rule that never gets there
within the workload's epochs reads "not reached".

A workload is a config file, ``configs/leaderboards/<id>.yaml``: the config every rule shares (a
dotlist), the target (``metric`` and ``at_most``), the epochs, and the rules left out with a reason.
Every registered rule that builds on the workload's model takes part. Each rule's run is an
ordinary ad-hoc run folder (``runs/adhoc/<rule>-…-<hash>/s<seed>``): a finished run of the same
config is reused, not rerun, and a killed one resumes. Any other finished run folder under the
output root whose config computes the same thing (a table run of the same protocol, say) is
reused too.

Writes ``results/leaderboard-<id>.md``, its ``.csv`` and ``results/plots/leaderboard-<id>.png``
(validation error against train-only seconds, every rule on one axis).
"""
from __future__ import annotations

import math
import statistics
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from bench.config import CONFIG_DIR, ConfigError, compose, config_hash, load_spec
from bench.results import plots
from bench.results.io import read_csv, write_csv, write_text

LEADERBOARD_KEYS = {"id", "title", "config", "target", "epochs", "exclude", "rule_overrides", "rules"}


def workload_ids() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "leaderboards").glob("*.yaml"))


def load_workload(workload: str):
    spec = load_spec("leaderboards", "leaderboard workload", workload, LEADERBOARD_KEYS, ("id", "config", "target", "epochs"))
    if set(spec.target) != {"metric", "at_most"}:
        raise ConfigError(f"leaderboard workload {workload}: target must be {{metric: <metrics.csv column>, at_most: <value>}}")
    return spec


def rule_overrides(spec, rule: str, output_root: str | None = None, seed: int = 0) -> list[str]:
    overrides = [*spec.config, f"algorithm.name={rule}", f"trainer.epochs={int(spec.epochs)}", f"seed={seed}",
                 *((spec.get("rule_overrides") or {}).get(rule) or [])]
    if output_root:
        overrides.append(f"output.root={output_root}")
    return overrides


def rule_config(spec, rule: str, output_root: str | None = None, seed: int = 0):
    return compose(overrides=rule_overrides(spec, rule, output_root, seed))


def train_in_own_process(overrides: list[str]) -> int:
    """``python -m bench run`` of one rule, in a process of its own: on CPU the peak-memory figure is
    the process's RSS high-water mark, which one shared process would carry from each rule to the
    next (the first leaderboard ran every rule in one process and read the same 2,557 MB for most)."""
    return subprocess.run([sys.executable, "-m", "bench", "run", *overrides]).returncode


def _same_computation(cfg) -> str:
    plain = OmegaConf.to_container(cfg, resolve=True)
    for key in ("table", "row", "column", "budget", "variant"):
        plain[key] = None
    return config_hash(OmegaConf.create(plain))


def reusable_folder(cfg, root: Path) -> Path | None:
    """A finished run folder under ``root`` that computed what ``cfg`` computes (table runs included)."""
    want = _same_computation(cfg)
    for saved in sorted(root.rglob("config.yaml")):
        summary = saved.parent / "summary.json"
        if summary.exists() and '"finished"' in summary.read_text() and \
                int(OmegaConf.load(saved).seed) == int(cfg.seed) and _same_computation(OmegaConf.load(saved)) == want:
            return saved.parent
    return None


def participants(spec) -> tuple[list[str], dict[str, str]]:
    """(rules that take part, {rule: why not}) — every registered rule that builds on the model."""
    from bench.algorithms import RULES
    from bench.models import create_model

    rules, left_out = [], dict(spec.get("exclude") or {})
    only = spec.get("rules")  # an explicit list; default: every registered rule
    for rule in RULES.names():
        if rule in left_out or (only is not None and rule not in only):
            continue
        try:
            cfg = rule_config(spec, rule)
            shape = [1, 28, 28] if cfg.data.name in ("fmnist", "mnist") else list(cfg.data.shape)
            cfg.data.shape = shape
            RULES.get(rule)(cfg, create_model(cfg.model, tuple(shape), 10), 10, tuple(shape))
        except (ValueError, NotImplementedError) as exc:
            left_out[rule] = f"does not train this model: {str(exc).splitlines()[0]}"
            continue
        rules.append(rule)
    return rules, left_out


def time_to_target(rows: list[dict], metric: str, at_most: float) -> dict:
    """From a run's metrics.csv rows (one per epoch): the train-only seconds and epochs at the first
    evaluation with ``metric`` ≤ ``at_most``, or None; and the curve (train seconds, metric)."""
    seconds, curve, hit = 0.0, [], None
    for row in rows:
        epoch_s = float(row.get("time/epoch_s") or "nan")
        seconds += epoch_s
        value = row.get(metric)
        if value in (None, ""):
            continue
        value = float(value)
        curve.append((seconds, value))
        if hit is None and value <= at_most:
            hit = {"seconds": seconds, "epochs": int(row["epoch"]) + 1}
    return {"hit": hit, "curve": curve}


def run(workload: str, output_root: str | None = None, results: str = "results", train=None, progress=print) -> Path:
    """Run (or reuse) every participant, each in its own process, then write the leaderboard.
    ``train(cfg)`` replaces the process launch (tests)."""
    spec = load_workload(workload)
    rules, left_out = participants(spec)
    entries = []
    for rule in rules:
        overrides = rule_overrides(spec, rule, output_root)
        cfg = compose(overrides=overrides)
        root = Path(cfg.output.root)
        folder = reusable_folder(cfg, root) if root.exists() else None
        if folder is None:
            if train is None:
                status = train_in_own_process(overrides)
                if status != 0:  # its summary (failed, or none) still makes its row; say why here
                    progress(f"{rule}: python -m bench run exited with status {status}")
            else:
                train(cfg)
            from bench.run.plan import RunPlan

            folder = RunPlan.of(cfg).run_dir
        else:
            progress(f"{rule}: reusing {folder}")
        summary = OmegaConf.to_container(OmegaConf.load(folder / "summary.json")) if (folder / "summary.json").exists() else {}
        rows = read_csv(folder / "metrics.csv") if (folder / "metrics.csv").exists() else []
        result = time_to_target(rows, str(spec.target.metric), float(spec.target.at_most))
        final = summary.get("final") or {}
        steps = [float(r["time/step_median_ms"]) for r in rows if r.get("time/step_median_ms")]
        entries.append({
            "rule": rule, "status": summary.get("status", "missing"), "run": str(folder),
            "seconds_to_target": round(result["hit"]["seconds"], 1) if result["hit"] else "",
            "epochs_to_target": result["hit"]["epochs"] if result["hit"] else "",
            "best_val_acc": round(100.0 - min(v for _, v in result["curve"]), 2) if result["curve"] else "",
            "test_acc": round(100.0 - float(final["test/err1"]), 2) if "test/err1" in final else "",
            "median_step_ms": round(statistics.median(steps), 2) if steps else "",
            "peak_mem_mb": round(float((summary.get("memory") or {}).get("peak_mb") or float("nan")), 1),
            "device": summary.get("device", ""), "curve": result["curve"],
        })
        progress(f"{rule}: " + (f"{entries[-1]['seconds_to_target']} s, {entries[-1]['epochs_to_target']} epochs"
                                if result["hit"] else "target not reached"))
    return write(spec, entries, left_out, Path(results))


def write(spec, entries: list[dict], left_out: dict[str, str], results: Path) -> Path:
    order = sorted(entries, key=lambda e: (e["seconds_to_target"] == "", e["seconds_to_target"] or math.inf,
                                           -(e["best_val_acc"] or 0)))
    metric, target = str(spec.target.metric), float(spec.target.at_most)
    devices = sorted({e["device"] for e in entries if e["device"]})
    lines = [f"# Leaderboard `{spec.id}`: {spec.get('title', '')}", "",
             f"Target: `{metric}` ≤ {target:g} at an end-of-epoch evaluation, within {int(spec.epochs)} epochs. "
             "Time is train-only wall-clock (no validation, no probe), summed over epochs up to the first evaluation "
             f"that reaches the target. Device: {'; '.join(devices) or 'unknown'}. One seed per rule. "
             f"Workload: `configs/leaderboards/{spec.id}.yaml`.", "",
             "| rank | rule | train seconds to target | epochs to target | best val acc % | test acc % | median step ms | peak memory MB |",
             "|---|---|---|---|---|---|---|---|"]
    for rank, e in enumerate(order, 1):
        reached = e["seconds_to_target"] != ""
        lines.append(f"| {rank if reached else '–'} | `{e['rule']}` | {e['seconds_to_target'] if reached else 'not reached'} | "
                     f"{e['epochs_to_target'] if reached else '–'} | {e['best_val_acc']} | {e['test_acc']} | "
                     f"{e['median_step_ms']} | {e['peak_mem_mb']} |")
    if left_out:
        lines += ["", "Left out:", *[f"- `{r}`: {why}" for r, why in sorted(left_out.items())]]
    md = results / f"leaderboard-{spec.id}.md"
    write_text(md, "\n".join(lines) + "\n")
    write_csv(md.with_suffix(".csv"), [{k: v for k, v in e.items() if k != "curve"} for e in order])
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.8))
    drawn = [e for e in order if e["curve"]]
    for e, style in zip(drawn, plots.distinct_styles(len(drawn))):
        xs, ys = zip(*e["curve"])
        ax.plot(xs, ys, markersize=3, linewidth=1.2, label=e["rule"], **style)
    ax.axhline(target, color="0.3", linestyle="--", linewidth=0.8, label=f"target {target:g} %")
    # a log clock: the rules' times to target span more than a decade (a few s to minutes per epoch)
    if drawn and min(x for e in drawn for x, _ in e["curve"]) > 0:
        ax.set_xscale("log")
    ax.set_xlabel("train-only seconds (log scale)" if ax.get_xscale() == "log" else "train-only seconds")
    ax.set_ylabel("validation error (%)")
    ax.set_title(f"Leaderboard {spec.id}")
    ax.legend(title="rule (ranked)", fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    plots.annotate(fig, plots.provenance("leaderboard", [int(spec.epochs)], 1, devices))
    plots.save(fig, results / "plots" / f"leaderboard-{spec.id}.png")
    return md
