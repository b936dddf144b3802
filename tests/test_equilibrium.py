"""Equilibrium propagation (Scellier & Bengio 2017) on tiny nets: Theorem 1 (β → 0 gives the
gradient of the cost at the free fixed point), the free phase's fixed point, one step by hand,
training on a toy problem, the alignment probe's reference gradient and the config errors.

Hand computations use plain torch ops on tensors that do not require grad; the reference
gradient of Theorem 1 is backpropagation through time through a long free phase in float64 (a
converged relaxation, so BPTT equals the implicit gradient at the fixed point).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from bench.algorithms.equilibrium import EquilibriumPropagation
from bench.callbacks.probe import AlignmentProbe
from bench.config import ConfigError, compose
from bench.models import create_model
from bench.run.train import train
from conftest import angle, fixed, load_state, one_run_dir

D_IN, WIDTH, CLASSES = 6, 5, 3


def build(small_cfg, *overrides, d_in=D_IN, width=WIDTH, classes=CLASSES, depth=2, w_scale=0.6, double=False):
    """EP on a d_in → width×depth → classes MLP with fixed weights; β's sign fixed unless overridden."""
    cfg = small_cfg("algorithm.name=eprop", f"data.shape=[{d_in}]", f"data.num_classes={classes}",
                    f"model.depth={depth}", f"model.width={width}", "guard.every=0",
                    "algorithm.random_sign=false", *overrides)
    model = create_model(cfg.model, (d_in,), classes)
    module = EquilibriumPropagation(cfg, model, classes, (d_in,))
    with torch.no_grad():
        for i, lin in enumerate(module.linears):
            lin.weight.copy_(fixed(*lin.weight.shape, scale=w_scale, offset=i))
            lin.bias.copy_(fixed(*lin.bias.shape, scale=0.3, offset=10 + i) + 0.2)
    if double:
        module.double()
    return module


def batch(d_in=D_IN, double=False):
    x = fixed(4, d_in, scale=0.5, offset=0.3) + 0.5  # pixels in [0, 1]
    y = torch.tensor([0, 2, 1, 2])
    return (x.double() if double else x), y


def params(module):
    return [p for lin in module.linears for p in (lin.weight, lin.bias)]


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def residual(module, x, states, beta=0.0, y=None):
    """Box-constrained stationarity ‖s − clip(s − ∂F/∂s, 0, 1)‖∞ (0 exactly at a fixed point)."""
    grads = module.state_grad(x, states, beta, y)
    return max(float((s - torch.clamp(s - g, 0, 1)).abs().max()) for s, g in zip(states, grads))


def test_nudged_minus_free_approaches_the_bp_gradient_as_beta_to_0(small_cfg):
    """Theorem 1: (1/β)(∂E/∂θ(s^β) − ∂E/∂θ(s⁰)) → ∂C(s⁰(θ))/∂θ, with error O(β), either sign of β."""
    module = build(small_cfg, "algorithm.n_free=400", "algorithm.n_nudged=400", double=True)
    x, y = batch(double=True)
    with module.true_gradient():  # the probe's reference: BPTT through the free phase
        bp = flat(torch.autograd.grad(module.loss_fn(module.model(x), y), params(module)))
    assert bp.norm() > 1e-2
    errors = {}
    for beta in (1e-1, 1e-2, 1e-3, -1e-3):
        module.beta = beta
        surrogate, _, _ = module.objective(x, y)
        ep = flat(torch.autograd.grad(surrogate, params(module)))
        errors[beta] = float((ep - bp).norm() / bp.norm())
    assert errors[1e-1] > errors[1e-2] > errors[1e-3]
    assert errors[1e-1] > 0.1  # a finite nudge is biased: the comparison can fail
    assert errors[1e-3] < 1e-2 and errors[-1e-3] < 1e-2
    assert errors[1e-2] / errors[1e-3] == pytest.approx(10, rel=0.3)  # first order in β


