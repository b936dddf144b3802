"""The CI accuracy guard fails exactly when a rule drops more than its tolerance."""
import argparse
import json

import pytest

from bench.run import regress


@pytest.mark.parametrize("measured, expected", [(80.0, 0), (78.6, 0), (78.4, 1)])
def test_regress_flags_a_drop_beyond_tolerance(tmp_path, monkeypatch, capsys, measured, expected):
    baseline = tmp_path / "cpu.json"
    baseline.write_text(json.dumps({"config": ["seed=0"], "rules": {"bp": {"test_acc": 80.0, "tolerance": 1.5}}}))
    monkeypatch.setattr(regress, "measure", lambda config, rules: {"bp": measured})
    assert regress.main(argparse.Namespace(baseline=str(baseline), write=False)) == expected
    out = capsys.readouterr().out
    assert ("FAILED for bp" in out) == bool(expected)


def test_committed_baseline_covers_bp_fa_dfa():
    data = json.loads(open("results/baselines/cpu.json").read())
    assert set(data["rules"]) == {"bp", "fa", "dfa"}
    for ref in data["rules"].values():
        assert 60.0 < ref["test_acc"] < 100.0 and 0 < ref["tolerance"] <= 3.0
