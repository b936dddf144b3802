"""The `make perf` harness runs and its ratios are the quotients it claims (no timing asserted:
performance numbers live in `make perf`, never in tests)."""
import pytest

from bench.run import perf


def test_epoch_ratios_rows_are_quotients_of_their_timings(tmp_path):
    rows = {r["benchmark"]: r for r in perf.epoch_ratios(1, tmp_path, limit_batches=8)}
    suite, plain = rows["suite_epoch"], rows["plain_epoch"]
    floor = rows["lightning_floor_epoch (vs plain loop)"]
    # one repeat: each median is that repeat's time, so each ratio is a plain quotient
    assert suite["ratio_to_bp"] == pytest.approx(suite["median_ms"] / plain["median_ms"])
    assert floor["ratio_to_bp"] == pytest.approx(floor["median_ms"] / plain["median_ms"])
    assert rows["suite_over_lightning_floor"]["ratio_to_bp"] == pytest.approx(suite["median_ms"] / floor["median_ms"])
    assert suite["meets_target"] == (suite["ratio_to_bp"] <= 1.2)
    assert 0.0 <= rows["probe_overhead"]["ratio_to_bp"] < 1.0


def test_update_ratios_time_every_rule_against_bp_in_one_process():
    case = ("tiny-mlp", ["model.name=mlp", "model.depth=2", "model.width=16"], [1, 8, 8], {"fa": 1.05, "usf_sn": 1.05})
    rows = perf.update_ratios(repeats=3, batch=4, iters=1, cases=[case])
    assert [r["rule"] for r in rows] == ["bp", "fa", "usf_sn"]
    assert rows[0]["ratio_to_bp"] == 1.0 and all(r["median_ms"] > 0 and r["optimizer_step_ms"] > 0 for r in rows)
    assert [r["meets_target"] == (r["ratio_to_bp"] <= 1.05) for r in rows[1:]] == [True, True]


def test_eprop_benchmark_rows_time_both_settings_against_bp_and_the_defaults():
    # structure only (timings are not asserted on a noisy machine): one row per rule and batch,
    # BP the unit of ratio_to_bp, the defaults the unit of ratio_to_default
    from bench.run.benchmarks import eprop

    rows = eprop.update_rows(repeats=1, batches=(4,))
    assert [r["rule"] for r in rows] == ["bp", eprop.DEFAULTS, eprop.ROW]
    assert rows[0]["ratio_to_bp"] == 1.0 and rows[0]["ratio_to_default"] == ""
    assert rows[1]["ratio_to_default"] == 1.0
    assert all(r["median_ms"] > 0 and r["ratio_to_bp"] > 0 and r["batch"] == 4 for r in rows)


def test_flops_count_the_in_place_products_that_write_updates_into_grad():
    # PEPITA writes ΔW with addmm_ into .grad, which torch's counter leaves out by default. Hand
    # count on a 4-8-3 net, batch 5: first pass 2·5·(4·8 + 8·3); second pass: the first layer by
    # linearity (W1F: 2·4·3·8 for the (3×4)(4×8) product, then 2·5·3·8 for e(W1F)), the modulated
    # input x − eFᵀ that ΔW_1 uses (2·5·3·4), the last layer 2·5·8·3; the updates 2·(8·5·4 + 3·5·8).
    import torch

    module = perf.build_module("pepita", ["model.name=mlp", "model.depth=1", "model.width=8"], [1, 2, 2], num_classes=3)
    x, y = torch.randn(5, 1, 2, 2), torch.randint(0, 3, (5,))
    first = 2 * 5 * (4 * 8 + 8 * 3)
    second = 2 * 3 * 4 * 8 + 2 * 5 * 3 * 8 + 2 * 5 * 3 * 4 + 2 * 5 * 8 * 3
    updates = 2 * (8 * 5 * 4 + 3 * 5 * 8)
    assert perf.flops(module, x, y) == first + second + updates


def test_grape_floor_adds_the_tangent_and_the_draws_to_dfa_per_repeat():
    # fixed timings (DFA 10, tangent 2, draws 1) give exactly 1.3 and 0.1; a floor that left
    # out a part, or divided by the wrong one, gives another number
    from bench.run.benchmarks import grape

    calls = {"dfa": 0, "tangent": 0, "draws": 0}

    def timer(name, seconds):
        def f():
            calls[name] += 1
            return seconds
        return f

    timers = {"dfa": timer("dfa", 10.0), "tangent": timer("tangent", 2.0), "draws": timer("draws", 1.0)}
    floor, draws = grape.floor_ratios(timers, repeats=4)
    assert floor == pytest.approx(1.3) and draws == pytest.approx(0.1)
    assert calls == {"dfa": 5, "tangent": 5, "draws": 5}  # one warm-up, then once per repeat


def test_grape_floor_times_real_parts_on_a_tiny_dfa():
    import torch

    from bench.run.benchmarks import grape

    dfa = perf.build_module("dfa", ["model.name=mlp", "model.depth=2", "model.width=16"], [1, 4, 4])
    x, y = torch.randn(8, 1, 4, 4), torch.randint(0, 10, (8,))
    row = grape.floor_row("tiny", dfa, x, y, repeats=3, width=16)
    assert row["ratio"] > 1.0 and row["batch"] == 8 and row["note"].startswith("the two N(0, I) draws alone")
