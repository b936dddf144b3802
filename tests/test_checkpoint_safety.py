"""Loading a checkpoint never runs code (issue 17 §1).

A ``last.ckpt`` replaced by a crafted pickle whose ``__reduce__`` runs a shell command must be
refused with one line naming the file, on every path that reads it: the config check before a
resume, ``bench run`` (exit status 2), Lightning's own ``fit(ckpt_path=...)`` and the t-SNE
loader; and a finished run is skipped without its checkpoint being opened at all.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from bench import cli
from bench.checkpoint import SafeCheckpointIO, UnsafeCheckpoint, load_checkpoint
from bench.config import ConfigError
from conftest import one_run_dir


class Payload:
    """Unpickling this runs ``touch <marker>``: the attack of issue 17 §1."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def poison(path: Path, marker: Path, zipfile: bool = True) -> None:
    """Replace ``path`` by a checkpoint-shaped pickle carrying the payload (torch.save's zip format,
    which a memory-mapped load accepts, or a bare pickle)."""
    data = {"epoch": 0, "global_step": 2, "state_dict": {}, "bench": {"config_hash": "x"}, "x": Payload(marker)}
    if zipfile:
        torch.save(data, path)
    else:
        path.write_bytes(pickle.dumps(data))


def test_the_payload_really_runs_when_loaded_unsafely(tmp_path):
    """The poisoned file is a real attack: a weights_only=False load runs it (so the tests below
    would fail if any path still loaded that way)."""
    marker = tmp_path / "pwned"
    poison(tmp_path / "evil.ckpt", marker)
    torch.load(tmp_path / "evil.ckpt", weights_only=False)
    assert marker.exists()


@pytest.fixture
def trained(small_cfg, tmp_path):
    """A real run folder (2 steps), made to look interrupted: summary 'running', last.ckpt present."""
    from bench.run.train import train

    cfg = small_cfg("algorithm.name=fa")
    assert train(cfg)["status"] == "finished"
    run_dir = one_run_dir(tmp_path / "runs")
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({**summary, "status": "running", "final": {}}))
    return cfg, run_dir


def test_every_checkpoint_the_suite_writes_loads_weights_only(trained):
    _, run_dir = trained
    saved = load_checkpoint(run_dir / "last.ckpt")
    assert saved["global_step"] == 2 and saved["state_dict"]
    assert {"bench", "callbacks", "optimizer_states", "rng"} <= saved.keys()


@pytest.mark.parametrize("zipfile", [True, False], ids=["torch.save", "bare-pickle"])
def test_check_same_config_refuses_a_poisoned_checkpoint(trained, tmp_path, zipfile):
    from bench.run.plan import RunPlan
    from bench.run.train import check_same_config

    cfg, run_dir = trained
    marker = tmp_path / "pwned"
    poison(run_dir / "last.ckpt", marker, zipfile)
    with pytest.raises(ConfigError) as info:
        check_same_config(RunPlan.of(cfg, run_dir))
    message = str(info.value)
    assert "\n" not in message and str(run_dir / "last.ckpt") in message
    if zipfile:  # the weights-only unpickler met the callable: named in the line
        assert isinstance(info.value, UnsafeCheckpoint) and "posix.system" in message
    assert not marker.exists()


def test_bench_run_refuses_a_poisoned_checkpoint_with_one_line(trained, tmp_path, capsys, monkeypatch):
    """The resume attempt through the CLI: exit 2, one line naming the file, no payload."""
    cfg, run_dir = trained
    marker = tmp_path / "pwned"
    poison(run_dir / "last.ckpt", marker)
    # even with torch told to default to unsafe loads: the suite passes weights_only=True explicitly
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    from conftest import SMALL

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", *SMALL, "algorithm.name=fa", f"output.root={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and err.startswith("error: checkpoint ") and str(run_dir / "last.ckpt") in err
    assert "refused" in err and not marker.exists()
    # the refusal wrote nothing: the run is still resumable once the file is replaced
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "running"


def test_lightning_resume_path_loads_weights_only(trained, tmp_path, monkeypatch):
    """Lightning's own load (fit(ckpt_path=...) → strategy.checkpoint_io) refuses the payload too,
    even if the suite's header check were skipped and torch were told to load unsafely."""
    import bench.run.train

    cfg, run_dir = trained
    marker = tmp_path / "pwned"
    poison(run_dir / "last.ckpt", marker)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.setattr(bench.run.train, "checkpoint_header", lambda plan: {"epoch": 0, "global_step": 2})
    trainers = []
    build = bench.run.train.build_trainer
    monkeypatch.setattr(bench.run.train, "build_trainer", lambda *a, **k: trainers.append(build(*a, **k)) or trainers[-1])
    with pytest.raises(UnsafeCheckpoint) as info:
        bench.run.train.train(cfg)
    assert isinstance(trainers[0].strategy.checkpoint_io, SafeCheckpointIO)
    assert str(run_dir / "last.ckpt") in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


def test_a_finished_run_is_skipped_without_opening_its_checkpoint(trained, tmp_path, monkeypatch):
    from bench.run.train import train

    cfg, run_dir = trained
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({**summary, "status": "finished"}))
    marker = tmp_path / "pwned"
    poison(run_dir / "last.ckpt", marker)
    opened = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: opened.append(a) or real_load(*a, **k))
    assert train(cfg)["status"] == "finished"
    assert opened == [] and not marker.exists()


def test_latents_loader_refuses_a_poisoned_checkpoint(trained, tmp_path):
    from bench.results.latents import load_trained

    _, run_dir = trained
    marker = tmp_path / "pwned"
    poison(run_dir / "last.ckpt", marker)
    with pytest.raises(UnsafeCheckpoint, match="last.ckpt"):
        load_trained(run_dir)
    assert not marker.exists()


def test_no_unsafe_torch_load_left_in_the_repo():
    """Every torch.load in the package and the tests passes weights_only=True."""
    repo = Path(__file__).resolve().parent.parent
    offenders = []
    for path in [*repo.glob("bench/**/*.py"), *repo.glob("tests/*.py")]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line and path.name != Path(__file__).name:
                offenders.append(f"{path.relative_to(repo)}:{n}")
    assert offenders == []
