"""Exact resume: a run killed with SIGKILL mid-epoch and started again with the same command ends
with the same weights, optimizer state, metrics.csv and probe.csv as a run never interrupted;
a kill corrupts nothing; a run folder or checkpoint of another config is refused with one line."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import cli
from bench.config import compose
from bench.results.io import read_csv
from bench.run.train import train
from conftest import REPO, cli_env, one_run_dir

EPOCHS = 4
# Everything whose state a resume must restore: dropout (torch RNG), FA feedback buffers, a
# step scheduler, Adam moments, the probe's records and the timer's history.
ARGS = [
    "data.name=synthetic", "data.shape=[12]", "data.num_classes=3", "data.n_train=3000", "data.n_test=48",
    "data.val_size=32", "data.batch_size=16", "data.eval_batch_size=64",
    "model.depth=2", "model.width=8", "model.dropout=0.3",
    "algorithm.name=fa", "algorithm.scheduler=step", "algorithm.step_size=1", "algorithm.gamma=0.5",
    f"trainer.epochs={EPOCHS}", "trainer.threads=1", "probe.every=7", "output.progress=none", "seed=3",
]
TIMING = ("time/", "mem/")  # wall-clock and memory differ between any two runs


def metric_rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith(TIMING)} for row in read_csv(run_dir / "metrics.csv")]


def checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)


def assert_same_run(a: Path, b: Path) -> None:
    ca, cb = checkpoint(a), checkpoint(b)
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    for key in ca["state_dict"]:
        torch.testing.assert_close(ca["state_dict"][key], cb["state_dict"][key], rtol=0, atol=1e-6, msg=key)
    for sa, sb in zip(ca["optimizer_states"][0]["state"].values(), cb["optimizer_states"][0]["state"].values()):
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], rtol=0, atol=1e-6)
    assert ca["lr_schedulers"] == cb["lr_schedulers"]
    assert (ca["epoch"], ca["global_step"]) == (cb["epoch"], cb["global_step"])
    rows_a, rows_b = metric_rows(a), metric_rows(b)
    assert [r["epoch"] for r in rows_a] == [str(e) for e in range(EPOCHS)]
    assert rows_a == rows_b
    assert read_csv(a / "probe.csv") == read_csv(b / "probe.csv")
    sa, sb = json.loads((a / "summary.json").read_text()), json.loads((b / "summary.json").read_text())
    assert sa["status"] == sb["status"] == "finished"
    assert sa["final"] == sb["final"] and sa["epochs_done"] == sb["epochs_done"] == EPOCHS
    assert len(sb["time"]["epoch_s"]) == EPOCHS  # the timer history survived the kill


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run, trained in this process."""
    root = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    try:
        summary = train(compose(overrides=[*ARGS, f"output.root={root}"]))
    finally:
        torch.set_num_threads(threads)  # trainer.threads=1 must not slow the rest of the suite
    assert summary["status"] == "finished"
    return one_run_dir(root)


