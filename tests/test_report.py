"""Reports: the PNGs open, are not blank, and hold one series per rule/layer/column as expected;
results/<id>.md links them; `bench compare` prints the right differences.

One cell is a real (tiny) training run with the probe on, so the report reads the files the run
recorder writes; the other three are written by hand with known numbers."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from matplotlib.container import BarContainer
from matplotlib.image import imread
from omegaconf import OmegaConf

import bench.config as config
from bench import cli
from bench.config import run_name
from bench.results.report import report
from bench.results.io import read_csv, write_csv, write_json
from bench.run.cells import expand
from bench.run.train import train
from conftest import synth

TABLE_ID = "test-report"
FAKE_LAYERS = ["net.1", "net.3", "net.5"]  # hand-written runs have three layers; the real one has two
EPOCH_S = {("FA", "three"): [0.5, 0.7], ("BP", "four"): [0.25, 0.35], ("FA", "four"): [1.0, 1.2]}
TEST_ERR = {("FA", "three"): 40.0, ("BP", "four"): 30.0, ("FA", "four"): 35.5}


@pytest.fixture
def report_table(tmp_path, monkeypatch):
    configs = tmp_path / "configs"
    shutil.copytree(config.CONFIG_DIR, configs)
    table = {
        "id": TABLE_ID, "title": "Synthetic report table",
        "metric": {"name": "error", "unit": "%", "fields": {"test": "test/err1"}},
        "columns": {"three": synth(3), "four": synth(4)},
        "common": {"model": {"name": "mlp", "depth": 1, "width": 8}, "data": {"batch_size": 16},
                   "algorithm": {"optimizer": "sgd", "lr": 0.1}, "probe": {"every": 2}},
        "rows": {"BP": {"algorithm": {"name": "bp"}}, "FA": {"algorithm": {"name": "fa"}}},
        "budgets": {"tiny": {"epochs": 1, "seeds": 1}},
    }
    (configs / "tables" / f"{TABLE_ID}.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(table)))
    (configs / "budget" / "tiny.yaml").write_text("name: tiny\nepochs: 1\ntrain_subset: 96\nseeds: 1\n")
    monkeypatch.setattr(config, "CONFIG_DIR", configs)
    runs = tmp_path / "runs"
    _, cells = expand(TABLE_ID, "tiny", output_root=str(runs))
    dirs = {}
    for cell in cells:
        run_dir = runs / run_name(cell.cfg)
        dirs[(cell.row, cell.column)] = run_dir
        if (cell.row, cell.column) == ("BP", "three"):
            assert train(cell.cfg)["status"] == "finished"
            continue
        key = (cell.row, cell.column)
        write_csv(run_dir / "metrics.csv", [{"epoch": e, "train/err1": 50 - 10 * e, "val/err1": 55 - 10 * e}
                                            for e in range(len(EPOCH_S[key]))])
        write_csv(run_dir / "probe.csv", [{"step": s, "epoch": 0, **{f"align/update/{l}": 10.0 * i + s
                                                                        for i, l in enumerate(FAKE_LAYERS)}}
                                          for s in (0, 2, 4)])
        write_json(run_dir / "summary.json", {
            "status": "finished", "run": str(run_dir), "final": {"test/err1": TEST_ERR[key]},
            "epochs_done": len(EPOCH_S[key]), "last_epoch": {"align/update/net.1": 12.5},
            "time": {"epoch_s": EPOCH_S[key], "epoch_s_mean": float(np.mean(EPOCH_S[key])), "step_median_ms": 1.0},
            "memory": {"peak_mb": 100.0}, "device": "cpu (test)"})
    return tmp_path, dirs


def legend_labels(ax) -> list[str]:
    return ax.get_legend_handles_labels()[1]


def test_report_plots_have_the_expected_series(report_table):
    tmp_path, dirs = report_table
    results = tmp_path / "results"
    md, pngs, figures = report(TABLE_ID, "tiny", output_root=str(tmp_path / "runs"), results=results)
    names = sorted(p.name for p in pngs)
    assert names == sorted([f"{TABLE_ID}-epoch-time.png"] + [f"{TABLE_ID}-{c}-{k}.png" for c in ("three", "four")
                                                             for k in ("alignment", "error")])
    for png in pngs:
        image = imread(png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert float(image[..., :3].std()) > 0.01, f"{png.name} is blank"
    text = md.read_text()
    assert "## Plots" in text and all(f"(plots/{name})" in text for name in names)

    # alignment: one panel per rule, one line per layer (the real BP run's layers from its probe.csv)
    real_layers = [k.removeprefix("align/update/") for k in read_csv(dirs[("BP", "three")] / "probe.csv")[0]
                   if k.startswith("align/update/")]
    assert len(real_layers) == 2
    align = figures[results / "plots" / f"{TABLE_ID}-three-alignment.png"]
    assert [ax.get_title() for ax in align.axes] == ["BP", "FA"]
    assert [legend_labels(ax) for ax in align.axes] == [real_layers, FAKE_LAYERS]
    fa_net3 = align.axes[1].get_lines()[1]
    assert list(fa_net3.get_xdata()) == [0, 2, 4] and list(fa_net3.get_ydata()) == [10.0, 12.0, 14.0]

    # error curves: train and validation panels, one line per rule, one point per epoch
    error = figures[results / "plots" / f"{TABLE_ID}-four-error.png"]
    assert [legend_labels(ax) for ax in error.axes] == [["BP", "FA"], ["BP", "FA"]]
    assert list(error.axes[1].get_lines()[1].get_ydata()) == [55.0, 45.0]  # FA/four val error

    # epoch time: one bar series per column, one bar per rule, height = mean seconds per epoch
    (ax,) = figures[results / "plots" / f"{TABLE_ID}-epoch-time.png"].axes
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [b.get_label() for b in bars] == ["three", "four"] and all(len(b) == 2 for b in bars)
    assert [r.get_height() for r in bars[1]] == pytest.approx([0.3, 1.1])  # BP/four, FA/four
    assert bars[0][1].get_height() == pytest.approx(0.6)  # FA/three
    assert ax.containers[0].errorbar is None  # one run per cell: no error bars claiming a spread

    # every plot says what it measured, on itself
    from bench.results.plots import figure_text

    for path, fig in figures.items():
        text = figure_text(fig)
        assert "budget tiny" in text and "cpu" in text, path.name
        assert ("1 seed per point (no spread measured)" in text) or ("seed 0 of each cell" in text), path.name
    assert "1, 2 epochs" in figure_text(figures[results / "plots" / f"{TABLE_ID}-epoch-time.png"])
    assert [ax.get_legend().get_title().get_text() for ax in align.axes] == ["layer", "layer"]


def test_compare_two_runs_prints_the_differences(report_table, capsys):
    _, dirs = report_table
    cli.main(["compare", str(dirs[("BP", "four")]), str(dirs[("FA", "four")])])
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line and not line.startswith(("A:", "B:", "-"))}
    assert lines["test/err1"][1:] == ["30", "35.5", "+5.5"]
    assert lines["time/epoch_s_mean"][1:] == ["0.3", "1.1", "+0.8"]
    assert lines["align/update/net.1"][1:] == ["12.5", "12.5", "+0"]


def test_compare_refuses_what_is_neither_run_nor_table(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["compare", str(tmp_path / "nothing"), "rlra-1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "neither a run folder" in err


def _run_folder(path, data: dict, model: dict, budget: str, epochs: int, err: float):
    write_json(path / "summary.json", {"status": "finished", "final": {"test/err1": err}, "epochs_done": epochs,
                                       "budget": budget, "data": data["name"], "model": model["name"]})
    (path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(
        {"budget": budget, "data": data, "model": model})))
    return path


def test_compare_warns_once_per_difference_in_data_model_or_budget(tmp_path, capsys):
    mlp = {"name": "mlp", "depth": 3, "width": 800}
    fmnist = {"name": "fmnist", "batch_size": 32, "root": "/a"}
    a = _run_folder(tmp_path / "a", fmnist, mlp, "short", 20, 11.5)
    same = _run_folder(tmp_path / "same", {**fmnist, "root": "/elsewhere"}, mlp, "short", 20, 11.0)
    other = _run_folder(tmp_path / "other", {"name": "cifar10", "batch_size": 32, "root": "/a"},
                        {**mlp, "width": 256}, "smoke", 1, 60.0)

    cli.main(["compare", str(a), str(same)])
    out = capsys.readouterr().out
    assert "warning" not in out  # the data root says where, not what: no warning
    assert out.splitlines()[2] == ""

    cli.main(["compare", str(a), str(other)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2:5] == [
        "warning: A and B differ in data: name fmnist vs cifar10",
        "warning: A and B differ in model: width 800 vs 256",
        "warning: A and B differ in budget: short, 20 epochs vs smoke, 1 epoch",
    ]
    assert lines[5] == "" and next(l for l in lines if l.startswith("test/err1")).split()[1:] == ["11.5", "60", "+48.5"]


def test_compare_a_run_with_a_table_side_warns_only_on_what_both_record():
    from bench.results.report import differences

    run = {"data": {"name": "fmnist", "batch_size": 32}, "model": {"name": "mlp", "depth": 5},
           "budget": "smoke", "epochs": [1]}
    table = {"data": {"name": "fmnist, mnist"}, "model": {"name": "mlp"}, "budget": "short", "epochs": [3, 20]}
    assert differences(run, table) == [
        "warning: A and B differ in data: name fmnist vs fmnist, mnist",
        "warning: A and B differ in budget: smoke, 1 epoch vs short, 3, 20 epochs",
    ]
    assert differences(run, {**run, "data": {"name": "fmnist"}}) == []


def test_decisions_only_rewrites_the_decisions_and_keeps_the_measurements(tmp_path, capsys):
    from bench.results.table import refresh_decisions

    table = OmegaConf.create({"id": "tiny", "notes": ["a note"], "decisions": ["old decision", "new decision"]})
    measured = "| row | test |\n|---|---|\n| BP | 1.00 → **12.34** |"
    text = f"# tiny\n\n{measured}\n\n## Protocol notes and decisions\n\n- a note\n- old decision\n\n![fig](plots/fig.png)\n"
    (tmp_path / "tiny.md").write_text(text)
    (tmp_path / "tiny-2.md").write_text(text)  # another table whose id starts with this one's: untouched
    assert refresh_decisions(table, tmp_path) == [tmp_path / "tiny.md"]
    out = (tmp_path / "tiny.md").read_text()
    assert out == text.replace("- old decision\n", "- old decision\n- new decision\n")
    assert (tmp_path / "tiny-2.md").read_text() == text
    assert refresh_decisions(table, tmp_path) == []  # already current: nothing rewritten
