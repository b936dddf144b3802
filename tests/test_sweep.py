"""Sweeps: the committed W&B sweep files agree with their tables and round-trip through
``bench run``'s parser; the local runner runs a 2×2 grid in subprocesses, skips it the second
time, and reruns a failed cell only with --retry-failed; bad input fails with one line."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from omegaconf import OmegaConf

import bench.config as config
import bench.run.sweep as sw
from bench import cli
from bench.config import compose, config_hash, parse_cli, run_name
from bench.algorithms import RULES
from bench.run.cells import row_algorithm
from conftest import synth

SWEEP_FILES = sorted(sw.SWEEPS_DIR.glob("*.yaml"))


def test_every_table_has_a_sweep_file_and_no_file_lacks_a_table():
    assert sorted(p.stem for p in SWEEP_FILES) == config.trained_table_ids(), "run `python -m bench sweep --write`"


@pytest.mark.parametrize("path", SWEEP_FILES, ids=[p.stem for p in SWEEP_FILES])
def test_sweep_file_matches_its_table(path):
    assert path.read_text() == sw.render_sweep(sw.sweep_spec(path.stem)), \
        f"{path} is stale: run `python -m bench sweep --write`"
    spec = sw.load_sweep(path)
    assert sw.check_sweep(spec, str(path)) == path.stem
    assert spec["method"] == "grid" and spec["metric"]["goal"] in ("minimize", "maximize")
    assert spec["command"] == ["${env}", "${interpreter}", "-m", "bench", "run", "${args_no_hyphens}"]


@pytest.mark.parametrize("path", SWEEP_FILES, ids=[p.stem for p in SWEEP_FILES])
def test_sweep_file_round_trips_through_bench_run(path):
    """Each grid point, as the agent passes it to `bench run`, composes to the table's cell config.

    Every point's command line is parsed and its row and column resolved; a config is a pure
    function of (table, row, column, budget, dotlist), so composing one point per row (seed 0, its
    first implemented column; ~0.3 s a config) and comparing it with the table runner's covers
    the rest without composing the whole grid twice.
    """
    spec = sw.load_sweep(path)
    budget = sw.param_values(spec, "budget")[0]
    table = config.load_table(path.stem)
    seeds = max(int(config.table_budget(table, budget, table.rows[r])[1].get("seeds", 1)) for r in table.rows)
    assert sw.param_values(spec, "seed") == list(range(seeds))
    points = sw.grid_points(spec)
    assert len(points) == len(table.rows) * len(table.columns) * seeds
    parser = cli.build_parser()
    resolved = set()
    for point in points:
        args = parser.parse_args(["run", *sw.agent_args(point)])
        run, dotlist = parse_cli(args.overrides)
        assert (run["table"], run["budget"], dotlist) == (path.stem, budget, [f"seed={point['seed']}"])
        resolved.add((config.resolve_name("row", run["row"], table.rows.keys(), path.stem),
                      config.resolve_name("column", run["column"], table.columns.keys(), path.stem), point["seed"]))
    assert resolved == {(r, c, s) for r in table.rows for c in table.columns for s in range(seeds)}
    composed = 0
    for row in table.rows:
        if row_algorithm(table, row) not in RULES:
            continue
        for column in table.columns:
            args = parser.parse_args(["run", *sw.agent_args({"table": path.stem, "budget": budget, "row": config.slug(row),
                                                             "column": config.slug(column), "seed": 0})])
            run, dotlist = parse_cli(args.overrides)
            try:
                reference = compose(path.stem, row, column, budget, ["seed=0"])  # what `bench table` runs
            except config.ConfigError:
                continue  # this column is not runnable for this row (its own test says so)
            cfg = compose(run["table"], run["row"], run["column"], run["budget"], dotlist)
            assert run_name(cfg) == run_name(reference) and config_hash(cfg) == config_hash(reference)
            assert cfg == reference
            composed += 1
            break
    assert composed or not any(row_algorithm(table, r) in RULES for r in table.rows)


def test_a_sweep_file_naming_a_missing_row_is_refused(tmp_path, capsys):
    spec = sw.sweep_spec("rlra-1")
    spec["parameters"]["row"]["values"].append("no-such-row")
    bad = tmp_path / "rlra-1.yaml"
    bad.write_text(sw.render_sweep(spec))
    with pytest.raises(config.ConfigError, match="unknown row 'no-such-row' of table rlra-1"):
        sw.check_sweep(sw.load_sweep(bad), str(bad))
    # through the CLI: one line, status 2, before any W&B call
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sweep", "rlra-1", "--wandb", "--sweeps-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "no-such-row" in err


def test_wandb_without_a_login_fails_with_one_line(tmp_path, monkeypatch, capsys):
    # No network here: this checks the refusal only; creating a sweep needs a W&B account.
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sweep", "rlra-1", "--wandb"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "not logged in" in err


# --------------------------------------------------------------------------- local runner

TABLE_ID = "test-sweep"


@pytest.fixture
def sweep_configs(tmp_path, monkeypatch):
    """A 2×2 table on synthetic data in a copy of configs/, visible to subprocesses too."""
    configs = tmp_path / "configs"
    shutil.copytree(config.CONFIG_DIR, configs)
    table = {
        "id": TABLE_ID, "title": "Synthetic sweep table",
        "metric": {"name": "error", "unit": "%", "fields": {"test": "test/err1"}},
        "columns": {"three": synth(3), "four": synth(4)},
        "common": {"model": {"name": "mlp", "depth": 1, "width": 8}, "data": {"batch_size": 16},
                   "algorithm": {"optimizer": "sgd", "lr": 0.1}, "probe": {"every": 0}},
        "rows": {"BP": {"algorithm": {"name": "bp"}, "paper": {"three": {"test": 1.0}}},
                 "FA": {"algorithm": {"name": "fa"}, "paper": {"four": {"test": 2.0}}}},
        "budgets": {"tiny": {"epochs": 1, "seeds": 1}},
    }
    (configs / "tables" / f"{TABLE_ID}.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(table)))
    (configs / "budget" / "tiny.yaml").write_text("name: tiny\nepochs: 1\ntrain_subset: 96\nseeds: 1\n")
    monkeypatch.setattr(config, "CONFIG_DIR", configs)
    monkeypatch.setenv("BENCH_CONFIGS", str(configs))
    return configs


class Spawns:
    """Records the commands the runner starts; optionally fakes them (exit 0, nothing run)."""

    def __init__(self, monkeypatch, fake: bool):
        self.commands: list[list[str]] = []
        def popen(cmd, **kwargs):
            self.commands.append(cmd)
            return subprocess.Popen(["true"] if fake else cmd, **kwargs)

        monkeypatch.setattr(sw, "spawn", popen)


def sweep_main(*args: str) -> int:
    try:
        cli.main(["sweep", TABLE_ID, *args])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def summaries(root) -> dict[str, dict]:
    return {str(p.parent.relative_to(root)): json.loads(p.read_text()) for p in root.rglob("summary.json")}


def test_local_runner_runs_a_2x2_grid_once(tmp_path, sweep_configs, monkeypatch, capsys):
    runs, results = tmp_path / "runs", tmp_path / "results"
    common = ["--local", "--budget", "tiny", "--parallel", "2", "--output-root", str(runs), "--results", str(results)]
    spawns = Spawns(monkeypatch, fake=False)
    assert sweep_main(*common) == 0
    out = capsys.readouterr().out
    done = summaries(runs)
    assert sorted(done) == [f"tiny/{TABLE_ID}/{r}/{c}/s0" for r in ("bp", "fa") for c in ("four", "three")]
    assert {s["status"] for s in done.values()} == {"finished"}
    assert len(spawns.commands) == 4
    # 2 at a time on this machine's cores: each worker gets cores // 2 threads
    assert all(f"trainer.threads={max(1, sw.usable_cores() // 2)}" in cmd for cmd in spawns.commands)
    # the rendered table, with every measured cell, is printed and written
    md = (results / f"{TABLE_ID}.md").read_text()
    assert md.split("## ")[0].strip() in out.replace("\r", "")
    bp_three = done[f"tiny/{TABLE_ID}/bp/three/s0"]["final"]["test/err1"]
    assert f"1.00 → **{bp_three:.2f}**" in md
    assert out.count(": finished  test err") == 4

    # second invocation: nothing to run, same table
    spawns.commands.clear()
    mtimes = {p: p.stat().st_mtime_ns for p in runs.rglob("summary.json")}
    assert sweep_main(*common) == 0
    assert spawns.commands == []
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("summary.json")} == mtimes

    # a failed cell: left alone (exit 1, reported) unless --retry-failed, which reruns only it
    failed_path = runs / f"tiny/{TABLE_ID}/fa/four/s0/summary.json"
    failed_path.write_text(json.dumps({**json.loads(failed_path.read_text()), "status": "failed", "error": "boom"}))
    fake = Spawns(monkeypatch, fake=True)
    assert sweep_main(*common) == 1
    assert fake.commands == [] and "FA / four / s0: failed  (boom)" in capsys.readouterr().out
    assert sweep_main(*common, "--retry-failed") == 1  # the fake rerun leaves the summary failed
    assert len(fake.commands) == 1
    assert [a for a in fake.commands[0] if a.split("=")[0] in ("row", "column", "seed")] == \
        ["row=fa", "column=four", "seed=0"]


def written_files(tmp_path) -> list[str]:
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
                  if p.is_file() and p.relative_to(tmp_path).parts[0] != "configs")


# bench run writes only its run folder; bench report only reads run folders
@pytest.mark.parametrize("command, locked", [("run", "runs"), ("table", "runs"), ("table", "results"),
                                             ("sweep", "runs"), ("sweep", "results"), ("report", "results")])
def test_an_unwritable_folder_fails_with_one_line_and_writes_nothing(command, locked, tmp_path, sweep_configs, capsys):
    # A folder under a plain file cannot be created, even by root (for whom read-only modes are no obstacle).
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    runs, results = tmp_path / "runs", tmp_path / "results"
    if locked == "runs":
        runs = blocker / "runs"
    else:
        results = blocker / "results"
    argv = {
        "run": ["run", f"table={TABLE_ID}", "row=bp", "column=three", "budget=tiny", f"output.root={runs}"],
        "table": ["table", TABLE_ID, "--budget", "tiny", "--output-root", str(runs), "--results", str(results)],
        "sweep": ["sweep", TABLE_ID, "--local", "--budget", "tiny", "--output-root", str(runs), "--results", str(results)],
        "report": ["report", TABLE_ID, "--budget", "tiny", "--output-root", str(runs), "--results", str(results)],
    }[command]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: ") and "is not writable (Not a directory)" in err and str(blocker) in err
    assert written_files(tmp_path) == ["a-file"]  # no run started, no table or plot written


def test_unknown_rows_are_refused_and_rows_select_by_slug(tmp_path, sweep_configs, monkeypatch, capsys):
    runs, results = tmp_path / "runs", tmp_path / "results"
    common = ["--budget", "tiny", "--output-root", str(runs), "--results", str(results)]
    spawns = Spawns(monkeypatch, fake=True)
    for argv in (["sweep", TABLE_ID, "--local", "--rows", "FA", "no-such-row", *common],
                 ["table", TABLE_ID, "--rows", "no-such-row", *common],
                 # what a W&B agent runs for a sweep file naming a row the table lacks
                 ["run", *sw.agent_args({"table": TABLE_ID, "budget": "tiny", "row": "no-such-row", "column": "three",
                                         "seed": 0}), f"output.root={runs}"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1, err
        assert f"unknown row 'no-such-row' of table {TABLE_ID}" in err
    assert spawns.commands == [] and written_files(tmp_path) == []
    # a row by its slug: only that row's cells start (the fake runs write nothing, so they fail)
    assert sweep_main("--local", "--rows", "fa", *common) == 1
    assert sorted(a for cmd in spawns.commands for a in cmd if a.startswith(("row=", "column="))) == \
        ["column=four", "column=three", "row=fa", "row=fa"]
    # the rendered table still lists every row
    md = (results / f"{TABLE_ID}.md").read_text()
    assert "| BP |" in md and "| FA |" in md
    # --columns selects the same way, and with --rows it is the intersection
    spawns.commands.clear()
    assert sweep_main("--local", "--columns", "four", *common) == 1
    assert sorted(a for cmd in spawns.commands for a in cmd if a.startswith("column=")) == ["column=four"] * 2
    spawns.commands.clear()
    assert sweep_main("--local", "--rows", "fa", "--columns", "three", *common) == 1
    assert sorted(a for cmd in spawns.commands for a in cmd if a.startswith(("row=", "column="))) == \
        ["column=three", "row=fa"]


@pytest.mark.parametrize("override, message", [
    ("output.wandb=onlin", "output.wandb='onlin' is not valid; valid choices: online, offline, disabled"),
    ("trainer.precision=bf17", "trainer.precision='bf17' is not valid; valid choices: "),
    ("trainer.strategy=dpp", "trainer.strategy='dpp' is not valid; valid choices: auto, ddp"),
    ("trainer.devices=0", "trainer.devices=0 is not valid"),
])
def test_a_bad_trainer_or_output_value_fails_before_any_run(override, message, tmp_path, sweep_configs, capsys):
    for argv in (["run", f"table={TABLE_ID}", "row=bp", "column=three", "budget=tiny", f"output.root={tmp_path}/runs", override],
                 ["sweep", TABLE_ID, "--local", "--budget", "tiny", "--output-root", str(tmp_path / "runs"),
                  "--results", str(tmp_path / "results"), override]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert written_files(tmp_path) == []
