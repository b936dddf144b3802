"""DDP equivalence on CPU (DESIGN.md): gloo with 2 processes at batch b must give the same weights
as one process at batch 2b, for every rule, after a few steps.

The DDP run is a real ``python -m bench run ... trainer.name=ddp_cpu`` subprocess (Lightning
relaunches it for rank 1); the single-process run goes through the same CLI entry point
in-process, which saves a second Lightning import per rule on 2 cores.
"""
from __future__ import annotations

import json

import pytest
import torch

from bench.cli import main as cli_main
from conftest import load_state, one_run_dir, run_cli

COMMON = [
    "data.name=synthetic", "data.shape=[20]", "data.num_classes=4", "data.n_train=400", "data.n_test=40",
    "data.val_size=0", "data.eval_batch_size=40", "model.depth=2", "model.width=16",
    "algorithm.optimizer=sgd", "algorithm.lr=0.1", "trainer.max_steps=3", "probe.every=0",
    "output.progress=none",
]
RULES_UNDER_TEST = ["bp", "fa", "dfa"]


def model_tensors(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith("model.")}


@pytest.fixture(scope="module")
def init_weights(tmp_path_factory):
    """The weights every run starts from: a bp run with lr = 0 (same seed, same model)."""
    root = tmp_path_factory.mktemp("init")
    cli_main(["run", *COMMON, "algorithm.name=bp", "algorithm.lr=0.0", "trainer.max_steps=1",
              "trainer.name=cpu", "data.batch_size=16", f"output.root={root}"])
    return model_tensors(load_state(one_run_dir(root)))


@pytest.mark.parametrize("rule", RULES_UNDER_TEST)
def test_ddp_two_processes_equal_one_process_double_batch(rule, tmp_path, init_weights):
    ddp_root, single_root = tmp_path / "ddp", tmp_path / "single"
    proc = run_cli("run", *COMMON, f"algorithm.name={rule}", "trainer.name=ddp_cpu", "data.batch_size=8",
                   f"output.root={ddp_root}", timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli_main(["run", *COMMON, f"algorithm.name={rule}", "trainer.name=cpu", "data.batch_size=16",
              f"output.root={single_root}"])

    ddp_dir, single_dir = one_run_dir(ddp_root), one_run_dir(single_root)
    ddp_summary = json.loads((ddp_dir / "summary.json").read_text())
    single_summary = json.loads((single_dir / "summary.json").read_text())
    assert ddp_summary["status"] == single_summary["status"] == "finished"
    assert (ddp_summary["world_size"], single_summary["world_size"]) == (2, 1)
    assert ddp_summary["last_epoch"]["step"] == single_summary["last_epoch"]["step"] == 3

    ddp, single = model_tensors(load_state(ddp_dir)), model_tensors(load_state(single_dir))
    assert ddp.keys() == single.keys()
    if rule == "fa":
        assert sum(k.endswith(".feedback") for k in ddp) == 3
    for key in ddp:
        diff = (ddp[key] - single[key]).abs().max().item()
        assert diff < 1e-6, f"{rule}: {key} differs by {diff:.3g}"
    # the comparison means something only if training moved every weight well beyond 1e-6
    for key, w0 in init_weights.items():
        moved = (single[key] - w0).abs().max().item()
        assert moved > 1e-4, f"{rule}: {key} moved only {moved:.3g}"
