"""The sfa figures (sfa-fig2, sfa-fig3, sfa-fig5): the numbers behind them and the PNGs.

* fig2: the gradient ratio the computed table reports equals a hand computation (numpy forward
  and backward with W and with B) on a tiny depth-2 (three-matrix) MLP, averaged over the same draws;
* fig5: the sign-flip tracker's fractions equal a hand count after known weight changes, and in
  a real run with E/I at fraction 0 the count stops moving once the signs are frozen;
* the figure PNGs open, are not blank and hold the expected number of lines.
"""
from __future__ import annotations

import math
import shutil
import statistics

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from omegaconf import OmegaConf

import bench.config as config
from bench.metrics.sign_flips import SignFlips
from bench.config import compose, load_table
from bench.data.synthetic import make_synthetic
from bench.results.computed import COMPUTED, build_rule
from bench.results.io import read_csv
from bench.results.table import aggregate, plot_curves, plot_figure, write_table
from bench.run.cells import expand, run_cells
from bench.run.train import train
from conftest import fixed, synth


def _install(tmp_path, monkeypatch, tables: dict) -> None:
    configs = tmp_path / "configs"
    shutil.copytree(config.CONFIG_DIR, configs)
    for table_id, table in tables.items():
        (configs / "tables" / f"{table_id}.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(table)))
    (configs / "budget" / "tiny.yaml").write_text("name: tiny\nepochs: 1\ntrain_subset: 96\nseeds: 1\n")
    monkeypatch.setattr(config, "CONFIG_DIR", configs)


def _assert_png(path, min_h=100, min_w=200):
    image = imread(path)
    assert image.shape[0] > min_h and image.shape[1] > min_w
    assert float(image[..., :3].std()) > 0.01, f"{path.name} is blank"


# --------------------------------------------------------------------------- fig2

FIG2 = {
    "id": "fig2-test", "title": "t", "compute": "gradient_ratio",
    "metric": {"name": "ratio", "fields": {"weight": "weight", "signal": "signal"}},
    "figure": {"x": "model.depth", "series": ["weight", "signal"], "log_y": True},
    "columns": {"naive": {"model": {"init": "gaussian", "sigma": 0.4},
                          "algorithm": {"feedback_init": "gaussian", "feedback_sigma": 0.9}},
                "preserving": {"model": {"init": "lecun"}, "algorithm": {"feedback_init": "kaiming"}}},
    "common": {"algorithm": {"name": "fa"}, "model": {"name": "mlp", "width": 5, "activation": "tanh"},
               "data": {"name": "synthetic", "shape": [4], "num_classes": 3, "n_train": 6, "n_test": 2,
                        "batch_size": 3}},
    "rows": {"2": {"model": {"depth": 2}}, "3": {"model": {"depth": 3}}},
    "budgets": {"tiny": {"seeds": 2}},
}


def _hand_ratios(module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Forward and backward of a tanh MLP by hand (float64 numpy); FA swaps Wᵀ for B."""
    linears = [m for m in module.model.net if isinstance(m, torch.nn.Linear)]
    W = [m.weight.detach().double().numpy() for m in linears]
    b = [m.bias.detach().double().numpy() for m in linears]
    B = [m.feedback.double().numpy() for m in linears]
    xs = x.reshape(len(x), -1).double().numpy()
    hs, h = [], xs
    for Wl, bl in zip(W[:-1], b[:-1]):
        h = np.tanh(h @ Wl.T + bl)
        hs.append(h)
    z = h @ W[-1].T + b[-1]
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    e = (p - np.eye(z.shape[1])[y.numpy()]) / len(xs)  # ∂(mean cross-entropy)/∂z

    def backward(mats):
        delta, signal = e, None
        for layer in range(len(W) - 1, 0, -1):  # from the output layer down to layer 2
            dh = delta @ mats[layer]             # BP: δ·W = (Wᵀδᵀ)ᵀ; FA: δ·B
            delta = dh * (1 - hs[layer - 1] ** 2)
            signal = dh
        return delta.T @ xs, signal              # ΔW¹ and ∂J/∂x¹

    bp_w, bp_h = backward(W)
    fa_w, fa_h = backward(B)
    return float(np.linalg.norm(bp_w) / np.linalg.norm(fa_w)), float(np.linalg.norm(bp_h) / np.linalg.norm(fa_h))


def test_fig2_ratio_equals_hand_computation(tmp_path, monkeypatch):
    _install(tmp_path, monkeypatch, {"fig2-test": FIG2})
    table = load_table("fig2-test")
    records = COMPUTED.get("gradient_ratio")(table, "tiny")
    assert len(records) == 2 * 2 * 2  # rows × columns × fields
    for rec in records:
        cfg = compose("fig2-test", rec["row"], rec["column"], "tiny")
        assert cfg.model.depth == int(rec["row"])
        hand = []
        for seed in range(2):
            cfg.seed = seed
            module = build_rule(cfg)
            # the configured draws: W ~ N(0, 0.4²) and B ~ N(0, 0.9²) (naive), else 1/n_in and 1/n_out
            hidden = module.model.net[3]
            if rec["column"] == "naive":
                assert float(hidden.weight.detach().std()) == pytest.approx(0.4, rel=0.5)
                assert float(hidden.feedback.std()) == pytest.approx(0.9, rel=0.5)
            data = make_synthetic(cfg.data, seed)
            for x, y in zip(data.train_x.split(3), data.train_y.split(3)):
                weight, signal = _hand_ratios(module, x, y)
                hand.append(weight if rec["field"] == "weight" else signal)
        assert rec["seeds"] == 4 and rec["status"] == "finished"  # 2 seeds × 2 batches
        assert rec["measured_mean"] == pytest.approx(statistics.fmean(hand), rel=1e-4)
        assert rec["measured_std"] == pytest.approx(statistics.stdev(hand), rel=1e-3, abs=1e-7)
        assert rec["measured_mean"] != pytest.approx(1.0, abs=1e-3)  # W ≠ B: a ratio that can fail
    # naive: ‖W‖/‖B‖ ≈ 0.4/0.9 per layer, so one more layer shrinks the ratio (Eq. 8)
    by = {(r["row"], r["column"], r["field"]): r["measured_mean"] for r in records}
    assert by[("3", "naive", "weight")] < by[("2", "naive", "weight")]

    md, text = write_table(table, "tiny", [], out_dir=tmp_path / "results")
    assert "mean ± std over 4 random draws per cell" in text
    png = tmp_path / "results" / "plots" / "fig2-test.png"
    assert f"](plots/{png.name})" in text
    _assert_png(png)
    _, lines = plot_figure(table, records, [], tmp_path / "again.png")
    assert lines == [2, 2]  # two panels (weight, signal), one line per initialisation
    rows = read_csv(tmp_path / "results" / "fig2-test.csv")
    assert len(rows) == 8 and float(rows[0]["measured_mean"]) == pytest.approx(records[0]["measured_mean"])


def test_fig2_config_is_the_issue_spec():
    table = load_table("sfa-fig2")
    depths = [int(table.rows[r].model.depth) for r in table.rows]
    assert max(depths) >= 20 and str(table.compute) == "gradient_ratio"
    assert table.columns.preserving.model.init == "lecun" and table.columns.preserving.algorithm.feedback_init == "kaiming"


# --------------------------------------------------------------------------- fig5: sign flips

def test_sign_flip_fraction_equals_hand_count():
    w1 = torch.nn.Parameter(fixed(3, 4, offset=0.2))     # 12 weights
    w2 = torch.nn.Parameter(fixed(2, 3, offset=1.1))     # 6 weights
    flips = SignFlips([("a.weight", w1), ("b.weight", w2)])
    assert flips.fractions() == {"signs/flipped/a": 0.0, "signs/flipped/b": 0.0, "signs/flipped_all": 0.0}
    with torch.no_grad():
        for i in (0, 5, 7):
            w1.view(-1)[i] *= -2.0                       # three sign flips in a
        w1.view(-1)[3] *= 0.5                            # a smaller weight, same sign: no flip
        w2.view(-1)[4] = -w2.view(-1)[4]                 # one flip in b
    flips.update()
    assert flips.fractions() == pytest.approx({"signs/flipped/a": 3 / 12, "signs/flipped/b": 1 / 6,
                                               "signs/flipped_all": 4 / 18})
    with torch.no_grad():
        w1.view(-1)[0] *= -1.0                           # flips back: still counted (cumulative)
        w1.view(-1)[1] *= -1.0                           # a fourth weight of a
    flips.update()
    assert flips.fractions() == pytest.approx({"signs/flipped/a": 4 / 12, "signs/flipped/b": 1 / 6,
                                               "signs/flipped_all": 5 / 18})
    # the masks survive a checkpoint round trip into a tracker built on other weights
    other = SignFlips([("a.weight", torch.ones(3, 4)), ("b.weight", torch.ones(2, 3))])
    other.load_state_dict(flips.state_dict())
    assert other.fractions() == pytest.approx(flips.fractions())


FIG5 = {
    "id": "fig5-test", "title": "t",
    "metric": {"name": "accuracy", "fields": {"test": "test/acc1", "flipped": "signs/flipped_all"}},
    "figure": [
        {"name": "freeze", "kind": "rows", "x": "algorithm.ei_fraction", "series": ["test", "flipped"]},
        {"name": "flips", "kind": "curves", "key": "signs/flipped_all", "lines": "rows"},
        {"name": "layers", "kind": "curves", "key": "signs/flipped/", "rows": ["never"]},
        {"name": "angles", "kind": "curves", "key": "align/update/"},
    ],
    "columns": {"synth": synth(3)},
    "common": {"model": {"name": "mlp", "depth": 2, "width": 8}, "data": {"batch_size": 16},
               "algorithm": {"name": "usf_init", "optimizer": "sgd", "lr": 0.5, "ei": True},
               "probe": {"every": 1, "sign_flips": True}, "output": {"progress": "none"}},
    "rows": {"at init": {"algorithm": {"ei_fraction": 0.0}}, "never": {"algorithm": {"ei_fraction": 1.0}}},
    "budgets": {"tiny": {"epochs": 1, "seeds": 1}},
}


def test_fig5_flips_stop_when_signs_freeze_and_figures_have_their_lines(tmp_path, monkeypatch):
    _install(tmp_path, monkeypatch, {"fig5-test": FIG5})
    table, cells = expand("fig5-test", "tiny", output_root=str(tmp_path / "runs"))
    run_cells(cells, train)
    assert [c.status for c in cells] == ["finished", "finished"]
    steps = {}
    for cell in cells:
        probe = read_csv(tmp_path / "runs" / config.run_name(cell.cfg) / "probe.csv")
        total = [float(r["signs/flipped_all"]) for r in probe]
        steps[cell.row] = total
        assert all(b >= a for a, b in zip(total, total[1:]))  # cumulative: never decreases
        # the epoch-end value is in metrics.csv and the summary, and it is the last record's
        assert cell.summary["last_epoch"]["signs/flipped_all"] == pytest.approx(total[-1])
    # 'at init' freezes after the first step: the count never moves again (probe 0 is before any step)
    frozen = steps["at init"][1:]
    assert frozen and max(frozen) == min(frozen)
    assert steps["never"][-1] > steps["at init"][-1]  # lr 0.5 on a tiny net: signs flip when free

    md, text = write_table(table, "tiny", cells, out_dir=tmp_path / "results")
    plots = tmp_path / "results" / "plots"
    expected = ["fig5-test-freeze.png", "fig5-test-flips.png", "fig5-test-layers-never.png",
                "fig5-test-angles-at-init.png", "fig5-test-angles-never.png"]
    for name in expected:
        assert f"](plots/{name})" in text
        _assert_png(plots / name)
    spec = {s.name: s for s in table.figure}
    (flips,) = plot_curves(table, cells, tmp_path / "again", spec["flips"])
    assert flips[1] == 2  # one line per row
    (layers,) = plot_curves(table, cells, tmp_path / "again", spec["layers"])
    assert layers[1] == 3  # one line per weight matrix of the 2-hidden-layer MLP
    angles = plot_curves(table, cells, tmp_path / "again", spec["angles"])
    assert [a[1] for a in angles] == [3, 3]  # one PNG per row, one line per layer
    _, lines = plot_figure(table, aggregate(table, cells), cells, tmp_path / "again" / "freeze.png", spec["freeze"])
    assert lines == [1, 1]  # one column: one line per panel
    curves = read_csv(tmp_path / "results" / "fig5-test-curves.csv")
    never = [(int(r["step"]), float(r["value"])) for r in curves if r["png"] == "fig5-test-flips.png" and r["line"] == "never"]
    assert [s for s, _ in never] == sorted({s for s, _ in never})  # one point per step, in order
    assert never[-1][1] == pytest.approx(steps["never"][-1]) and never[0] == (0, 0.0)


@pytest.mark.parametrize("table_id", ["sfa-fig3", "sfa-fig5"])
def test_sfa_trained_figures_compose(table_id):
    table = load_table(table_id)
    for row in table.rows:
        cfg = compose(table_id, row, "mnist", "smoke")
        assert cfg.data.name == "fmnist" and cfg.model.name == "sfa_mnist" and cfg.probe.every == 5
        assert math.isclose(cfg.algorithm.lr, 1e-4)
    if table_id == "sfa-fig5":
        assert sorted(float(table.rows[r].algorithm.ei_fraction) for r in table.rows)[-1] == 1.0
        assert compose(table_id, "0.05", "mnist", "smoke").probe.sign_flips is True


def test_probe_checkpoints_the_sign_flip_masks():
    """A resumed run keeps counting flips against the *initial* signs: the probe's state carries
    the masks, and the tracker built at train start on the resumed weights takes them over."""
    from types import SimpleNamespace

    from bench.callbacks.probe import AlignmentProbe

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    module = SimpleNamespace(model=model, cfg=OmegaConf.create({"probe": {"sign_flips": True}}))
    probe = AlignmentProbe()
    probe.on_train_start(None, module)
    with torch.no_grad():
        model[0].weight.view(-1)[:3] *= -1.0  # 3 of 12 + 8 weights flip
    probe.on_train_batch_end(None, module, None, None, 0)
    state = probe.state_dict()
    assert state["sign_flips"]["names"] == ["0", "1"]

    resumed = AlignmentProbe()
    resumed.load_state_dict(state)
    with torch.no_grad():
        model[0].weight.view(-1)[:3] *= -1.0  # back to the initial signs before the resume
    resumed.on_train_start(None, module)
    assert resumed.sign_flips.fractions() == pytest.approx({"signs/flipped/0": 3 / 12, "signs/flipped/1": 0.0,
                                                            "signs/flipped_all": 3 / 20})
    off = AlignmentProbe()
    off.on_train_start(None, SimpleNamespace(model=model, cfg=OmegaConf.create({"probe": {"sign_flips": False}})))
    assert off.sign_flips is None and "sign_flips" not in off.state_dict()
