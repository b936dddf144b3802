"""The CI accuracy guard fails exactly when a rule drops more than its tolerance."""
import argparse
import json

import pytest

from bench.run import regress


@pytest.mark.parametrize("measured, expected", [(80.0, 0), (78.6, 0), (78.4, 1), (81.4, 0), (81.6, 1)])
def test_regress_flags_a_move_beyond_tolerance_either_way(tmp_path, monkeypatch, capsys, measured, expected):
    """A drop is a regression; a jump means the rule changed: both beyond ±1.5 fail."""
    baseline = tmp_path / "cpu.json"
    baseline.write_text(json.dumps({"config": ["seed=0"], "rules": {"bp": {"test_acc": 80.0, "tolerance": 1.5}}}))
    monkeypatch.setattr(regress, "registered_rules", lambda: ["bp"])
    monkeypatch.setattr(regress, "measure", lambda config, rules: {"bp": measured})
    assert regress.main(argparse.Namespace(baseline=str(baseline), write=False)) == expected
    out = capsys.readouterr().out
    assert ("FAILED for bp" in out) == bool(expected)


def test_every_registered_rule_has_a_baseline_with_its_provenance():
    """A new rule cannot skip the guard: its baseline must be measured (`make baseline`)."""
    data = json.loads(open("results/baselines/cpu.json").read())
    assert set(regress.registered_rules()) <= set(data["rules"]), \
        sorted(set(regress.registered_rules()) - set(data["rules"]))
    for rule, ref in data["rules"].items():
        assert 0.0 <= ref["test_acc"] <= 100.0 and 0 < ref["tolerance"] <= 3.0, rule
        assert ref["command"].startswith("python -m bench run") and f"algorithm.name={rule}" in ref["command"]
        assert len(ref["git_commit"]) >= 7 and ref["machine"], rule


def test_missing_baseline_is_refused(tmp_path, monkeypatch, capsys):
    baseline = tmp_path / "cpu.json"
    baseline.write_text(json.dumps({"config": ["seed=0"], "rules": {"bp": {"test_acc": 80.0, "tolerance": 1.5}}}))
    monkeypatch.setattr(regress, "registered_rules", lambda: ["bp", "newrule"])
    monkeypatch.setattr(regress, "measure", lambda config, rules: pytest.fail("must not train"))
    assert regress.main(argparse.Namespace(baseline=str(baseline), write=False)) == 2
    assert "no baseline for newrule" in capsys.readouterr().err


def test_every_rule_composes_on_the_regress_config():
    for rule in regress.registered_rules():
        cfg = regress.rule_config(regress.DEFAULT_CONFIG, rule, regress.RULE_OVERRIDES.get(rule, []), "runs")
        assert cfg.algorithm.name == rule
