"""Every figure states what was measured, on itself (issue 17 §5): budget, epochs, seeds, device,
stand-in data; error bars only with more than one seed; no axis stretched so that one seed's
noise reads as an effect; whole-number epoch ticks; titled legends. Nothing here trains."""
from __future__ import annotations

import pytest
from matplotlib.container import ErrorbarContainer
from omegaconf import OmegaConf

from bench.results import plots
from bench.results.table import aggregate, draw_curves, plot_figure
from bench.run.cells import Cell

# dfa-fig4 as committed: one seed, 62.31–62.40 % across the bottleneck sizes, FMNIST for CIFAR-10
FIG4 = {"10": 62.31, "25": 62.33, "50": 62.38, "100": 62.33, "200": 62.40, "400": 62.40, "800": 62.37}


@pytest.fixture
def captured(monkeypatch):
    """The figures table.py saves, still open (the real save closes them)."""
    figures = []

    def save(fig, path, dpi=None):
        figures.append(fig)
        fig.canvas.draw()
        return path

    monkeypatch.setattr(plots, "save", save)
    return figures


def fig4_table():
    return OmegaConf.create({
        "id": "dfa-fig4", "title": "bottleneck",
        "metric": {"name": "accuracy", "unit": "%", "fields": {"test": "test/acc1"}},
        "figure": {"x": "algorithm.bottleneck_neurons", "series": ["test"], "log_x": True},
        "columns": {"cifar10": {"data": {"name": "cifar10"}}},
        "rows": {n: {"algorithm": {"bottleneck_neurons": int(n)}} for n in FIG4},
    })


def fig4_cells(seeds: int, spread: float = 0.0) -> list[Cell]:
    cfg = lambda n: OmegaConf.create({"budget": "smoke", "data": {"name": "fmnist"},  # noqa: E731
                                      "algorithm": {"bottleneck_neurons": int(n)}})
    return [Cell(n, "cifar10", s, cfg=cfg(n), status="finished",
                 summary={"final": {"test/acc1": v + spread * (s - (seeds - 1) / 2)}, "epochs_done": 1,
                          "device": "cpu (x86_64, 2 cores, 1 threads)"})
            for n, v in FIG4.items() for s in range(seeds)]


def test_one_seed_figure_has_no_error_bars_says_one_seed_and_is_not_stretched(tmp_path, captured):
    table, cells = fig4_table(), fig4_cells(seeds=1)
    _, lines = plot_figure(table, aggregate(table, cells), cells, tmp_path / "fig4.png")
    (fig,) = captured
    (ax,) = fig.axes
    assert lines == [1]
    assert ax.containers == []  # no error-bar container, so no bar-less error-bar marker in the legend
    handles, labels = ax.get_legend_handles_labels()
    assert labels == ["cifar10 (run on fmnist: stand-in)"] and not isinstance(handles[0], ErrorbarContainer)
    lo, hi = ax.get_ylim()
    assert hi - lo >= 0.10 * 62.40 - 1e-9  # 62.31–62.40 drawn over ≥ 6.24 points: flat, as it is
    assert lo <= 62.31 and hi >= 62.40
    text = plots.figure_text(fig)
    for part in ("budget smoke", "1 epoch", "1 seed per point (no spread measured)",
                 "cpu (x86_64, 2 cores, 1 threads)", "fmnist stands in for cifar10"):
        assert part in text, part
    assert ax.get_legend().get_title().get_text() != ""


def test_three_seeds_show_their_spread(tmp_path, captured):
    table, cells = fig4_table(), fig4_cells(seeds=3, spread=0.5)
    records = aggregate(table, cells)
    assert {r["seeds"] for r in records} == {3} and records[0]["measured_std"] == pytest.approx(0.5)
    plot_figure(table, records, cells, tmp_path / "fig4.png")
    (fig,) = captured
    (ax,) = fig.axes
    assert len(ax.containers) == 1 and isinstance(ax.containers[0], ErrorbarContainer)
    assert "3 seeds per point (mean ± std)" in plots.figure_text(fig)


def test_epoch_curves_have_integer_ticks_and_say_how_many_epochs(tmp_path, captured):
    """rlra-fig2: three epochs of validation error; the x axis reads 1, 2, 3, never 1.5."""
    table = OmegaConf.create({"id": "rlra-fig2", "title": "t", "columns": {"fmnist": {}}, "rows": {}})
    spec = OmegaConf.create({"kind": "curves", "key": "val/err1", "x": "epoch", "lines": "rows",
                             "legend_title": "rule, activation"})
    lines = {"BP, tanh": [(1, 30.0), (2, 22.0), (3, 19.6)], "rLRA, tanh": [(1, 35.0), (2, 27.0), (3, 24.4)]}
    note = plots.provenance("smoke", [3, 3], 1, ["cpu (test)"])
    _, n = draw_curves(table, spec, tmp_path / "c.png", "fmnist", lines, note, by="rows")
    (fig,) = captured
    (ax,) = fig.axes
    assert n == 2
    ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert ax.get_legend().get_title().get_text() == "rule, activation"
    assert "budget smoke · 3 epochs · 1 seed per point (no spread measured) · cpu (test)" in plots.figure_text(fig)


def test_committed_figure_specs_title_their_legends():
    from bench.config import load_table

    flips = next(s for s in load_table("sfa-fig5").figure if s.name == "flips")
    assert flips.legend_title == "signs freeze after (fraction of training)"
    assert load_table("rlra-fig2").figure.legend_title == "rule, activation"


def test_floor_span_leaves_a_real_effect_alone():
    plt = plots.pyplot()
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3], [10.0, 50.0, 90.0])
    assert plots.floor_span(ax, [10.0, 50.0, 90.0]) == ax.get_ylim()
    lo, hi = ax.get_ylim()
    assert lo < 10.0 and hi > 90.0 and hi - lo < 100.0
    plt.close(fig)


def test_committed_figures_redrawn_from_their_csvs_carry_what_was_measured(tmp_path, captured):
    """The committed PNGs were redrawn from results/*.csv (no run folders here): dfa-fig4 says one
    seed and is flat; rlra-fig2 says 3 epochs, ticks whole epochs, titles its legend; the
    sfa-fig5 flips legend is titled."""
    import shutil
    from pathlib import Path

    from bench.results.rerender import rerender

    results = tmp_path / "results"
    shutil.copytree(Path(__file__).resolve().parent.parent / "results", results)
    drawn, _ = rerender("dfa-fig4", results)
    assert [p.name for p in drawn] == ["dfa-fig4.png"]
    fig = captured.pop()
    acc = fig.axes[0]
    assert acc.containers == [] and acc.get_ylim()[1] - acc.get_ylim()[0] >= 6.24
    text = plots.figure_text(fig)
    assert "budget short · 10 epochs · 1 seed per point (no spread measured)" in text
    assert "fmnist stands in for cifar10" in text

    drawn, _ = rerender("rlra-fig2", results)
    assert [p.name for p in drawn] == ["rlra-fig2-fmnist.png"]
    (ax,) = captured.pop().axes
    assert ax.get_title().endswith("\nfmnist") and ax.get_legend().get_title().get_text() == "rule, activation"
    assert all(float(t).is_integer() for t in ax.get_xticks())
    assert [len(line.get_xdata()) for line in ax.get_lines()] == [10, 10, 10, 10]  # the short run: 10 epochs

    drawn, _ = rerender("sfa-fig5", results)
    flips = captured[[p.name for p in drawn].index("sfa-fig5-flips.png")]
    assert flips.axes[0].get_legend().get_title().get_text() == "signs freeze after (fraction of training)"
