"""A paper table end to end on synthetic data: expand → run → render, with the two kinds of empty
cells (``not implemented``, ``data unavailable``), and skip-on-rerun of finished cells."""
from __future__ import annotations

import shutil

import pytest
from omegaconf import OmegaConf

import bench.config as config
from bench.results.io import read_csv
from bench.results.table import write_table
from bench.run.cells import DATA_UNAVAILABLE, NOT_IMPLEMENTED, expand, run_cells
from bench.run.train import train

TABLE_ID = "test-synth"
PAPER = {
    "BP": {"synth": {"train": 1.25, "test": 2.5}, "mnist": {"train": 0.0, "test": 1.48}},
    "FA": {"synth": {"train": 3.0, "test": 4.75}, "mnist": {"train": 0.0, "test": 1.85}},
    "Not a rule": {"synth": {"train": 5.0, "test": 6.0}},
}


@pytest.fixture
def table_configs(tmp_path, monkeypatch):
    configs = tmp_path / "configs"
    shutil.copytree(config.CONFIG_DIR, configs)
    table = {
        "id": TABLE_ID,
        "title": "Synthetic check table",
        "metric": {"name": "error", "unit": "%", "fields": {"train": "final_train/err1", "test": "test/err1"}},
        "columns": {
            "synth": {"data": {"name": "synthetic", "shape": [10], "num_classes": 3, "n_train": 160,
                               "n_test": 40, "val_size": 32, "eval_batch_size": 64}},
            "mnist": {"data": {"name": "mnist", "root": str(tmp_path / "no-mnist"), "download": False}},
        },
        "common": {"model": {"name": "mlp", "depth": 1, "width": 8}, "data": {"batch_size": 16},
                   "algorithm": {"optimizer": "sgd", "lr": 0.1},
                   "probe": {"every": 0}, "output": {"progress": "none"}},
        "rows": {
            "BP": {"algorithm": {"name": "bp"}, "paper": PAPER["BP"]},
            "FA": {"algorithm": {"name": "fa"}, "paper": PAPER["FA"]},
            "Not a rule": {"algorithm": {"name": "notarule"}, "paper": PAPER["Not a rule"]},
        },
        "budgets": {"tiny": {"epochs": 1, "seeds": 1}},
        "decisions": ["a decision recorded for the test"],
    }
    (configs / "tables" / f"{TABLE_ID}.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(table)))
    (configs / "budget" / "tiny.yaml").write_text("name: tiny\nepochs: 1\ntrain_subset: 96\nseeds: 1\n")
    monkeypatch.setattr(config, "CONFIG_DIR", configs)
    return configs


def test_table_renders_end_to_end(tmp_path, table_configs):
    runs, results = tmp_path / "runs", tmp_path / "results"
    table, cells = expand(TABLE_ID, "tiny", output_root=str(runs))
    assert [(c.row, c.column, c.status) for c in cells] == [
        ("BP", "synth", "pending"), ("BP", "mnist", "pending"),
        ("FA", "synth", "pending"), ("FA", "mnist", "pending"),
        ("Not a rule", "synth", NOT_IMPLEMENTED), ("Not a rule", "mnist", NOT_IMPLEMENTED),
    ]
    synth_cfg = cells[0].cfg
    assert synth_cfg.data.train_subset == 96 and synth_cfg.trainer.epochs == 1 and synth_cfg.budget == "tiny"

    trained = []

    def train_fn(plan):
        trained.append((plan.cfg.row, plan.cfg.column))
        return train(plan)

    run_cells(cells, train_fn)
    # mnist fails once with DataUnavailable; the FA/mnist cell reuses that verdict without training
    assert trained == [("BP", "synth"), ("BP", "mnist"), ("FA", "synth")]
    status = {(c.row, c.column): c.status for c in cells}
    assert status == {("BP", "synth"): "finished", ("BP", "mnist"): DATA_UNAVAILABLE,
                      ("FA", "synth"): "finished", ("FA", "mnist"): DATA_UNAVAILABLE,
                      ("Not a rule", "synth"): NOT_IMPLEMENTED, ("Not a rule", "mnist"): NOT_IMPLEMENTED}
    assert "mnist" in cells[1].reason and str(tmp_path / "no-mnist") in cells[1].reason

    md, text = write_table(table, "tiny", cells, out_dir=results)
    assert md == results / f"{TABLE_ID}.md" and md.read_text() == text
    assert "budget: `tiny`" in text
    assert "epochs trained: 1" in text
    main_table = text.split("## ")[0]  # the paper table, before the diagnostics sections
    lines = {line.split(" | ")[0].lstrip("| "): line for line in main_table.splitlines() if line.startswith("| ")}
    for cell in cells:
        if cell.status != "finished":
            continue
        test_err = cell.summary["final"]["test/err1"]
        train_err = cell.summary["final"]["final_train/err1"]
        assert 0.0 <= test_err <= 100.0
        paper = PAPER[cell.row]["synth"]
        line = lines[cell.row]
        assert f"{paper['test']:.2f} → **{test_err:.2f}** ({test_err - paper['test']:+.2f})" in line
        assert f"{paper['train']:.2f} → **{train_err:.2f}** ({train_err - paper['train']:+.2f})" in line
    assert "1.48 → *data unavailable*" in lines["BP"] and "1.85 → *data unavailable*" in lines["FA"]
    assert "6.00 → *not implemented*" in lines["Not a rule"]
    # the diagnostics section has one line per finished run with its measured epoch time
    diag = text.split("## Time, memory and alignment")[1].split("## ")[0]
    for cell in (c for c in cells if c.status == "finished"):
        row = next(line for line in diag.splitlines() if line.startswith(f"| {cell.row} | {cell.column} |"))
        assert f"| {cell.summary['time']['epoch_s_mean']:.2f} |" in row
    assert "– → *not implemented*" in lines["Not a rule"]  # no paper number for that column
    assert "rule 'notarule' is not implemented yet" in text
    assert "a decision recorded for the test" in text

    rows = read_csv(results / f"{TABLE_ID}.csv")
    assert len(rows) == 3 * 2 * 2  # rows × columns × fields
    assert {r["budget"] for r in rows} == {"tiny"}
    by_key = {(r["row"], r["column"], r["field"]): r for r in rows}
    bp_test = by_key[("BP", "synth", "test")]
    assert bp_test["status"] == "finished" and bp_test["seeds"] == "1"
    assert float(bp_test["measured_mean"]) == pytest.approx(cells[0].summary["final"]["test/err1"])
    assert float(bp_test["paper"]) == 2.5
    assert float(bp_test["delta"]) == pytest.approx(cells[0].summary["final"]["test/err1"] - 2.5)
    assert by_key[("FA", "mnist", "train")]["status"] == DATA_UNAVAILABLE
    assert by_key[("Not a rule", "synth", "test")]["status"] == NOT_IMPLEMENTED

    # a second expand finds the finished cells and does not run them again
    _, again = expand(TABLE_ID, "tiny", output_root=str(runs))
    status = {(c.row, c.column): c.status for c in again}
    assert status[("BP", "synth")] == status[("FA", "synth")] == "finished"
    assert status[("BP", "mnist")] == "pending"  # no run folder: retried next time
    finished = {(c.row, c.column): c.summary["final"]["test/err1"] for c in again if c.status == "finished"}
    assert finished == {(c.row, c.column): c.summary["final"]["test/err1"] for c in cells if c.status == "finished"}
    trained.clear()
    run_cells(again, train_fn)
    assert trained == [("BP", "mnist")]

    # a default that changes after the runs makes FA's finished folder another config's: it is not
    # rendered as this cell's result, and running it fails with the one-line mismatch, not a silent skip
    fa_yaml = table_configs / "algorithm" / "fa.yaml"
    assert "feedback_sigma" not in fa_yaml.read_text()  # the declared default (0.05) applies
    fa_yaml.write_text(fa_yaml.read_text() + "feedback_sigma: 0.123\n")
    _, changed = expand(TABLE_ID, "tiny", output_root=str(runs))
    status = {(c.row, c.column): c.status for c in changed}
    assert status[("BP", "synth")] == "finished" and status[("FA", "synth")] == "pending"
    trained.clear()
    run_cells(changed, train_fn)
    fa = next(c for c in changed if (c.row, c.column) == ("FA", "synth"))
    assert fa.status == "failed" and "holds a run of a different config" in fa.reason


def test_table_figure_has_one_line_per_column_and_the_measured_points(tmp_path):
    """Figures whose points are table rows (dfa-fig4): x from each row's config, y the measured mean."""
    import matplotlib.image

    from bench.results.table import plot_figure
    from bench.run.cells import Cell

    table = OmegaConf.create({
        "id": "fig-test", "title": "t",
        "figure": {"x": "algorithm.bottleneck_neurons", "series": ["test", "cos2"]},
        "columns": {"a": {"data": {"name": "synthetic"}}, "b": {"data": {"name": "synthetic"}}},
    })
    cells, records = [], []
    for n in (10, 100):
        for col in ("a", "b"):
            cells.append(Cell(str(n), col, 0, cfg=OmegaConf.create({"algorithm": {"bottleneck_neurons": n},
                                                                      "data": {"name": "synthetic"}})))
            for field, value in (("test", n / 10.0), ("cos2", n / 1000.0)):
                records.append({"row": str(n), "column": col, "field": field, "measured_mean": value,
                                "measured_std": 0.0})
    path, lines = plot_figure(table, records, cells, tmp_path / "fig.png")
    assert lines == [2, 2]  # two panels (series), one line per column in each
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 200 and image.std() > 0.01


def test_per_layer_keys_are_read_in_forward_order():
    """'@k' and the diagnostics follow the model's forward order: the probe records it
    (classifier after hidden.0.fc); string-sorted older summaries get a natural sort back."""
    from bench.results.table import forward_order, lookup

    recorded = ["align/update/features.0.conv", "align/update/hidden.0.fc", "align/update/classifier"]
    assert forward_order(recorded) == recorded
    legacy = sorted(f"align/update/net.{i}" for i in (1, 3, 5, 7, 9, 11))  # net.11 before net.3
    assert forward_order(legacy) == [f"align/update/net.{i}" for i in (1, 3, 5, 7, 9, 11)]
    summary = {"last_epoch": {k: float(i) for i, k in enumerate(recorded)}}
    assert lookup(summary, "align/update/@0") == 0.0 and lookup(summary, "align/update/@last") == 2.0


@pytest.mark.parametrize("declared_in", ["column", "common"])
def test_a_column_run_on_the_synthetic_stand_in_reads_data_unavailable(tmp_path, table_configs, declared_in):
    """A column whose paper dataset is absent may run on the synthetic stand-in at a small budget
    (column-level ``budgets:``): the run proves the pipeline, so its accuracy cell reads
    'data unavailable' with the stand-in's measured number in brackets, never as a result. The
    paper's dataset may be declared by the column or by the table's ``common`` section."""
    synth = {"name": "synthetic", "shape": [10], "num_classes": 3, "n_train": 160, "n_test": 40, "val_size": 32}
    column = {"budgets": {"tiny": {"data": synth}}}
    common_data = {"batch_size": 16}
    (column if declared_in == "column" else common_data)["data" if declared_in == "column" else "name"] = \
        {"name": "cifar10"} if declared_in == "column" else "cifar10"
    table = {
        "id": "test-standin", "title": "Stand-in check",
        "metric": {"name": "error", "unit": "%", "fields": {"test": "test/err1"}},
        "columns": {"cifar10": column},
        "common": {"model": {"name": "mlp", "depth": 1, "width": 8}, "data": common_data,
                   "probe": {"every": 0}, "output": {"progress": "none"}},
        "rows": {"BP": {"algorithm": {"name": "bp"}, "paper": {"cifar10": {"test": 7.5}}}},
    }
    (table_configs / "tables" / "test-standin.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(table)))
    loaded, cells = expand("test-standin", "tiny", output_root=str(tmp_path / "runs"))
    assert [c.cfg.data.name for c in cells] == ["synthetic"]
    run_cells(cells, train)
    _, text = write_table(loaded, "tiny", cells, out_dir=tmp_path / "results")
    measured = cells[0].summary["final"]["test/err1"]
    assert f"| BP | 7.50 → *data unavailable* (synthetic stand-in: {measured:.2f}) |" in text
    assert "runs on `synthetic` at this budget" in text
    csv_rows = read_csv(tmp_path / "results" / "test-standin.csv")
    assert [(r["data"], r["stands_in_for"]) for r in csv_rows] == [("synthetic", "cifar10")]  # in its own column


def test_scientific_notation_and_fields_a_row_does_not_have():
    """al-5's losses span 1e-5 to 1e-10: fixed-point would print 0.00 for every cell; and a
    1-component net logs no s2-t2, which is not a cell still to run."""
    from omegaconf import OmegaConf

    from bench.results.table import cell_text, number_format

    sci = number_format(OmegaConf.create({"metric": {"notation": "scientific", "digits": 2}}))
    assert number_format(OmegaConf.create({"metric": {}})) == ".2f"
    rec = {"paper": 1.2488e-5, "measured_mean": 4.5567e-3, "measured_std": 0.0, "seeds": 1,
           "delta": 4.5442e-3, "status": "finished"}
    assert cell_text(rec, sci) == "1.25e-05 → **4.56e-03** (+4.54e-03)"
    assert cell_text(rec) == "0.00 → **0.00** (+0.00)"
    missing = {**rec, "paper": None, "measured_mean": None, "delta": None, "seeds": 0, "status": "not applicable"}
    assert cell_text(missing, sci) == "–"
