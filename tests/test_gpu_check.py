"""`make gpu-check` (bench/run/gpu_check.py) runs here at toy sizes on the CPU, so the script the
GPU session will run in one call cannot rot while no GPU is lent."""
from __future__ import annotations

import csv

import pytest

from bench.run import gpu_check


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_toy_run_of_the_trainer_ratio_and_memory_checks(tmp_path):
    out = tmp_path / "gpu.csv"
    assert gpu_check.main(["--toy", "--only", "trainer", "ratios", "memory", "--out", str(out)]) == 0
    rows = _rows(out)
    trainer = [r for r in rows if r["check"] == "trainer"]
    assert {r["rule"] for r in trainer} == set(gpu_check.TRAINER_RULES)
    assert {r["precision"] for r in trainer} == {"32-true", "bf16-mixed"}
    assert all(r["status"] == "ok" for r in trainer), [r for r in trainer if r["status"] != "ok"]
    ratios = [r for r in rows if r["check"] == "ratio"]
    expected = {(c, rule) for c, _, _, rules, _ in gpu_check.RATIO_CASES for rule in rules}
    expected |= {(c, f"{r} / {base}") for c, _, _, rules, _ in gpu_check.RATIO_CASES
                 for r, base in gpu_check.RATIO_PAIRS if {r, base} <= set(rules)}
    assert ("grape-1 mlp 2x1024", "grape / dfa") in expected
    assert {(r["model"], r["rule"]) for r in ratios} == expected
    assert all(0.0 < float(r["value"]) < 100.0 for r in ratios)
    (memory,) = [r for r in rows if r["check"] == "memory"]
    assert memory["status"] == "ok", memory["detail"]  # measured bytes = l_max·e exactly


def test_without_cuda_the_full_run_refuses_in_one_line(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the full run would start")
    assert gpu_check.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "gpu-check needs CUDA" in err


@pytest.mark.slow
def test_toy_run_of_every_rule_on_every_model_kind(tmp_path):
    out = tmp_path / "gpu.csv"
    status = gpu_check.main(["--toy", "--only", "steps", "--out", str(out)])
    rows = _rows(out)
    assert rows and status == 0
    failed = [r for r in rows if r["status"] == "FAILED"]
    assert not failed, failed[:5]
    assert {r["status"] for r in rows} <= {"ok", "refused"}