def test_free_phase_reaches_a_fixed_point(small_cfg):
    module = build(small_cfg, "algorithm.n_free=300", double=True)
    x, _ = batch(double=True)
    states, energies = module.zero_states(x), []
    with torch.no_grad():
        for _ in range(300):
            states = module.settle(x, states, 1)
            energies.append(module.energy(x, states))
    assert residual(module, x, module.zero_states(x)) > 0.1  # s = 0 is not a fixed point
    assert residual(module, x, states) < 1e-9
    # ∂E/∂s vanishes on every unsaturated unit; saturated ones are held by the box
    grads = module.state_grad(x, states)
    inside = [(s > 0) & (s < 1) for s in states]
    assert all(m.any() for m in inside)
    assert max(float(g[m].abs().max()) for g, m in zip(grads, inside)) < 1e-9
    # the relaxation is a descent on E: the energy never increases
    steps = torch.stack(energies)
    assert (steps[1:] - steps[:-1]).max() <= 1e-12
    assert float(steps[0].mean() - steps[-1].mean()) > 0.1
    # ... and the prediction is that fixed point's output
    assert torch.allclose(module.predict(x), states[-1])


def test_closed_form_step_is_a_projected_gradient_step_on_f(small_cfg):
    """settle's closed-form ∂F/∂s equals torch.func.grad of E + βC, saturated units (0, 1) included."""
    module = build(small_cfg, double=True)
    x, y = batch(double=True)
    states = [torch.clamp(fixed(4, n, scale=0.9, offset=3 + n) + 0.5, 0, 1).double() for n in (WIDTH, WIDTH, CLASSES)]
    assert any(((s == 0) | (s == 1)).any() for s in states) and any(((s > 0) & (s < 1)).any() for s in states)
    target = F.one_hot(y, CLASSES).double()
    for beta in (0.0, 0.7):
        with torch.no_grad():
            stepped = module.settle(x, states, 1, beta, target)
        grads = module.state_grad(x, states, beta, y)
        for s, g, new in zip(states, grads, stepped):
            assert torch.allclose(new, torch.clamp(s - module.epsilon * g, 0, 1), atol=1e-12)


