"""DDP equivalence on CPU (DESIGN.md): gloo with 2 processes at batch b must give the same weights
as one process at batch 2b, for every registered rule, after 3 steps.

All rules run in one pair of DDP worker processes: each worker sets the environment a launcher
(torchrun, SLURM) would set, so Lightning's DDP strategy joins it instead of relaunching, and then
trains every rule in turn through ``bench.train.train`` — the code path of ``python -m bench run``.
Paying the Lightning import once per worker instead of once per rule and rank keeps this test
affordable as the rule list grows. Adding a rule adds its row here automatically; a rule that
needs extra settings for this tiny problem lists them in ``RULE_OVERRIDES``.
"""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from bench.algorithms import RULES
from bench.config import compose
from conftest import load_state, run_dirs

COMMON = [
    "data.name=synthetic", "data.shape=[20]", "data.num_classes=4", "data.n_train=400", "data.n_test=40",
    "data.val_size=0", "data.eval_batch_size=40",
    "algorithm.optimizer=sgd", "algorithm.lr=0.1", "trainer.max_steps=3", "probe.every=0",
    "output.progress=none", "output.wandb=disabled",
]
RULE_OVERRIDES: dict[str, list[str]] = {  # rule → extra overrides it needs on this toy problem
    # Target rules: the first layer's error unit is β²-small at the default β and σ_E (its weights
    # would move < 1e-4 in 3 steps); a larger displacement makes the movement check meaningful.
    "rlra": ["algorithm.beta=1.0", "algorithm.error_sigma=0.3"],
    "lra_e": ["algorithm.beta=1.0", "algorithm.error_sigma=0.3"],
    # rule@variant: DFA with macro points, i.e. local BP inside each conv block (conv → tanh →
    # avg-pool) of a small CNN; the MLP's macro points are its micro points.
    "dfa@macro": ["algorithm.granularity=macro", "model.name=cnn", "data.shape=[1,6,6]", "model.channels=[3,4]",
                  "model.kernel=3", "model.pool=avg", "model.hidden=[8]"],
}
MLP = ["model.depth=2", "model.width=16"]  # the toy model, unless an entry names its own
RULES_UNDER_TEST = [*RULES.names(), *(r for r in RULE_OVERRIDES if "@" in r)]


def rule_config(rule: str, *extra: str):
    overrides = RULE_OVERRIDES.get(rule, [])
    model = [] if any(o.startswith("model.name=") for o in overrides) else MLP
    return compose(overrides=[*COMMON, *model, f"algorithm.name={rule.split('@')[0]}", *overrides, *extra])


def _ddp_worker(rank: int, port: int, root: str, rules: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                      LOCAL_RANK=str(rank), RANK=str(rank), CI="true", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from bench.train import train

    for rule in rules:
        train(rule_config(rule, "trainer.name=ddp_cpu", "data.batch_size=8", f"output.root={root}/{rule}"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_ddp_worker, args=(_free_port(), str(root), RULES_UNDER_TEST), nprocs=2,
                       start_method="spawn", join=True)
    return root


def initial_weights(rule: str, root) -> dict[str, torch.Tensor]:
    """The weights a rule's runs start from: its config with lr = 0 (same seed, same model)."""
    from bench.train import train

    train(rule_config(rule, "algorithm.lr=0.0", "trainer.max_steps=1", "data.batch_size=16", f"output.root={root}"))
    return model_tensors(load_state(run_dirs(root)[0]))


@pytest.fixture(scope="module")
def init_weights(tmp_path_factory):
    return initial_weights("bp", tmp_path_factory.mktemp("init"))


def model_tensors(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith("model.")}


@pytest.mark.parametrize("rule", RULES_UNDER_TEST)
def test_ddp_two_processes_equal_one_process_double_batch(rule, tmp_path, ddp_root, init_weights):
    from bench.train import train

    single = train(rule_config(rule, "trainer.name=cpu", "data.batch_size=16", f"output.root={tmp_path}"))
    (ddp_dir,) = run_dirs(ddp_root / rule)
    (single_dir,) = run_dirs(tmp_path)
    ddp_summary = json.loads((ddp_dir / "summary.json").read_text())
    assert ddp_summary["status"] == single["status"] == "finished", ddp_summary.get("error")
    assert (ddp_summary["world_size"], single["world_size"]) == (2, 1)
    assert ddp_summary["last_epoch"]["step"] == single["last_epoch"]["step"] == 3

    ddp, one = model_tensors(load_state(ddp_dir)), model_tensors(load_state(single_dir))
    assert ddp.keys() == one.keys()
    for key in ddp:
        diff = (ddp[key] - one[key]).abs().max().item()
        assert diff < 1e-6, f"{rule}: {key} differs by {diff:.3g}"
    # the comparison means something only if training moved every weight well beyond 1e-6
    init = init_weights if init_weights.keys() == one.keys() else initial_weights(rule, tmp_path / "init")
    for key, w0 in init.items():
        if key.endswith("weight"):
            moved = (one[key] - w0).abs().max().item()
            assert moved > 1e-4, f"{rule}: {key} moved only {moved:.3g}"