def start_run(root: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench", "run", *ARGS, f"output.root={root}"], env=cli_env(),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_epoch_then_rerun_equals_uninterrupted_run(tmp_path, reference):
    root = tmp_path / "runs"
    proc = start_run(root)
    summary_path = None
    deadline = time.monotonic() + 120
    # Wait for the first epoch's checkpoint (its summary is written right after last.ckpt) ...
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(root.rglob("summary.json"))
        if found and json.loads(found[0].read_text()).get("epochs_done", 0) >= 1:
            summary_path = found[0]
            break
        time.sleep(0.05)
    assert summary_path is not None, f"no epoch finished before the deadline: {proc.communicate()}"
    # ... then kill it half an epoch later: inside epoch 2 (or later), never between epochs by design.
    first_epoch_s = json.loads(summary_path.read_text())["time"]["epoch_s"][0]
    time.sleep(0.5 * first_epoch_s)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    run_dir = summary_path.parent
    killed = json.loads(summary_path.read_text())
    assert killed["status"] == "running" and 1 <= killed["epochs_done"] < EPOCHS, "the kill came too late to test resume"
    # nothing half-written: every file parses, and the checkpoint is a whole epoch
    ckpt = checkpoint(run_dir)
    assert ckpt["epoch"] == killed["epochs_done"] - 1
    assert len(read_csv(run_dir / "metrics.csv")) >= killed["epochs_done"]

    rerun = subprocess.run([sys.executable, "-m", "bench", "run", *ARGS, f"output.root={root}"], env=cli_env(),
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert rerun.stdout.startswith("finished:")
    # It says it resumes, and from which epoch: one line ...
    done = killed["epochs_done"]
    resumed = [line for line in rerun.stderr.splitlines() if line.startswith("resuming ")]
    assert resumed == [f"resuming {run_dir}: {done} of {EPOCHS} epochs done (step {ckpt['global_step']}), training "
                       f"continues with epoch {done} (numbered from 0, as in metrics.csv)"], rerun.stderr[-2000:]
    # ... and it did resume rather than start over: the epochs before the kill keep their measured
    # times (restored from the checkpoint; a retrained epoch would have a new wall-clock time).
    assert json.loads(summary_path.read_text())["time"]["epoch_s"][:done] == killed["time"]["epoch_s"][:done]
    # One metrics.csv in the run folder, ours: Lightning's CSV logger (logs/metrics.csv) is not used.
    assert [p.relative_to(run_dir) for p in run_dir.rglob("metrics.csv")] == [Path("metrics.csv")]
    assert not list(run_dir.glob(".*.tmp"))
    assert_same_run(reference, run_dir)


def test_kill_after_training_before_the_final_summary(tmp_path, reference):
    """A kill during the final test pass: the rerun trains nothing and writes the same summary."""
    run_dir = tmp_path / "copy"
    shutil.copytree(reference, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.update(status="running", final={})
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "metrics.csv").write_text("")  # rewritten from the checkpoint's rows, or the test fails
    threads = torch.get_num_threads()
    try:
        train(compose(overrides=[*ARGS, f"output.root={tmp_path}"]), run_dir=run_dir)
    finally:
        torch.set_num_threads(threads)
    assert_same_run(reference, run_dir)


def run_cli_in_process(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", *args])
    return exit_info.value.code, capsys.readouterr().err


def test_run_folder_or_checkpoint_of_another_config_is_refused(tmp_path, reference, capsys):
    root = tmp_path / "runs"
    run_dir = root / reference.relative_to(reference.parents[2])  # adhoc/<name>/s<seed>
    shutil.copytree(reference, run_dir)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}

    # config.yaml says another width: the folder belongs to another config
    saved = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(saved.replace("width: 8", "width: 9"))
    code, err = run_cli_in_process(capsys, *ARGS, f"output.root={root}")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: run folder") and "different config" in err
    (run_dir / "config.yaml").write_text(saved)

    # last.ckpt copied in from a run of another config (same folder name would never hold one)
    other_root = tmp_path / "other"
    summary = train(compose(overrides=[*ARGS, "model.width=16", "trainer.epochs=1", "trainer.max_steps=3",
                                       f"output.root={other_root}"]))
    shutil.copy(one_run_dir(other_root) / "last.ckpt", run_dir / "last.ckpt")
    (run_dir / "summary.json").write_text(json.dumps({**summary, "status": "running"}))
    code, err = run_cli_in_process(capsys, *ARGS, f"output.root={root}")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: checkpoint") and "different config" in err

    # an unreadable checkpoint is named, not a traceback
    (run_dir / "last.ckpt").write_bytes(b"not a checkpoint")
    code, err = run_cli_in_process(capsys, *ARGS, f"output.root={root}")
    assert code == 2 and err.count("\n") == 1 and "cannot be read" in err

    # nothing else in the folder was touched by the refusals
    after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    assert {k: v for k, v in after.items() if k not in ("last.ckpt", "summary.json")} == \
        {k: v for k, v in before.items() if k not in ("last.ckpt", "summary.json")}


def test_sigterm_leaves_the_run_resumable_not_failed(tmp_path, monkeypatch, capsys):
    """SIGTERM (the sweep runner stopping its workers, a scheduler, `kill`) is an interruption:
    exit status 143 and one line, the summary stays "running", and the same command resumes."""
    from bench.callbacks.timing import EpochTimer

    args = [*ARGS, "data.n_train=288", "trainer.epochs=3", f"output.root={tmp_path}"]
    original = EpochTimer.on_train_epoch_end

    def sigterm_after_first_epoch(self, trainer, pl_module):
        original(self, trainer, pl_module)
        if trainer.current_epoch == 0:  # Lightning's handler notes it; the fit loop stops after this epoch
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(EpochTimer, "on_train_epoch_end", sigterm_after_first_epoch)
    threads = torch.get_num_threads()
    try:
        code, err = run_cli_in_process(capsys, *args)
        assert code == 143 and err.count("\n") == 1 and "stopped by SIGTERM" in err, err
        run_dir = one_run_dir(tmp_path)
        stopped = json.loads((run_dir / "summary.json").read_text())
        assert stopped["status"] == "running" and stopped["epochs_done"] == 1 and "error" not in stopped
        assert checkpoint(run_dir)["epoch"] == 0

        monkeypatch.setattr(EpochTimer, "on_train_epoch_end", original)
        cli.main(["run", *args])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    assert out.out.startswith("finished:")
    # it resumed from the checkpoint, not from scratch, and said so in one line
    assert out.err.splitlines() == [f"resuming {run_dir}: 1 of 3 epochs done (step {stopped['last_epoch']['step']}), "
                                    f"training continues with epoch 1 (numbered from 0, as in metrics.csv)"]
    done = json.loads((run_dir / "summary.json").read_text())
    assert done["status"] == "finished" and done["epochs_done"] == 3 and len(done["time"]["epoch_s"]) == 3
    assert done["time"]["epoch_s"][0] == stopped["time"]["epoch_s"][0]  # epoch 0 was not trained again