def test_one_step_matches_hand_computation_on_a_2_unit_toy(small_cfg):
    """2 → 2 → 2, one free and one nudged step (ε = 0.5, β = 0.5), ΔW and Δb of the §2 rule by hand."""
    module = build(small_cfg, "algorithm.n_free=1", "algorithm.n_nudged=1", "algorithm.beta=0.5",
                   d_in=2, width=2, classes=2, depth=1, w_scale=0.9)
    W1, b1 = module.linears[0].weight.detach().clone(), module.linears[0].bias.detach().clone()
    W2, b2 = module.linears[1].weight.detach().clone(), module.linears[1].bias.detach().clone()
    x = torch.tensor([[0.2, 0.9], [1.0, 0.4], [0.6, 0.0]])
    y = torch.tensor([1, 0, 1])
    eps, beta, B = 0.5, 0.5, 3
    onehot = F.one_hot(y, 2).float()
    clip = lambda v: torch.clamp(v, 0, 1)  # noqa: E731
    # free step from s = 0 (synchronous: layer 2 sees s1 = 0): s ← clip((1 − ε)s + ε·drive)
    h0, o0 = clip(eps * (x @ W1.T + b1)), clip(eps * b2.expand(B, 2))
    # nudged step from (h0, o0)
    h1 = clip((1 - eps) * h0 + eps * (x @ W1.T + b1 + o0 @ W2))
    o1 = clip((1 - eps) * o0 + eps * (h0 @ W2.T + b2 + beta * (onehot - o0)))
    # .grad = −ΔW = −(1/β)(ρ(s^β_i)ρ(s^β_j) − ρ(s⁰_i)ρ(s⁰_j)), batch mean
    gW1 = -(h1.T @ x - h0.T @ x) / (beta * B)
    gW2 = -(o1.T @ h1 - o0.T @ h0) / (beta * B)
    gb1, gb2 = -(h1 - h0).sum(0) / (beta * B), -(o1 - o0).sum(0) / (beta * B)
    assert gW1.abs().max() > 1e-2 and gW2.abs().max() > 1e-2

    free, nudged, reference = module.phases(x, y, 0.5)
    assert reference is free  # one-sided: the update differences against s⁰
    for got, want in zip([*free, *nudged], [h0, o0, h1, o1]):
        assert torch.allclose(got, want, atol=1e-7)
    surrogate, logits, loss = module.objective(x, y)
    surrogate.backward()
    for p, want in zip(params(module), (gW1, gb1, gW2, gb2)):
        assert torch.allclose(p.grad, want, atol=1e-6)
    assert torch.equal(logits, o0)
    assert loss.item() == pytest.approx(float(0.5 * ((o0 - onehot) ** 2).sum(1).mean()), abs=1e-7)

    # given states (not produced by the dynamics): the update depends on them alone
    s0 = [torch.tensor([[0.3, 1.0]]), torch.tensor([[0.0, 0.5]])]
    sb = [torch.tensor([[0.4, 0.9]]), torch.tensor([[0.25, 0.5]])]
    xg = torch.tensor([[1.0, 0.5]])
    module.phases = lambda *_: (s0, sb, s0)
    module.zero_grad()
    module.objective(xg, torch.tensor([0]))[0].backward()
    # ΔW_2 = (1/β)(s^β_2 s^β_1ᵀ − s⁰_2 s⁰_1ᵀ) = 2·([[.1, .225], [.2, .45]] − [[0, 0], [.15, .5]])
    assert torch.allclose(module.linears[1].weight.grad, -torch.tensor([[0.2, 0.45], [0.1, -0.1]]), atol=1e-6)
    # ΔW_1 = (1/β)(s^β_1 − s⁰_1) xᵀ = 2·[[.1], [−.1]]·[1, .5]
    assert torch.allclose(module.linears[0].weight.grad, -torch.tensor([[0.2, 0.1], [-0.2, -0.1]]), atol=1e-6)
    assert torch.allclose(module.linears[1].bias.grad, -torch.tensor([0.5, 0.0]), atol=1e-6)


def test_symmetric_nudging_by_hand_and_its_smaller_bias(small_cfg):
    """Laborieux et al. 2021 Eq. 7: .grad = −(1/2β)(ρ(s^β)ρ(s^β)ᵀ − ρ(s^−β)ρ(s^−β)ᵀ); its error against
    the BPTT gradient is second order in β where the one-sided one is first order."""
    module = build(small_cfg, "algorithm.n_free=1", "algorithm.n_nudged=1", "algorithm.beta=0.5",
                   "algorithm.nudging=symmetric", d_in=2, width=2, classes=2, depth=1, w_scale=0.9)
    W1, b1 = module.linears[0].weight.detach().clone(), module.linears[0].bias.detach().clone()
    W2, b2 = module.linears[1].weight.detach().clone(), module.linears[1].bias.detach().clone()
    x, y, eps, beta = torch.tensor([[0.2, 0.9], [1.0, 0.4]]), torch.tensor([1, 0]), 0.5, 0.5
    onehot, clip = F.one_hot(y, 2).float(), (lambda v: torch.clamp(v, 0, 1))
    h0, o0 = clip(eps * (x @ W1.T + b1)), clip(eps * b2.expand(2, 2))
    nudge = {sign: (clip((1 - eps) * h0 + eps * (x @ W1.T + b1 + o0 @ W2)),
                    clip((1 - eps) * o0 + eps * (h0 @ W2.T + b2 + sign * beta * (onehot - o0)))) for sign in (1, -1)}
    (hp, op), (hm, om) = nudge[1], nudge[-1]
    assert not torch.allclose(op, om)
    want = {"W2": -(op.T @ hp - om.T @ hm) / (2 * beta * 2), "W1": -((hp - hm).T @ x) / (2 * beta * 2)}
    module.objective(x, y)[0].backward()
    assert torch.allclose(module.linears[1].weight.grad, want["W2"], atol=1e-6)
    assert torch.allclose(module.linears[0].weight.grad, want["W1"], atol=1e-6)

    def error(nudging, beta):
        m = build(small_cfg, "algorithm.n_free=400", "algorithm.n_nudged=400", f"algorithm.beta={beta}",
                  f"algorithm.nudging={nudging}", double=True)
        xb, yb = batch(double=True)
        with m.true_gradient():
            bp = flat(torch.autograd.grad(m.loss_fn(m.model(xb), yb), params(m)))
        ep = flat(torch.autograd.grad(m.objective(xb, yb)[0], params(m)))
        return float((ep - bp).norm() / bp.norm())

    # Small β: at β ≥ 0.1 the anti-nudge −β(y − s_L) can carry this toy net into another basin
    # (relative error 2.3 at β = 0.1), so the orders are read where both phases stay near s⁰.
    one, sym = [error("one_sided", b) for b in (0.02, 0.01)], [error("symmetric", b) for b in (0.02, 0.01)]
    assert one[0] / one[1] == pytest.approx(2, rel=0.25)   # O(β)
    assert sym[0] / sym[1] == pytest.approx(4, rel=0.25)   # O(β²)
    assert sym[0] < one[0] / 5


