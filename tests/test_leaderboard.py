"""Time-to-target leaderboard (bench/run/leaderboard.py): the first evaluation at the target counts,
on a train-only clock; finished run folders of the same computation are reused."""
from __future__ import annotations

from pathlib import Path

import pytest

from bench.config import ConfigError
from bench.run import leaderboard as lb


def test_time_to_target_counts_the_first_evaluation_on_the_train_only_clock():
    rows = [{"epoch": "0", "time/epoch_s": "2.0", "val/err1": "20.0"},
            {"epoch": "1", "time/epoch_s": "3.0", "val/err1": "12.5"},   # first at ≤ 13: 5 s, 2 epochs
            {"epoch": "2", "time/epoch_s": "4.0", "val/err1": "11.0"}]
    out = lb.time_to_target(rows, "val/err1", 13.0)
    assert out["hit"] == {"seconds": 5.0, "epochs": 2}
    assert out["curve"] == [(2.0, 20.0), (5.0, 12.5), (9.0, 11.0)]
    assert lb.time_to_target(rows, "val/err1", 10.0)["hit"] is None


def test_unknown_workload_is_one_line():
    with pytest.raises(ConfigError, match=r"unknown leaderboard workload 'nope'; valid choices: .*rlra1-fmnist"):
        lb.load_workload("nope")


def test_shipped_workload_composes_for_bp():
    spec = lb.load_workload("rlra1-fmnist")
    cfg = lb.rule_config(spec, "bp")
    assert (cfg.model.depth, cfg.model.width, cfg.algorithm.lr, cfg.data.batch_size) == (5, 256, 2e-4, 32)
    assert cfg.trainer.epochs == int(spec.epochs)


def test_leaderboard_end_to_end_reuses_finished_runs(tmp_path, monkeypatch):
    configs = tmp_path / "configs"
    import shutil

    import bench.config as config
    shutil.copytree(config.CONFIG_DIR, configs)
    (configs / "leaderboards" / "toy.yaml").write_text(
        "id: toy\ntitle: toy\nconfig: [data.name=synthetic, 'data.shape=[1,4,4]', data.n_train=256, data.n_test=64, "
        "data.val_size=64, data.batch_size=32, model.name=mlp, model.depth=1, model.width=8, probe.every=0, "
        "output.progress=none, output.checkpoint=false]\n"
        "target: {metric: val/err1, at_most: 101.0}\nepochs: 2\nrules: [bp, fa]\n")
    monkeypatch.setattr(config, "CONFIG_DIR", configs)
    monkeypatch.setattr(lb, "CONFIG_DIR", configs)
    runs, results = tmp_path / "runs", tmp_path / "results"
    md = lb.run("toy", output_root=str(runs), results=str(results), progress=lambda *_: None)
    text = md.read_text()
    assert "| 1 |" in text and "| 2 |" in text and "`bp`" in text and "`fa`" in text
    assert (results / "plots" / "leaderboard-toy.png").stat().st_size > 0
    rows = (results / "leaderboard-toy.csv").read_text().splitlines()
    assert rows[0].startswith("rule,status,run,seconds_to_target,epochs_to_target")
    assert all(",finished," in r and ",1," in r for r in rows[1:])  # the target (≤ 101 %) is met at epoch 1

    calls = []
    lb.run("toy", output_root=str(runs), results=str(results), train=lambda cfg: calls.append(cfg),
           progress=lambda *_: None)
    assert calls == []  # both finished runs were reused, nothing retrained
