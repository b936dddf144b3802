"""The typed-options contract (bench/options.py): every declared key refuses a bad value with one
line and exit status 2, before torch is imported; rules read typed fields; the scanned declarations
equal the imported ones; the README's rule-options table is generated from them."""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import textwrap
import time
import typing
from pathlib import Path

import pytest

from bench import options
from bench.config import compose, group_choices
from bench.options import ConfigError, Literal

ROOT = Path(__file__).resolve().parent.parent


def bad_value(spec: options.Spec) -> str:
    """A command-line value the key must refuse: outside its choices, its range or its type."""
    base = options._strip_optional(spec.type)
    if typing.get_origin(base) is Literal:
        return "not_a_choice"
    if base is bool:
        return "maybe"
    if base in (int, float):
        for key, delta in (("ge", -1), ("gt", 0), ("le", 1), ("lt", 0)):
            bound = spec.bounds.get(key)
            if bound is not None:
                value = bound + delta
                return str(int(value)) if base is int else repr(float(value))
        return "abc"
    if base is str:
        return "[1,2]"  # a list where a string belongs
    return "abc"  # lists (and int | list[int]): a bare word is neither


def cases() -> list[tuple[list[str], str]]:
    """(overrides, key) for every declared key: the shared sections once, every rule's and every
    model's own keys under that rule or model."""
    out = []
    shared = {**{k: s for k, s in options.RunOptions.specs().items() if k in ("seed",)}}
    for section, cls in options.SECTIONS.items():
        shared.update({f"{section}.{k}": s for k, s in cls.specs().items() if k != "name"})
    shared.update({f"algorithm.{k}": s for k, s in options.AlgorithmOptions.specs().items() if k != "name"})
    for key, spec in shared.items():
        out.append(([f"{key}={bad_value(spec)}"], key))
    base_algo = set(options.AlgorithmOptions.specs())
    for rule in group_choices("algorithm"):
        for key, spec in options.declared("algorithm", rule).specs().items():
            if key not in base_algo:
                out.append(([f"algorithm.name={rule}", f"algorithm.{key}={bad_value(spec)}"], f"algorithm.{key}"))
    for model in group_choices("model"):
        for key, spec in options.declared("model", model).specs().items():
            if key != "name":
                out.append(([f"model.name={model}", f"model.{key}={bad_value(spec)}"], f"model.{key}"))
    return out