def test_feedforward_start_is_the_clipped_forward_pass_and_settles_to_the_same_point(small_cfg):
    module = build(small_cfg, "algorithm.free_init=feedforward", "algorithm.n_free=300", double=True)
    x, _ = batch(double=True)
    W, b = [lin.weight.detach() for lin in module.linears], [lin.bias.detach() for lin in module.linears]
    h1 = torch.clamp(x @ W[0].T + b[0], 0, 1)
    h2 = torch.clamp(h1 @ W[1].T + b[1], 0, 1)
    start = module.feedforward_states(x)
    assert torch.allclose(start[0], h1) and torch.allclose(start[1], h2)
    assert torch.allclose(start[2], torch.clamp(h2 @ W[2].T + b[2], 0, 1))
    # closer to the fixed point than s = 0, and relaxing from it reaches the zero start's fixed point
    assert residual(module, x, start) < residual(module, x, module.zero_states(x))
    with torch.no_grad():
        from_zero = module.settle(x, module.zero_states(x), 300)
    for got, want in zip(module.free_phase(x), from_zero):
        assert torch.allclose(got, want, atol=1e-8)


def test_random_sign_draws_both_signs(small_cfg):
    module = build(small_cfg, "algorithm.random_sign=true", "algorithm.beta=0.3")
    draws = [module.ep_beta() for _ in range(40)]
    assert set(draws) == {0.3, -0.3}
    # the stream is the run's own (seeded from cfg.seed), not the global RNG, and resumes from its state
    again = build(small_cfg, "algorithm.random_sign=true", "algorithm.beta=0.3")
    torch.manual_seed(123)
    assert [again.ep_beta() for _ in range(40)] == draws
    state = again.sign_stream.state()
    ahead = [again.ep_beta() for _ in range(10)]
    resumed = build(small_cfg, "algorithm.random_sign=true", "algorithm.beta=0.3")
    resumed.on_load_checkpoint({"eprop_sign_generator": state})
    assert [resumed.ep_beta() for _ in range(10)] == ahead


