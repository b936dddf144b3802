"""The README's measured numbers are generated from the results files and fail this test when
stale (issue 17 §5: it quoted LRA-E 11.15, rLRA relu 11.73 and rLRA sign 78.62 while
results/rlra-1.md measured 11.88, 12.37 and 67.80)."""
from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from bench.results import readme
from bench.results.table import write_table
from bench.run.cells import Cell

REPO = Path(__file__).resolve().parent.parent


def test_the_committed_readme_block_matches_the_results_files():
    assert not readme.is_stale(REPO / "README.md", REPO / "results"), \
        "README.md's measured block is stale: run `make readme` (python -m bench.results.readme)"


def test_the_readme_quotes_what_results_rlra1_measured():
    text = (REPO / "README.md").read_text()
    generated = text[text.index(readme.BEGIN):text.index(readme.END)]
    rlra1 = next(line for line in generated.splitlines() if line.startswith("| `rlra-1` |"))
    # what results/rlra-1.md and .csv say, read independently of bench.results.readme
    md = (REPO / "results" / "rlra-1.md").read_text()
    budget = re.search(r"budget: `(\w+)`", md).group(1)
    epochs = re.search(r"epochs trained: ([\d, ]+);", md).group(1)
    assert f"| {budget} | {epochs} | 1 |" in rlra1
    rows = [r for r in csv.DictReader((REPO / "results" / "rlra-1.csv").open())
            if r["column"] == "fmnist" and r["field"] == "test" and r["measured_mean"]]
    assert len(rows) == 10
    for r in rows:
        quoted = f"{r['row']} {float(r['measured_mean']):.2f}"
        assert quoted in rlra1, quoted
    outside = text.replace(generated, "")
    for stale in ("11.15", "11.73", "78.62"):  # the hand-typed numbers an earlier review found
        assert stale not in text, stale
    bp = f"{float(next(r for r in rows if r['row'] == 'BP')['measured_mean']):.2f}"
    assert bp not in outside  # measured numbers live only in the generated block


def test_a_changed_result_makes_the_readme_stale_and_refresh_fixes_it(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(REPO / "results", results)
    copy = tmp_path / "README.md"
    shutil.copy(REPO / "README.md", copy)
    assert not readme.is_stale(copy, results)
    table = results / "rlra-1.csv"
    lra_e = next(r["measured_mean"] for r in csv.DictReader(table.open())
                 if (r["row"], r["column"], r["field"]) == ("LRA-E", "fmnist", "test"))
    assert table.read_text().count(f",{lra_e},") == 1
    table.write_text(table.read_text().replace(f",{lra_e},", ",9.99,"))
    assert readme.is_stale(copy, results)
    assert readme.main(["--check", "--readme", str(copy), "--results", str(results)]) == 1
    assert readme.refresh(copy, results) is True
    assert "LRA-E 9.99" in copy.read_text() and not readme.is_stale(copy, results)
    assert readme.main(["--check", "--readme", str(copy), "--results", str(results)]) == 0


def test_a_render_outside_the_repo_results_never_rewrites_the_readme(tmp_path):
    before = (REPO / "README.md").read_bytes()
    table = OmegaConf.create({"id": "toy", "title": "t", "metric": {"fields": {"test": "test/err1"}},
                              "columns": {"c": {}}, "rows": {"r": {}}})
    write_table(table, "short", [Cell("r", "c", 0, status="finished", summary={"final": {"test/err1": 1.0}})],
                out_dir=tmp_path / "results")
    assert (REPO / "README.md").read_bytes() == before
    block = readme.block(tmp_path / "results")
    assert "| `toy` | [results/toy.md](results/toy.md) | short |" in block and "c test: r 1.00" in block


def test_a_local_smoke_render_leaves_the_block_unchanged(tmp_path):
    """The main job writes git-ignored results/rlra-1.smoke.md; the README must not depend on it."""
    results = tmp_path / "results"
    shutil.copytree(REPO / "results", results)
    before = readme.block(results)
    (results / "rlra-1.smoke.md").write_text("# rlra-1\n\n- **budget: `smoke`**\n")
    (results / "rlra-1.short2.md").write_text("# rlra-1\n")
    after = readme.block(results)
    assert after == before.replace("[results/rlra-1.md](results/rlra-1.md) |",
                                   "[results/rlra-1.md](results/rlra-1.md) (also: [rlra-1.short2.md](results/rlra-1.short2.md)) |")
