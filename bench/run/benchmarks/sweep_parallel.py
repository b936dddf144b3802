"""sweep_parallel: the local sweep runner at ``--parallel 2`` against ``--parallel 1`` (issue 6).

Target: on 2 cores, ``python -m bench sweep <id> --local --parallel 2`` finishes a 4-run smoke
grid in ≤ 0.65× the wall-clock of ``--parallel 1``. The runner gives each worker
``cores // parallel`` torch threads (``trainer.threads`` and ``OMP_NUM_THREADS``), so both settings
use every core: one run with 2 threads, or two runs with 1 thread each. Two runs at a time win
because a run is not all parallel work: its Python start-up (torch and Lightning imports), data
set-up and per-step Python overhead use one core, and small-batch MLP kernels gain little from a
second thread.

What is timed is the whole command a user types, in a fresh process: ``python -m bench sweep
<id> --local --budget smoke --parallel N`` on a 2×2 grid (BP and FA × two synthetic data sets,
a 3×256 tanh MLP, 4,000 training samples at batch 32: one smoke epoch, 125 steps a run), into
an empty run folder root each time so nothing is skipped. Each repeat times both settings, in a
shuffled order, and the reported ratio is the median over repeats of the per-repeat ratio. The
torch thread count each run really used is read back from its summary (``device``), and the
1-minute load average before each timing is recorded: on a shared machine other processes
change both timings, which is why the ratio is taken repeat by repeat.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

from bench.run.benchmarks import BENCHMARKS
from bench.config import CONFIG_DIR
from bench.results.io import read_json

TABLE_ID = "perf-sweep-parallel"
TARGET = 0.65
GRID = {
    "id": TABLE_ID, "title": "Local sweep runner benchmark: 2 rules x 2 synthetic data sets",
    "metric": {"name": "error", "unit": "%", "fields": {"test": "test/err1"}},
    "columns": {
        f"synthetic-{k}": {"data": {"name": "synthetic", "shape": [1, 28, 28], "num_classes": k, "n_train": 4500,
                                    "val_size": 500, "n_test": 1000, "batch_size": 32}}
        for k in (10, 5)
    },
    "common": {"model": {"name": "mlp", "depth": 3, "width": 256, "activation": "tanh"},
               "algorithm": {"optimizer": "adam", "lr": 1e-3}},
    "rows": {"BP": {"algorithm": {"name": "bp"}}, "FA": {"algorithm": {"name": "fa"}}},
    "budgets": {"smoke": {"epochs": 1, "seeds": 1}},
}
RUNS = 4


def write_configs(root: Path) -> Path:
    """A copy of configs/ with the benchmark's table (the real configs are never touched)."""
    configs = root / "configs"
    shutil.copytree(CONFIG_DIR, configs)
    (configs / "tables" / f"{TABLE_ID}.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(GRID)))
    return configs


def time_sweep(configs: Path, parallel: int, out: Path) -> dict:
    """Wall-clock of one ``bench sweep --local`` invocation on an empty run root."""
    env = dict(os.environ, BENCH_CONFIGS=str(configs), CI="true", PYTHONWARNINGS="ignore")
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "LOCAL_RANK"):  # the runner sets these per worker
        env.pop(key, None)
    load = os.getloadavg()[0]
    cmd = [sys.executable, "-m", "bench", "sweep", TABLE_ID, "--local", "--budget", "smoke", "--parallel",
           str(parallel), "--output-root", str(out / "runs"), "--results", str(out / "results")]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[3])
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    summaries = [read_json(p) for p in (out / "runs").rglob("summary.json")]
    if len(summaries) != RUNS or any(s["status"] != "finished" for s in summaries):
        raise RuntimeError(f"expected {RUNS} finished runs under {out / 'runs'}, found {len(summaries)}")
    # device_name() records torch.get_num_threads() of the run: "cpu (x86_64, 2 cores, 1 threads)"
    threads = {int(re.search(r"(\d+) threads", s["device"]).group(1)) for s in summaries}
    epoch_s = statistics.fmean(s["time"]["epoch_s_mean"] for s in summaries)
    shutil.rmtree(out)
    return {"seconds": seconds, "threads": threads, "epoch_s": epoch_s, "load": load}


@BENCHMARKS.register("sweep_parallel")
def run(args) -> list[dict]:
    from bench.run.sweep import usable_cores

    repeats = 1 if getattr(args, "quick", False) else min(int(getattr(args, "repeats", 3)), 3)
    settings = (1, 2)
    times: dict[int, list[dict]] = {p: [] for p in settings}
    with tempfile.TemporaryDirectory(prefix="bench-sweep-perf-") as tmp:
        configs = write_configs(Path(tmp))
        order = list(settings)
        for i in range(repeats):
            random.shuffle(order)
            for parallel in order:
                t = time_sweep(configs, parallel, Path(tmp) / f"p{parallel}-{i}")
                times[parallel].append(t)
                print(f"  repeat {i + 1}/{repeats}: --parallel {parallel}: {t['seconds']:.1f} s "
                      f"(threads per run {sorted(t['threads'])}, load {t['load']:.1f})", flush=True)
    ratios = [b["seconds"] / a["seconds"] for a, b in zip(times[1], times[2])]
    ratio = statistics.median(ratios)
    case = f"2x2 smoke grid ({RUNS} runs), mlp-3x256-tanh, synthetic 4k, {usable_cores()} cores"
    rows = []
    for parallel in settings:
        ts = times[parallel]
        threads = sorted(set().union(*(t["threads"] for t in ts)))
        rows.append({
            "benchmark": "sweep_parallel", "case": case, "rule": f"--parallel {parallel}", "batch": 32,
            "median_ms": 1000 * statistics.median(t["seconds"] for t in ts), "optimizer_step_ms": "",
            "ratio_to_bp": ratio if parallel == 2 else 1.0,
            "target": f"<= {TARGET} (vs --parallel 1)" if parallel == 2 else "",
            "meets_target": (ratio <= TARGET) if parallel == 2 else "",
            "threads_per_run": "/".join(map(str, threads)),
            "run_epoch_s_median": statistics.median(t["epoch_s"] for t in ts),
            "seconds_each_repeat": " ".join(f"{t['seconds']:.1f}" for t in ts),
            "ratio_each_repeat": " ".join(f"{r:.3f}" for r in ratios) if parallel == 2 else "",
            "loadavg_each_repeat": " ".join(f"{t['load']:.1f}" for t in ts),
            "repeats": repeats,
        })
    return rows
