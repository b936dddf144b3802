"""Backprop (bench/algorithms/backprop.py), the reference every other rule is measured against:
the alignment probe reads 0° and norm ratio 1 for it, and the divergence guard ends its runs
cleanly when the loss goes non-finite."""
from __future__ import annotations

import torch

from bench.algorithms.backprop import Backprop
from bench.algorithms.base import AlgorithmModule
from bench.results.io import read_json
from bench.run.train import train
from conftest import load_state, one_run_dir
from test_feedback_alignment import probe_rows


def test_probe_bp_update_and_signal_angles_are_zero(small_cfg, tmp_path):
    cfg = small_cfg("algorithm.name=bp", "probe.every=1", "trainer.max_steps=2")
    summary = train(cfg)
    assert summary["status"] == "finished"
    rows = probe_rows(one_run_dir(tmp_path / "runs"))
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        updates = {k: v for k, v in r.items() if k.startswith("align/update/")}
        ratios = {k: v for k, v in r.items() if k.startswith("align/ratio/")}
        signals = {k: v for k, v in r.items() if k.startswith("align/signal/")}
        assert sorted(updates) == ["align/update/net.1", "align/update/net.3", "align/update/net.5"]
        assert len(ratios) == 3 and sorted(signals) == ["align/signal/net.2", "align/signal/net.4"]
        assert all(v < 1e-3 for v in updates.values()), updates
        assert all(abs(v - 1) < 1e-4 for v in ratios.values()), ratios
        assert all(v < 1e-3 for v in signals.values()), signals
        assert not any(k.startswith("align/wb/") for k in r)


def test_divergence_guard_ends_run_cleanly(small_cfg, tmp_path, monkeypatch):
    calls = []

    def poisoned(self, x, y):
        surrogate, logits, loss = AlgorithmModule.objective(self, x, y)
        calls.append(self.global_step)
        if self.global_step >= 1:
            surrogate, loss = surrogate * float("nan"), loss * float("nan")
        return surrogate, logits, loss

    monkeypatch.setattr(Backprop, "objective", poisoned)
    cfg = small_cfg("algorithm.name=bp", "trainer.max_steps=6", "algorithm.optimizer=sgd", "algorithm.lr=0.1")
    summary = train(cfg)
    assert summary["status"] == "diverged"
    run = one_run_dir(tmp_path / "runs")
    assert read_json(run / "summary.json")["status"] == "diverged"
    assert calls == [0, 1]  # stopped at the first non-finite loss
    assert summary["final"] == {}  # no test on a diverged model
    state = load_state(run)
    assert all(torch.isfinite(v).all() for k, v in state.items() if k.startswith("model."))
    # a diverged run is final: train() skips it instead of rerunning
    assert train(cfg)["status"] == "diverged" and calls == [0, 1]


def test_divergence_guard_huge_learning_rate(small_cfg, tmp_path):
    cfg = small_cfg("algorithm.name=bp", "algorithm.optimizer=sgd", "algorithm.lr=1e30",
                    "model.activation=relu", "trainer.max_steps=8")
    summary = train(cfg)
    assert summary["status"] == "diverged"
    assert summary["last_epoch"]["step"] < 8
