"""Results of different budgets never overwrite each other (issue 17 §4).

``results/<id>.md`` is the headline, the largest budget measured; a smaller budget's render goes
to ``<id>.<budget>.*`` beside it and never touches it; a larger one renames the headline's files
to their budget names first. Nothing here trains: cells carry hand-written summaries."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from bench.config import load_table
from bench.results.io import read_csv
from bench.results.table import headline_budget, result_suffix, write_table
from bench.run.cells import Cell

REPO = Path(__file__).resolve().parent.parent


def toy_table(figure: bool = False):
    spec = {
        "id": "toy", "title": "Toy table",
        "metric": {"name": "error", "unit": "%", "fields": {"test": "test/err1"}},
        "columns": {"fmnist": {"data": {"name": "fmnist"}}},
        "rows": {"10": {"algorithm": {"n": 10}}, "100": {"algorithm": {"n": 100}}},
    }
    if figure:
        spec["figure"] = {"x": "algorithm.n", "series": ["test"]}
    return OmegaConf.create(spec)


def cells(values: dict[str, float], epochs: int) -> list[Cell]:
    return [Cell(row, "fmnist", 0, status="finished",
                 summary={"final": {"test/err1": v}, "epochs_done": epochs, "device": "cpu (test)"})
            for row, v in values.items()]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_smoke_render_never_touches_a_short_headline(tmp_path):
    results = tmp_path / "results"
    table = toy_table()
    md, text = write_table(table, "short", cells({"10": 11.88, "100": 12.37}, 20), out_dir=results)
    assert md == results / "toy.md" and "budget: `short`" in text and "**11.88**" in text
    published = digest(results)
    assert sorted(published) == ["toy.csv", "toy.md"]

    md, text = write_table(table, "smoke", cells({"10": 50.0, "100": 60.0}, 1), out_dir=results)
    assert md == results / "toy.smoke.md"
    after = digest(results)
    assert {k: after[k] for k in published} == published  # the short files, byte for byte
    assert sorted(set(after) - set(published)) == ["toy.smoke.csv", "toy.smoke.md"]
    assert "budget: `smoke`" in text and "**50.00**" in text and "not the headline" in text
    assert "holds the larger `short` budget" in text
    assert {r["budget"] for r in read_csv(results / "toy.smoke.csv")} == {"smoke"}
    assert {r["budget"] for r in read_csv(results / "toy.csv")} == {"short"}
    assert headline_budget(results, "toy") == "short"

    # the same budget again replaces its own files only
    write_table(table, "smoke", cells({"10": 40.0, "100": 41.0}, 1), out_dir=results)
    again = digest(results)
    assert {k: again[k] for k in published} == published
    assert "**40.00**" in (results / "toy.smoke.md").read_text()


def test_a_larger_budget_renames_the_headline_and_its_plots_first(tmp_path):
    results = tmp_path / "results"
    table = toy_table(figure=True)
    write_table(table, "smoke", cells({"10": 50.0, "100": 60.0}, 1), out_dir=results)
    assert sorted(digest(results)) == ["plots/toy.png", "toy.csv", "toy.md"]
    smoke_png = (results / "plots" / "toy.png").read_bytes()

    md, text = write_table(table, "full", cells({"10": 12.5, "100": 13.5}, 500), out_dir=results)
    assert md == results / "toy.md" and "budget: `full`" in text and "**12.50**" in text
    assert sorted(digest(results)) == ["plots/toy.png", "plots/toy.smoke.png", "toy.csv", "toy.md",
                                       "toy.smoke.csv", "toy.smoke.md"]
    demoted = (results / "toy.smoke.md").read_text()
    assert "budget: `smoke`" in demoted and "**50.00**" in demoted
    assert "](plots/toy.smoke.png)" in demoted and "](plots/toy.png)" not in demoted  # its own plot, renamed
    assert (results / "plots" / "toy.smoke.png").read_bytes() == smoke_png
    assert {r["budget"] for r in read_csv(results / "toy.smoke.csv")} == {"smoke"}

    # a short render now sits between the two and touches neither
    before = digest(results)
    md, text = write_table(table, "short", cells({"10": 20.0, "100": 21.0}, 20), out_dir=results)
    assert md == results / "toy.short.md" and "](plots/toy.short.png)" in text
    after = digest(results)
    assert {k: after[k] for k in before} == before
    assert sorted(set(after) - set(before)) == ["plots/toy.short.png", "toy.short.csv", "toy.short.md"]


def test_computed_tables_always_write_the_headline(tmp_path):
    table = OmegaConf.create({"id": "comp", "compute": "x", "rows": {}, "columns": {}})
    results = tmp_path / "results"
    results.mkdir()
    (results / "comp.csv").write_text("budget,row\nfull,a\n")
    assert result_suffix(results, table, "smoke") == ""


def test_smoke_files_are_git_ignored_and_the_headline_is_not():
    names = ["results/rlra-1.smoke.md", "results/rlra-1.smoke.csv", "results/plots/rlra-fig2-fmnist.smoke.png",
             "results/rlra-fig2-curves.smoke.csv"]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *names], cwd=REPO, capture_output=True, text=True)
    assert ignored.stdout.split() == names
    kept = subprocess.run(["git", "check-ignore", "--no-index", "results/rlra-1.md", "results/rlra-1.short.md",
                           "results/plots/dfa-fig4.png"], cwd=REPO, capture_output=True, text=True)
    assert kept.returncode == 1 and kept.stdout == ""


def test_the_main_job_at_smoke_leaves_the_committed_rlra1_files_alone(tmp_path):
    """What `make reproduce-table-rlra-1 BUDGET=smoke` renders, into a copy of the committed
    results/: the short-budget headline stays byte for byte, and everything new is git-ignored."""
    assert headline_budget(REPO / "results", "rlra-1") == "short"
    results = tmp_path / "results"
    shutil.copytree(REPO / "results", results)
    committed = digest(results)
    table = load_table("rlra-1")
    smoke = [Cell(row, "fmnist", 0, status="finished", summary={"final": {"test/err1": 88.0, "final_train/err1": 87.0},
                                                                 "epochs_done": 1, "device": "cpu (test)"})
             for row in table.rows]
    md, _ = write_table(table, "smoke", smoke, out_dir=results)
    assert md == results / "rlra-1.smoke.md"
    after = digest(results)
    assert {k: after[k] for k in committed} == committed
    new = sorted(set(after) - set(committed))
    assert new == ["rlra-1.smoke.csv", "rlra-1.smoke.md"]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *(f"results/{n}" for n in new)], cwd=REPO,
                             capture_output=True, text=True)
    assert ignored.stdout.split() == [f"results/{n}" for n in new]


@pytest.mark.parametrize("budget, rank_order", [("short", ["smoke", "short"]), ("full", ["smoke", "full"])])
def test_budget_order_decides_the_headline(tmp_path, budget, rank_order):
    results = tmp_path / "results"
    table = toy_table()
    for b in rank_order[::-1]:  # the larger budget first, then the smaller one
        write_table(table, b, cells({"10": 1.0, "100": 2.0}, 1), out_dir=results)
    assert headline_budget(results, "toy") == budget
    assert (results / f"toy.{rank_order[0]}.md").exists() and not (results / f"toy.{budget}.md").exists()