def test_every_declared_key_refuses_a_bad_value_in_one_line_before_torch(tmp_path):
    """Each case goes through the CLI's `run` in one process that must never import torch."""
    script = textwrap.dedent(f"""
        import contextlib, io, json, sys
        from bench.cli import main
        results = []
        for overrides, key in json.loads(sys.stdin.read()):
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                try:
                    main(["run", "output.root={tmp_path}", *overrides])  # the case's own value wins
                    code = 0
                except SystemExit as exc:
                    code = exc.code
            results.append([overrides, key, code, err.getvalue()])
        print(json.dumps({{"results": results, "torch": "torch" in sys.modules}}))
    """)
    todo = cases()
    assert len(todo) > 150  # every section, every rule and every model contributes
    proc = subprocess.run([sys.executable, "-c", script], input=json.dumps(todo), capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["torch"] is False, "a config error imported torch"
    wrong = []
    for overrides, key, code, err in out["results"]:
        lines = err.strip().splitlines()
        if code != 2 or len(lines) != 1 or f"{key}=" not in lines[0] or "is not valid" not in lines[0]:
            wrong.append((overrides, code, err))
    assert not wrong, wrong[:5]
    assert not list(tmp_path.iterdir())  # nothing was built


@pytest.mark.parametrize("override, expected", [
    ("data.batch_size=0", "data.batch_size=0 is not valid; expected int ≥ 1"),
    ("data.batch_size=-3", "data.batch_size=-3 is not valid; expected int ≥ 1"),
    ("data.train_subset=-5", "data.train_subset=-5 is not valid; expected int ≥ 1 or null"),
    ("algorithm.lr=-1", "algorithm.lr=-1 is not valid; expected float ≥ 0"),
    ("algorithm.lr=nan", "algorithm.lr='nan' is not valid; expected float ≥ 0"),
    ("algorithm.optimizer=bogus", "algorithm.optimizer='bogus' is not valid; valid choices: adam, adamw, sgd"),
    ("trainer.devices=0", "trainer.devices=0 is not valid; expected a positive count or -1 (all)"),
    ("a..b=1", "bad key 'a..b' in 'a..b=1'; expected dotted names such as algorithm.lr=1e-4"),
])
def test_the_issue_cases_are_one_line(override, expected):
    with pytest.raises(ConfigError) as err:
        compose(overrides=[override])
    assert str(err.value).startswith(expected), str(err.value)
    assert "\n" not in str(err.value)


def test_rule_option_choices_and_constraints_fail_at_compose():
    with pytest.raises(ConfigError, match=r"^algorithm\.map_synapse='bogus' is not valid; valid choices: conv, lowrank, dense"):
        compose(overrides=["algorithm.name=rlra", "algorithm.map_synapse=bogus"])
    with pytest.raises(ConfigError, match=r"^algorithm\.skip_gap=4 is not valid; the mlp has 3 hidden layers"):
        compose(overrides=["algorithm.name=rlra", "model.depth=3", "algorithm.skip_gap=4"])
    assert compose(overrides=["algorithm.name=rlra", "model.depth=3", "algorithm.skip_gap=3"]).algorithm.skip_gap == 3
    with pytest.raises(ConfigError, match=r"^algorithm\.synapse_kernel=2 is not valid; expected an odd int"):
        compose(overrides=["algorithm.name=rlra", "algorithm.synapse_kernel=2"])
    with pytest.raises(ConfigError, match=r"^model\.n_embd=100 is not valid; it must be divisible by model\.n_head=3"):
        compose(overrides=["model.name=transformer", "model.n_embd=100", "model.n_head=3"])


def test_cli_config_error_is_fast_and_exits_2(tmp_path):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bench", "run", "algorithm.name=rlra", "algorithm.map_synapse=bogus",
                           f"output.root={tmp_path}"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "algorithm.map_synapse='bogus'" in proc.stderr
    assert elapsed < 2.0, f"a config error took {elapsed:.2f} s"


def test_scanned_declarations_equal_the_imported_classes():
    """The validator reads the rule and model files' Options classes from their source; once the
    modules are imported, the registry holds the real classes. Both must declare the same keys."""
    options.scan()
    scanned = {name: [(f.name, repr(f.default), f.metadata.get("doc")) for f in dataclasses.fields(cls)]
               for name, cls in options._SCANNED_CLASSES.items()}
    import bench.algorithms  # noqa: F401 - registers the real classes
    import bench.models  # noqa: F401

    real = {cls.__name__: cls for cls in options._REGISTRY.values()}
    assert set(scanned) <= set(real) | {"LRAOptions", "WeightOptions", "FAOptions"}
    for name, fields in scanned.items():
        cls = real.get(name) or next(c for c in options._REGISTRY.values() if any(b.__name__ == name for b in c.__mro__))
        cls = next(b for b in cls.__mro__ if b.__name__ == name)
        assert [(f.name, repr(f.default), f.metadata.get("doc")) for f in dataclasses.fields(cls)] == fields, name


def test_every_registered_rule_and_model_has_a_config_and_its_declaration():
    from bench.algorithms import RULES
    from bench.models import MODELS

    assert set(RULES.names()) == set(group_choices("algorithm"))
    assert set(MODELS.names()) == set(group_choices("model"))
    for model in MODELS.names():  # every model declares its options (even if it has none of its own)
        assert options.declared("model", model) is not options.ModelOptions, model


def test_rules_read_typed_options_not_config_lookups():
    offenders = [f"{p.name}:{i}" for p in (ROOT / "bench" / "algorithms").glob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if re.search(r"cfg\.algorithm\.get\(|\ba\.get\(", line)]
    assert not offenders, offenders


def test_built_rule_carries_its_typed_options(small_cfg):
    from bench.algorithms import RULES
    from bench.algorithms.rlra import RlraOptions
    from bench.models import create_model

    cfg = small_cfg("algorithm.name=rlra", "algorithm.beta=0.25", "model.depth=2", "model.width=8")
    module = RULES.get("rlra")(cfg, create_model(cfg.model, (1, 28, 28), 10), 10, (1, 28, 28))
    assert isinstance(module.opts, RlraOptions) and module.opts.beta == 0.25 and module.beta == 0.25


def test_lightning_choices_are_the_installed_lightnings():
    from lightning.fabric.connector import _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS
    from lightning.pytorch.strategies import StrategyRegistry

    precisions = set(typing.get_args(_PRECISION_INPUT_STR)) | set(typing.get_args(_PRECISION_INPUT_STR_ALIAS))
    assert set(options.PRECISIONS) <= precisions
    assert set(options.STRATEGIES) - {"auto"} <= set(StrategyRegistry.available_strategies())


def test_options_command_prints_every_key_with_type_default_and_description():
    proc = subprocess.run([sys.executable, "-m", "bench", "options", "usf_sn"], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "sets sign_scale=sn" in proc.stdout
    row = next(line for line in proc.stdout.splitlines() if line.strip().startswith("sign_scale"))
    assert re.search(r"init \| sn \| unit\s+sn\s+init: \|B_0\|", row), row
    for key in options.declared("algorithm", "usf_sn").specs():
        if key != "name":
            assert re.search(rf"^\s+{key}\s", proc.stdout, re.M), key
    bad = subprocess.run([sys.executable, "-m", "bench", "options", "nope"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert bad.returncode == 2 and "unknown algorithm 'nope'" in bad.stderr


def test_readme_rule_options_table_is_current():
    text = (ROOT / "README.md").read_text()
    assert options.README_BEGIN in text, "the README lost its rule-options block"
    current = text.split(options.README_BEGIN, 1)[1].split(options.README_END, 1)[0]
    expected = options.readme_block().split(options.README_BEGIN, 1)[1].split(options.README_END, 1)[0]
    assert current == expected, "README rule-options table is stale: run `python -m bench options --readme`"


@pytest.mark.parametrize("args, says", [
    (["sweep", "rlra-1", "--local", "--rows", "bogus"], "unknown row 'bogus' of table rlra-1"),
    (["sweep", "nope", "--local"], "unknown table 'nope'"),
    (["table", "rlra-1", "--rows", "bogus"], "unknown row 'bogus' of table rlra-1"),
    (["sweep", "sfa-1", "--local", "--columns", "cifar"], "unknown column 'cifar' of table sfa-1"),
    (["table", "sfa-1", "--columns", "cifar"], "unknown column 'cifar' of table sfa-1"),
    (["compare", "/nonexistent/a", "/nonexistent/b"], "compare: '/nonexistent/a' is neither a run folder"),
    (["run", "output.root=/etc/hostname/runs"], "run folder"),
    (["run", "trainer.devices=0"], "trainer.devices=0 is not valid"),
])
def test_cli_checks_fail_before_lightning_is_imported(args, says):
    """The checks that used to pay the torch and Lightning import first (10–20 s)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True, cwd=ROOT, timeout=60)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and says in proc.stderr, proc.stderr
    assert elapsed < 2.0, f"{args}: {elapsed:.2f} s"


def test_a_rule_refusing_a_model_is_one_line_and_exit_2(tmp_path):
    """Refusals decided when the rule is built (dtp needs the zoo MLP) reach the user as one line."""
    proc = subprocess.run([sys.executable, "-m", "bench", "run", "algorithm.name=dtp", "model.name=cnn",
                           "data.name=synthetic", "trainer.max_steps=1", f"output.root={tmp_path}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr[-500:]
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("error: dtp on cnn: ") and "sequential mlp" in proc.stderr


@pytest.mark.parametrize("rule", ["eprop", "lra_e", "rlra", "dfa", "pepita"])
def test_shared_checks_run_for_rules_with_their_own(rule):
    """Options.check_all runs the shared AlgorithmOptions.check too, even where a rule declares its
    own check (before, eprop/lra_e/rlra accepted decreasing milestones and three betas)."""
    with pytest.raises(ConfigError, match=r"^algorithm\.milestones=\[60, 40\] is not valid"):
        compose(overrides=[f"algorithm.name={rule}", "algorithm.milestones=[60,40]"])
    with pytest.raises(ConfigError, match=r"^algorithm\.betas=.*expected two values"):
        compose(overrides=[f"algorithm.name={rule}", "algorithm.betas=[0.9,0.99,0.999]"])
