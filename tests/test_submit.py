"""SLURM route: malformed --slurm parameters fail with one line; the submitit path runs one cell
with submitit's LocalExecutor and finishes it; the sbatch template parses and has the srun/ntasks
lines Lightning's SLURM environment needs."""
from __future__ import annotations

import re
import subprocess

import pytest

import bench.config as config
from bench import cli
from bench.run import submit as sb
from bench.run.cells import expand
from bench.run.sweep import SWEEPS_DIR
from test_sweep import TABLE_ID, sweep_configs  # noqa: F401 - the fixture

TEMPLATE = SWEEPS_DIR / "slurm" / "template.sbatch"


@pytest.mark.parametrize("items, message", [
    (["partition=gpu", "nodes=two", "gpus_per_node=8"], "nodes: expected a positive integer, got 'two'"),
    (["partition=gpu", "nodes=1", "gpus_per_node=0"], "gpus_per_node: expected a positive integer, got '0'"),
    (["partition=gpu", "nodes=1"], "missing gpus_per_node"),
    (["partition=gpu", "nodes=1", "gpus_per_node=8", "gpus=8"], "unknown key 'gpus'"),
    (["partition", "nodes=1", "gpus_per_node=8"], "expected key=value, got 'partition'"),
])
def test_malformed_slurm_parameters_fail_with_one_line(items, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["submit", "rlra-1", "--slurm", *items])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err


def test_slurm_parameters_map_to_one_task_per_gpu():
    params = sb.executor_parameters(sb.parse_slurm(["partition=gpu", "nodes=2", "gpus_per_node=4", "time_min=90"]))
    assert params == {"slurm_partition": "gpu", "nodes": 2, "gpus_per_node": 4, "tasks_per_node": 4, "timeout_min": 90}


def test_submitit_local_executor_runs_one_cell(tmp_path, sweep_configs):  # noqa: F811
    runs = tmp_path / "runs"
    _, cells = expand(TABLE_ID, "tiny", output_root=str(runs), rows=["BP"])
    cells = [c for c in cells if c.column == "three"]
    executor = sb.make_executor(tmp_path / "submitit", None, "test")
    (job,) = sb.submit(cells, executor)
    summary = job.result()
    assert summary["status"] == "finished" and summary["row"] == "BP" and summary["column"] == "three"
    assert 0.0 <= summary["final"]["test/err1"] <= 100.0
    # the job ran the local runner's command for that cell
    assert sb.cell_args(cells[0], None, [])[:5] == ["table=test-sweep", "row=bp", "column=three", "budget=tiny", "seed=0"]
    # resubmitting finds the cell finished
    _, again = expand(TABLE_ID, "tiny", output_root=str(runs), rows=["BP"])
    assert sb.submit([c for c in again if c.column == "three"], executor) == []


def test_sbatch_template_parses_and_runs_one_task_per_gpu():
    subprocess.run(["bash", "-n", str(TEMPLATE)], check=True)
    text = TEMPLATE.read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, flags=re.M))
    assert directives["ntasks-per-node"] == directives["gpus-per-node"]
    assert directives["signal"] == "SIGUSR1@90" and "requeue" in directives
    assert re.search(r"^srun .*-m bench run", text, flags=re.M)
    assert 'trainer.devices="$SLURM_NTASKS_PER_NODE"' in text and 'trainer.num_nodes="$SLURM_NNODES"' in text


def test_v100x8_preset_is_a_valid_trainer():
    cfg = config.compose(overrides=["trainer.name=v100x8"])
    assert (cfg.trainer.devices, cfg.trainer.strategy, cfg.trainer.accelerator) == (8, "ddp", "gpu")
