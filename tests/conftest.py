"""Shared fixtures: one shrunken config for every test that trains, and helpers to run the CLI.

``small_cfg(*overrides)`` composes a real run config (base + group files + overrides, validated)
for the synthetic dataset, a 2×8 MLP, two optimizer steps, no probe, no progress bar, with run
folders under the test's ``tmp_path``. Tests pass only the overrides that matter to them.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.config import compose

REPO = Path(__file__).resolve().parent.parent

SMALL = [
    "data.name=synthetic",
    "data.shape=[12]",
    "data.num_classes=3",
    "data.n_train=160",
    "data.n_test=48",
    "data.val_size=32",
    "data.batch_size=16",
    "data.eval_batch_size=64",
    "model.depth=2",
    "model.width=8",
    "trainer.max_steps=2",
    "probe.every=0",
    "output.progress=none",
]


@pytest.fixture
def small_cfg(tmp_path):
    """Factory: ``small_cfg("algorithm.name=fa", ..., table=None, row=None, column=None, budget=None)``."""

    def make(*overrides: str, table=None, row=None, column=None, budget=None):
        return compose(table, row, column, budget,
                       [*SMALL, f"output.root={tmp_path / 'runs'}", *overrides])

    return make


def run_dirs(root: Path) -> list[Path]:
    """Every run folder (one holding config.yaml) under ``root``."""
    return sorted(p.parent for p in Path(root).rglob("config.yaml"))


def one_run_dir(root: Path) -> Path:
    dirs = run_dirs(root)
    assert len(dirs) == 1, f"expected one run folder under {root}, found {dirs}"
    return dirs[0]


def load_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(run_dir) / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def cli_env() -> dict[str, str]:
    env = dict(os.environ, CI="true", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("LOCAL_RANK", None)
    return env


def run_cli(*args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m bench <args>`` in a fresh process (what a user types)."""
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True,
                          timeout=timeout, env=cli_env(), cwd=cwd or REPO)


@pytest.fixture(autouse=True)
def _quiet_ci(monkeypatch):
    # In-process runs: no progress bar, no W&B, whatever the developer's shell says.
    monkeypatch.setenv("CI", "true")


def fixed(*shape, scale=0.3, offset=0.0) -> torch.Tensor:
    """A deterministic, non-symmetric tensor (no RNG involved): hand-computed tests use it."""
    n = math.prod(shape)
    return (torch.sin(torch.arange(n, dtype=torch.float32) * 1.7 + offset) * scale).reshape(shape)


def angle(a, b) -> float:
    """Independent angle in degrees (atan2 form, accurate near 0), to check the probe against."""
    a, b = a.detach().reshape(-1).double(), b.detach().reshape(-1).double()
    cross = torch.sqrt(torch.clamp(a.dot(a) * b.dot(b) - a.dot(b) ** 2, min=0.0))
    return math.degrees(math.atan2(float(cross), float(a.dot(b))))


def synth(num_classes: int) -> dict:
    """A table column on a tiny synthetic dataset (sweep, report and table tests share it)."""
    return {"data": {"name": "synthetic", "shape": [10], "num_classes": num_classes, "n_train": 160,
                     "n_test": 40, "val_size": 32, "eval_batch_size": 64}}


def tanh_mlp_backprop(z: list, weights: list, out_grad):
    """Backprop by hand through a 3-layer tanh MLP (z_0 input, z_1, z_2 tanh, z_3 output) from
    ∂L/∂h_3 = ``out_grad``: δ_ℓ = (δ_{ℓ+1} W_{ℓ+1}) ⊙ (1 − z_ℓ²). Returns ({ℓ: ∂L/∂W_ℓ},
    {ℓ: ∂L/∂z_ℓ} for the hidden layers)."""
    gz2 = out_grad @ weights[2]
    g2 = gz2 * (1 - z[2] ** 2)
    gz1 = g2 @ weights[1]
    g1 = gz1 * (1 - z[1] ** 2)
    return {1: g1.T @ z[0], 2: g2.T @ z[1], 3: out_grad.T @ z[2]}, {1: gz1, 2: gz2}


def pytest_terminal_summary(terminalreporter):
    """The rule × model support matrix that tests/test_all_rules.py discovered, when it ran."""
    generated = sys.modules.get("test_all_rules")
    found = getattr(generated, "DISCOVERED", None)
    if not found:
        return
    terminalreporter.section("rule × model support (discovered)")
    models = sorted({m for _, m in found})
    terminalreporter.write_line("rule       " + " ".join(f"{m[:13]:>13}" for m in models))
    for rule in sorted({r for r, _ in found}):
        cells = [found.get((rule, m), "—") for m in models]
        terminalreporter.write_line(f"{rule:10} " + " ".join(f"{c.split(':')[0]:>13}" for c in cells))
    for (rule, model), verdict in sorted(found.items()):
        if verdict.startswith("refuses"):
            terminalreporter.write_line(f"{rule} on {model}: {verdict}")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module of tiny nets: on a shared 2-core machine two intra-op
    threads made a ResNet-18 step at batch 2 ~10x slower (6 s vs 0.6 s) than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