def test_probe_reference_is_bptt_and_ep_aligns_with_it(small_cfg):
    """The probe's BP gradient is ∂C/∂θ through the free phase; at small β EP's update is ~parallel."""
    module = build(small_cfg, "algorithm.n_free=200", "algorithm.n_nudged=200", "algorithm.beta=0.001",
                   "probe.signals=true")
    x, y = batch()
    surrogate, _, _ = module.probed_objective(x, y)
    surrogate.backward()
    rule = {n: p.grad.clone() for n, p in module.model.named_parameters()}
    values = AlignmentProbe().measure(SimpleNamespace(world_size=1), module)
    # independent reference: unroll the same dynamics by hand with autograd
    W = [lin.weight for lin in module.linears]
    b = [lin.bias for lin in module.linears]
    s = [torch.zeros(4, WIDTH), torch.zeros(4, WIDTH), torch.zeros(4, CLASSES)]
    for _ in range(200):
        d = [x @ W[0].T + b[0] + s[1] @ W[1], s[0] @ W[1].T + b[1] + s[2] @ W[2], s[1] @ W[2].T + b[2]]
        s = [torch.clamp(0.5 * si + 0.5 * di, 0, 1) for si, di in zip(s, d)]
    cost = 0.5 * ((s[2] - F.one_hot(y, CLASSES).float()) ** 2).sum(1).mean()
    bp = torch.autograd.grad(cost, W)
    names = ["net.1", "net.3", "net.5"]
    assert sorted(k for k in values if k.startswith("align/update/")) == [f"align/update/{n}" for n in names]
    assert not any(k.startswith("align/signal") for k in values)  # no feed-forward points in a settled net
    for n, g_bp in zip(names, bp):
        assert values[f"align/update/{n}"] == pytest.approx(angle(rule[f"{n}.weight"], g_bp), abs=1e-3)
        assert values[f"align/update/{n}"] < 2.0
    # the probe restored the feed-forward module and left the update untouched
    assert "forward" not in vars(module.model)
    for n, p in module.model.named_parameters():
        assert torch.equal(p.grad, rule[n])


def test_eprop_trains_a_toy_problem(small_cfg, tmp_path):
    """Loss and test error fall on a 3-class synthetic problem (inputs clipped to [0, 1] by ρ)."""
    common = ["algorithm.name=eprop", "model.depth=1", "model.width=32", "data.n_train=432",
              "trainer.max_steps=-1", "trainer.epochs=5", "algorithm.n_free=30", "algorithm.n_nudged=6",
              "algorithm.lr=0.01", "model.init=xavier"]
    start = train(small_cfg(*common, "algorithm.lr=0.0", f"output.root={tmp_path / 'frozen'}"))
    trained = train(small_cfg(*common, f"output.root={tmp_path / 'trained'}"))
    assert start["status"] == trained["status"] == "finished"
    before, after = start["final"]["final_train/loss"], trained["final"]["final_train/loss"]
    assert after < 0.7 * before, (before, after)
    assert trained["final"]["test/err1"] < 25.0 < start["final"]["test/err1"], (start["final"], trained["final"])
    w0 = load_state(one_run_dir(tmp_path / "frozen"))["model.net.1.weight"]
    w1 = load_state(one_run_dir(tmp_path / "trained"))["model.net.1.weight"]
    assert (w1 - w0).abs().max() > 1e-3  # the hidden layer learned, not only the output


def test_non_mlp_model_fails_with_one_line():
    cfg = compose(overrides=["algorithm.name=eprop", "model.name=cnn", "data.name=synthetic"])
    model = create_model(cfg.model, (1, 28, 28), 10)
    with pytest.raises(ConfigError, match="model 'cnn' is not supported") as exc:
        EquilibriumPropagation(cfg, model, 10, (1, 28, 28))
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("overrides, message", [
    (["model.batchnorm=true"], "BatchNorm1d"),
    (["model.dropout=0.2"], "Dropout"),
    (["algorithm.beta=0.0"], "beta"),
    (["algorithm.epsilon=1.5"], "epsilon"),
    (["algorithm.n_free=0"], "n_free"),
])
def test_bad_configs_fail_with_one_line(small_cfg, overrides, message):
    """Bad options fail when the config is composed (before any model exists); models the rule
    cannot read fail when the rule is built. Either way: one line."""
    with pytest.raises(ConfigError, match=message) as exc:
        cfg = small_cfg("algorithm.name=eprop", "data.shape=[1,6,6]", *overrides)
        model = create_model(cfg.model, (1, 6, 6), 3)
        EquilibriumPropagation(cfg, model, 3, (1, 6, 6))
    assert "\n" not in str(exc.value)

