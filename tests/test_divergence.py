"""Divergence that tells you what happened (issue 17 §3).

A run whose loss, a gradient or a weight becomes non-finite ends with status ``diverged``; its
``summary.json`` records the step, the epoch, the last finite loss and which quantity went
non-finite; ``bench run`` prints one line and exits 0 (a result, not a crash); a table reads
``diverged (step N)``; the local/W&B sweep runner counts the cell as a result.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from bench import cli
from bench.algorithms.backprop import Backprop
from bench.algorithms.base import AlgorithmModule
from bench.results.io import read_csv, read_json
from bench.run.train import train
from conftest import SMALL, load_state, one_run_dir

@pytest.fixture
def losses(monkeypatch):
    """Record (step, loss) for every objective call of a BP run."""
    seen: list[tuple[int, float]] = []

    def recording(self, x, y):
        surrogate, logits, loss = AlgorithmModule.objective(self, x, y)
        seen.append((int(self.global_step), float(loss.detach())))
        return surrogate, logits, loss

    monkeypatch.setattr(Backprop, "objective", recording)
    return seen


def cfg_for(small_cfg, steps: int = 6):
    return small_cfg("algorithm.name=bp", f"trainer.max_steps={steps}", "algorithm.optimizer=sgd", "algorithm.lr=0.1")


def test_nonfinite_loss_is_recorded(small_cfg, tmp_path, monkeypatch):
    seen = []

    def poisoned(self, x, y):
        surrogate, logits, loss = AlgorithmModule.objective(self, x, y)
        seen.append(float(loss.detach()))
        if self.global_step >= 3:
            surrogate, loss = surrogate * float("nan"), loss * float("nan")
        return surrogate, logits, loss

    monkeypatch.setattr(Backprop, "objective", poisoned)
    summary = train(cfg_for(small_cfg))
    assert summary["status"] == "diverged" and summary["final"] == {}
    d = summary["divergence"]
    assert d == {"step": 3, "epoch": 0, "quantity": "loss", "last_finite_loss": pytest.approx(seen[2], rel=1e-6),
                 "last_finite_loss_step": 2}
    assert len(seen) == 4  # stopped at the first non-finite loss
    run = one_run_dir(tmp_path / "runs")
    assert read_json(run / "summary.json")["divergence"] == d
    assert all(torch.isfinite(v).all() for k, v in load_state(run).items() if k.startswith("model."))


def test_nonfinite_gradient_is_named_and_never_applied(small_cfg, tmp_path, monkeypatch, losses):
    poisoned = []

    def inf_grad(self):
        if self.global_step == 2:
            name, p = next((n, p) for n, p in self.named_parameters() if n.endswith("weight"))
            p.grad[0, 0] = float("inf")
            poisoned.append(name)

    monkeypatch.setattr(Backprop, "after_backward", inf_grad)
    summary = train(cfg_for(small_cfg))
    d = summary["divergence"]
    assert summary["status"] == "diverged" and poisoned == ["model.net.1.weight"]
    assert (d["step"], d["epoch"], d["quantity"]) == (2, 0, "gradient of model.net.1.weight")
    # step 2's loss was finite (only its gradient was not): it is the last finite loss
    assert (d["last_finite_loss_step"], d["last_finite_loss"]) == (2, pytest.approx(losses[2][1], rel=1e-6))
    assert [s for s, _ in losses] == [0, 1, 2]
    state = load_state(one_run_dir(tmp_path / "runs"))
    assert torch.isfinite(state["model.net.1.weight"]).all()  # the update with the inf gradient was refused


def test_nonfinite_weight_is_named(small_cfg, tmp_path, monkeypatch, losses):
    """A weight made non-finite after a step (an overflowing update, a constraint): the next
    check names the weight and the step whose update produced it."""
    def break_weight(self):
        if self.global_step == 2:  # after the update of step 1 (global_step counts updates)
            next(p for n, p in self.named_parameters() if n.endswith("weight")).data[0, 0] = float("nan")

    monkeypatch.setattr(Backprop, "after_step", break_weight)
    summary = train(cfg_for(small_cfg))
    d = summary["divergence"]
    name = next(n for n in load_state(one_run_dir(tmp_path / "runs")) if n.endswith("weight"))
    assert (d["step"], d["quantity"]) == (1, f"weight {name}")
    assert d["last_finite_loss_step"] == 1 and d["last_finite_loss"] == pytest.approx(losses[1][1], rel=1e-6)


def test_weight_broken_by_the_last_update_is_caught_at_epoch_end(small_cfg, tmp_path, monkeypatch, losses):
    def break_weight(self):
        if self.global_step == 2:
            next(p for n, p in self.named_parameters() if n.endswith("weight")).data[0, 0] = float("inf")

    monkeypatch.setattr(Backprop, "after_step", break_weight)
    summary = train(cfg_for(small_cfg, steps=2))  # step 1 is the last: no later step would see it
    assert summary["status"] == "diverged"
    assert (summary["divergence"]["step"], summary["divergence"]["quantity"].split()[0]) == (1, "weight")
    assert summary["final"] == {}


def test_huge_learning_rate_diverges_with_a_record(small_cfg):
    summary = train(small_cfg("algorithm.name=bp", "algorithm.optimizer=sgd", "algorithm.lr=1e30",
                              "model.activation=relu", "trainer.max_steps=8"))
    d = summary["divergence"]
    assert summary["status"] == "diverged" and 0 <= d["step"] < 8
    assert d["quantity"] == "loss" or d["quantity"].startswith(("gradient of model.", "weight model."))
    assert d["last_finite_loss"] is None or math.isfinite(d["last_finite_loss"])


def test_bench_run_prints_one_line_and_exits_0(tmp_path, capsys):
    args = ["run", *SMALL, "algorithm.name=bp", "algorithm.optimizer=sgd", "algorithm.lr=1e30",
            "model.activation=relu", "trainer.max_steps=8", f"output.root={tmp_path}"]
    cli.main(args)  # no SystemExit: a diverged run is a result
    out = capsys.readouterr()
    d = json.loads((one_run_dir(tmp_path) / "summary.json").read_text())["divergence"]
    assert out.out.count("\n") == 1 and out.out.startswith("diverged: ")
    assert f"became non-finite at step {d['step']} (epoch 0)" in out.out and d["quantity"] in out.out
    cli.main(args)  # run again: skipped, the same line
    assert capsys.readouterr().out == out.out


def test_table_cell_reads_diverged_at_step(tmp_path):
    from omegaconf import OmegaConf

    from bench.results.table import aggregate, cell_text
    from bench.run.cells import Cell

    table = OmegaConf.create({"rows": {"A": {"paper": {"c": {"test": 1.0}}}}, "columns": {"c": {}},
                              "metric": {"fields": {"test": "test/err1"}}})
    cells = [Cell("A", "c", 0, status="diverged", summary={"divergence": {"step": 7}}),
             Cell("A", "c", 1, status="diverged", summary={"divergence": {"step": 3}})]
    (rec,) = aggregate(table, cells)
    assert rec["status"] == "diverged" and cell_text(rec) == "1.00 → *diverged (step 3, 7)*"


def test_sweep_runner_treats_a_diverged_cell_as_a_result(tmp_path, monkeypatch):
    """The local runner (and so a W&B agent's view) reads exit 0 + status diverged as a result:
    the cell is diverged, not failed, and its line says where."""
    from omegaconf import OmegaConf

    from bench.run import sweep
    from bench.run.cells import Cell
    from bench.run.plan import RunPlan

    cfg = OmegaConf.create({"output": {"root": str(tmp_path)}})
    run_dir = tmp_path / "run"
    cell = Cell("A", "c", 0, cfg=cfg, plan=RunPlan(cfg, "run", "0", run_dir))  # the cell's folder, whatever its config
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps({"status": "diverged", "final": {},
                                                      "divergence": {"step": 4, "quantity": "loss"}}))
    log = tmp_path / "log"
    log.write_text("diverged: ...\n")
    sweep.finish(sweep.Worker(cell=cell, proc=None, log=log, started=0.0), 0)
    assert (cell.status, cell.reason) == ("diverged", "")
    assert sweep.cell_line(cell) == "A / c / s0: diverged  (loss non-finite at step 4)"
