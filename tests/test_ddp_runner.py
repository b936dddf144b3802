"""DDP under the runner (issue 6): a table row run with ``bench run … trainer.name=ddp_cpu`` (gloo,
``devices=2``, batch b per rank) ends with the same weights and the same per-epoch metrics as
the row run in one process at batch 2b, and its summary records one epoch time per epoch, the
maximum over ranks.

Both DDP ranks are spawned workers that set the environment a launcher (torchrun, SLURM) would
set and then call ``bench.cli.main(["run", …])``: the command line a user, the local sweep runner
or a SLURM task runs, parsed and composed from the table row, not a hand-built config.
tests/test_ddp.py checks every rule's update under DDP on a free-standing config; this file
checks the runner's path with a table row, its metrics files and its timing.
"""
from __future__ import annotations

import json
import math
import os
import socket

import torch
import torch.multiprocessing as mp

from bench import cli
from bench.results.io import read_csv
from conftest import load_state, one_run_dir
from test_sweep import TABLE_ID, sweep_configs  # noqa: F401 - the fixture: a 2×2 synthetic table

EPOCHS = 2
# The table row as the runner starts it (test-sweep's FA row: batch 16, SGD, 96 training samples,
# so 6 steps an epoch), with the probe on so the alignment columns are compared too.
ROW = [f"table={TABLE_ID}", "row=fa", "column=three", "budget=tiny", f"trainer.epochs={EPOCHS}",
       "probe.every=2", "output.progress=none", "output.wandb=disabled"]
BATCH = 16  # the row's batch size; each of the 2 ranks takes half of every global batch
SLOW_RANK_S = 0.75  # rank 1 stalls this long after its last batch of every epoch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                      LOCAL_RANK=str(rank), RANK=str(rank), CI="true", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    if rank == 1:
        # A slow rank, after its last batch: no gradient all-reduce follows inside the epoch, so
        # rank 0's own clock does not see the stall, and only the max over ranks records it.
        import time

        from bench.callbacks.timing import EpochTimer

        original = EpochTimer.on_train_batch_end

        def slow_last_batch(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.is_last_batch:
                time.sleep(SLOW_RANK_S)
            original(self, trainer, pl_module, outputs, batch, batch_idx)

        EpochTimer.on_train_batch_end = slow_last_batch
    cli.main(["run", *ROW, "trainer.name=ddp_cpu", f"data.batch_size={BATCH // 2}", f"output.root={root}"])


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "mem/"))} for r in rows]


def test_table_row_under_ddp_equals_one_process_at_double_batch(tmp_path, sweep_configs):  # noqa: F811
    ddp_root, single_root = tmp_path / "ddp", tmp_path / "single"
    mp.start_processes(_ddp_worker, args=(_free_port(), str(ddp_root)), nprocs=2, start_method="spawn", join=True)
    threads = torch.get_num_threads()
    try:
        cli.main(["run", *ROW, "trainer.threads=1", f"output.root={single_root}"])
    finally:
        torch.set_num_threads(threads)

    ddp_dir, single_dir = one_run_dir(ddp_root), one_run_dir(single_root)
    ddp, single = (json.loads((d / "summary.json").read_text()) for d in (ddp_dir, single_dir))
    assert ddp["status"] == single["status"] == "finished", ddp.get("error")
    assert (ddp["world_size"], single["world_size"]) == (2, 1)
    assert (ddp["table"], ddp["row"], ddp["column"], ddp["algorithm"]) == (TABLE_ID, "FA", "three", "fa")
    assert ddp["last_epoch"]["step"] == single["last_epoch"]["step"] == EPOCHS * 96 // BATCH

    # weights: the same to float round-off (two half-batch gradients averaged vs one full batch)
    wa, wb = load_state(ddp_dir), load_state(single_dir)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6, msg=key)

    # per-epoch metrics (train, validation, alignment) and the final test metrics
    rows_ddp, rows_single = read_csv(ddp_dir / "metrics.csv"), read_csv(single_dir / "metrics.csv")
    assert [r["epoch"] for r in rows_ddp] == [str(e) for e in range(EPOCHS)]
    a, b = comparable(rows_ddp), comparable(rows_single)
    assert [r.keys() for r in a] == [r.keys() for r in b]
    assert any(k.startswith("align/") for k in a[0]) and "val/err1" in a[0] and "train/err1" in a[0]
    for ra, rb in zip(a, b):
        for key in ra:
            if key.endswith(("err1", "err5", "epoch", "step")):  # counts: exactly equal
                assert ra[key] == rb[key], key
            else:
                assert math.isclose(float(ra[key]), float(rb[key]), rel_tol=1e-4, abs_tol=1e-4), \
                    f"{key}: {ra[key]} vs {rb[key]}"
    assert ddp["final"].keys() == single["final"].keys() and "test/err1" in ddp["final"]
    for key in ddp["final"]:
        assert math.isclose(ddp["final"][key], single["final"][key], rel_tol=1e-5, abs_tol=1e-5), key

    # one epoch time per epoch, in the summary and in metrics.csv; the slow rank is in every one
    epoch_s = ddp["time"]["epoch_s"]
    assert len(epoch_s) == EPOCHS and len(single["time"]["epoch_s"]) == EPOCHS
    assert [float(r["time/epoch_s"]) for r in rows_ddp] == epoch_s
    assert all(t >= SLOW_RANK_S for t in epoch_s), epoch_s
    assert ddp["time"]["epoch_s_mean"] == sum(epoch_s) / EPOCHS
