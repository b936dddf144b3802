"""Target family (rec-LRA, LRA-E) against hand computations of Algorithm 1 on tiny nets.

The hand computations use plain torch ops on tensors that do not require grad, never autograd,
and an error wiring written out per case, so they are independent of the code under test.
"""
from __future__ import annotations

import statistics
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from bench.algorithms.rlra import LRAE, RecursiveLRA
from bench.callbacks.probe import AlignmentProbe
from bench.config import compose
from bench.models import create_model
from bench.results.io import read_csv
from bench.run.train import train
from conftest import angle, fixed, load_state, one_run_dir, tanh_mlp_backprop

RULE_CLASSES = {"rlra": RecursiveLRA, "lra_e": LRAE}
D_IN, WIDTH, CLASSES = 6, 5, 3


def batch():
    x = fixed(4, D_IN, scale=1.0, offset=0.3)
    y = torch.tensor([0, 2, 1, 2])
    return x, y


def build(small_cfg, rule, depth, *overrides):
    """A rule on a D_IN → WIDTH×depth → CLASSES MLP with fixed forward and error weights."""
    cfg = small_cfg(f"algorithm.name={rule}", f"data.shape=[{D_IN}]", f"data.num_classes={CLASSES}",
                    f"model.depth={depth}", f"model.width={WIDTH}", "guard.every=0", *overrides)
    torch.manual_seed(0)
    model = create_model(cfg.model, (D_IN,), CLASSES)
    module = RULE_CLASSES[rule](cfg, model, CLASSES, (D_IN,))
    linears = [m for m in module.model.net if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for i, lin in enumerate(linears):
            lin.weight.copy_(fixed(*lin.weight.shape, scale=0.8, offset=i))
            lin.bias.copy_(fixed(*lin.bias.shape, scale=0.2, offset=10 + i))
        for k, (key, E) in enumerate(sorted(module.error_synapses.items())):
            E.copy_(fixed(*E.shape, scale=0.7, offset=20 + k))
    return module, linears


def act_fn(name):
    return {"tanh": torch.tanh, "sign": torch.sign}[name]


def hand_step(linears, E, wiring, x, y, *, act="tanh", beta, gamma, alphas, kappa, rule="displacement",
              space="activity"):
    """Algorithm 1 written out: returns targets, errors, displacements, ΔW, Δb and ΔE (batch means).

    ``wiring`` = {i: j} for d_i = E_{j→i} e_j; ``alphas`` = {i: α_e} of the hidden error units.
    """
    phi = act_fn(act)
    with torch.no_grad():
        W = [l.weight.detach().clone() for l in linears]
        b = [l.bias.detach().clone() for l in linears]
        L, B = len(W), x.shape[0]
        z, h = {0: x}, {}
        for l in range(1, L + 1):
            h[l] = z[l - 1] @ W[l - 1].T + b[l - 1]
            z[l] = phi(h[l]) if l < L else torch.softmax(h[l], 1)
        targets = {L: F.one_hot(y, CLASSES).float()}
        errors = {L: z[L] - targets[L]}
        d = {}
        for l in range(L - 1, 0, -1):
            j = wiring[l]
            d[l] = errors[j] @ E[(j, l)].T
            if space == "preactivation":  # the error unit compares pre-activations: h − (h − βd)
                targets[l] = h[l] - beta * d[l]
                diff = h[l] - targets[l]
            else:
                targets[l] = phi(h[l] - beta * d[l])
                diff = z[l] - targets[l]
            a = alphas[l]
            errors[l] = a * diff + (1 - a) * torch.sign(diff)
        dW = {l: kappa[l - 1] * errors[l].T @ z[l - 1] / B for l in range(1, L + 1)}
        db = {l: kappa[l - 1] * errors[l].sum(0) / B for l in range(1, L + 1)}
        if rule == "displacement":  # Eq. 6: ΔE_{j→i} = −γ d_i e_jᵀ
            dE = {(j, i): -gamma * d[i].T @ errors[j] / B for i, j in wiring.items()}
        else:  # appendix / LRA-E: ΔE_{j→i} = γ z_i e_jᵀ
            dE = {(j, i): gamma * z[i].T @ errors[j] / B for i, j in wiring.items()}
    return dict(z=z, h=h, targets=targets, errors=errors, d=d, dW=dW, db=db, dE=dE)


# (id, rule, depth, overrides, wiring {i: j}, alpha per hidden layer, kappa, activation, E rule)
CASES = [
    ("rlra-3layer-g2", "rlra", 2, [], {2: 3, 1: 2}, {2: 1.0, 1: 1.0}, [1, 1, 1], "tanh", "displacement"),
    # g = 1: every ℓ mod 1 = 0, so Algorithm 1 wires every layer straight from the output
    ("rlra-3layer-g1", "rlra", 2, ["algorithm.skip_gap=1"], {2: 3, 1: 3}, {2: 1.0, 1: 1.0}, [1, 1, 1], "tanh",
     "displacement"),
    # depth 3, g = 2: E_{4→3} pairwise, E_{4→2} skip, E_{2→1} pairwise; elastic units and κ
    ("rlra-4layer-elastic-kappa", "rlra", 3,
     ["algorithm.alpha_depth1=0.19", "algorithm.alpha_depth2=0.24", "algorithm.kappa=[0.5,1.5,2.0,0.75]"],
     {3: 4, 2: 4, 1: 2}, {3: 0.24, 2: 0.19, 1: 0.24}, [0.5, 1.5, 2.0, 0.75], "tanh", "displacement"),
    # sign units with a large β so targets flip: the update must carry no φ′ (nor its STE)
    ("rlra-sign", "rlra", 2, ["model.activation=sign", "algorithm.beta=3.0"], {2: 3, 1: 2}, {2: 1.0, 1: 1.0},
     [1, 1, 1], "sign", "displacement"),
    # the other reading of Eq. 3–4 for sign units: error units on pre-activations, e = βd everywhere
    ("rlra-sign-preactivation", "rlra", 2, ["model.activation=sign", "algorithm.beta=3.0",
                                            "algorithm.target_space=preactivation"], {2: 3, 1: 2}, {2: 1.0, 1: 1.0},
     [1, 1, 1], "sign", "displacement"),
    ("rlra-state-rule", "rlra", 2, ["algorithm.error_update=state"], {2: 3, 1: 2}, {2: 1.0, 1: 1.0}, [1, 1, 1],
     "tanh", "state"),
    # state rule with κ: the pairwise ΔE_{ℓ+1→ℓ} = γ z_ℓᵀ e_{ℓ+1} must not pick up κ_{ℓ+1} from ΔW_{ℓ+1}
    ("rlra-state-kappa", "rlra", 2, ["algorithm.error_update=state", "algorithm.kappa=[0.5,2.0,1.5]"], {2: 3, 1: 2},
     {2: 1.0, 1: 1.0}, [0.5, 2.0, 1.5], "tanh", "state"),
    # LRA-E: pairwise synapses only, ΔE = γ z_i e_jᵀ with its defaults β = 0.1, γ = 1
    ("lra_e-4layer", "lra_e", 3, [], {3: 4, 2: 3, 1: 2}, {3: 1.0, 2: 1.0, 1: 1.0}, [1, 1, 1, 1], "tanh", "state"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_one_step_matches_algorithm_1_by_hand(small_cfg, case):
    _, rule, depth, overrides, wiring, alphas, kappa, act, e_rule = case
    module, linears = build(small_cfg, rule, depth, *overrides)
    a = module.cfg.algorithm
    assert sorted(module.error_synapses) == sorted(f"{j}_to_{i}" for i, j in wiring.items())
    E = {(j, i): module.error_synapses[f"{j}_to_{i}"].detach().clone() for i, j in wiring.items()}
    x, y = batch()
    hand = hand_step(linears, E, wiring, x, y, act=act, beta=float(a.beta), gamma=float(a.error_gamma),
                     alphas=alphas, kappa=kappa, rule=e_rule,
                     space="preactivation" if "algorithm.target_space=preactivation" in overrides else "activity")
    L = depth + 1

    layers = module.forward_layers(x)
    errors, targets, displacements, _ = module.error_units(layers, y)
    for l in range(1, L):
        assert torch.allclose(targets[l], hand["targets"][l], atol=1e-6), f"target y_{l}"
        assert torch.allclose(displacements[l], hand["d"][l], atol=1e-6), f"displacement d_{l}"
        assert torch.allclose(errors[l], hand["errors"][l], atol=1e-6), f"error unit e_{l}"
        assert hand["errors"][l].abs().max() > 1e-4, f"e_{l} is zero: the case tests nothing"
    assert torch.allclose(errors[L], hand["errors"][L], atol=1e-6)

    surrogate, logits, loss = module.objective(x, y)
    surrogate.backward()
    assert torch.allclose(logits, hand["h"][L], atol=1e-6)
    assert loss.item() == pytest.approx(F.cross_entropy(hand["h"][L], y).item(), abs=1e-6)
    for l, lin in enumerate(linears, start=1):
        assert torch.allclose(lin.weight.grad, hand["dW"][l], atol=1e-6), f"ΔW_{l}"
        assert torch.allclose(lin.bias.grad, hand["db"][l], atol=1e-6), f"Δb_{l}"
    for (j, i), dE in hand["dE"].items():
        assert torch.allclose(module.error_synapses[f"{j}_to_{i}"].grad, dE, atol=1e-6), f"ΔE_{j}→{i}"
        assert dE.abs().max() > 1e-5

    # the output layer's update is backprop's: e_L = B·∂CE/∂h_L
    with torch.no_grad():
        bp_out = (torch.softmax(hand["h"][L], 1) - F.one_hot(y, CLASSES).float()).T @ hand["z"][L - 1] / x.shape[0]
    assert torch.allclose(linears[-1].weight.grad, kappa[-1] * bp_out, atol=1e-6)
    if act == "sign":
        # the straight-through φ′ = 1{|h| ≤ 1} would have masked some of e_1: no φ′ entered ΔW_1
        masked = (hand["errors"][1] * (hand["h"][1].abs() <= 1)).T @ x / x.shape[0]
        assert (hand["dW"][1] - masked).abs().max() > 1e-3


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("rlra-3layer-g2", "rlra-state-kappa")], ids=lambda c: c[0])
def test_compiled_closed_form_step_matches_algorithm_1_by_hand(small_cfg, case):
    """``algorithm.compile=true`` runs the same closed form through torch.compile: same numbers."""
    _, rule, depth, overrides, wiring, alphas, kappa, act, e_rule = case
    module, linears = build(small_cfg, rule, depth, *overrides, "algorithm.compile=true")
    assert module.closed_form and module.compile_update
    a = module.cfg.algorithm
    E = {(j, i): module.error_synapses[f"{j}_to_{i}"].detach().clone() for i, j in wiring.items()}
    x, y = batch()
    hand = hand_step(linears, E, wiring, x, y, act=act, beta=float(a.beta), gamma=float(a.error_gamma),
                     alphas=alphas, kappa=kappa, rule=e_rule)
    for _ in range(2):  # the second step runs the cached compiled graph
        for p in module.parameters():
            p.grad = None
        surrogate, logits, _ = module.objective(x, y)
        surrogate.backward()
        assert "_compiled_updates" in module.__dict__
        assert torch.allclose(logits, hand["h"][depth + 1], atol=1e-5)
        for l, lin in enumerate(linears, start=1):
            assert torch.allclose(lin.weight.grad, hand["dW"][l], atol=1e-5), f"ΔW_{l}"
            assert torch.allclose(lin.bias.grad, hand["db"][l], atol=1e-5), f"Δb_{l}"
        for (j, i), dE in hand["dE"].items():
            assert torch.allclose(module.error_synapses[f"{j}_to_{i}"].grad, dE, atol=1e-5), f"ΔE_{j}→{i}"


def test_closed_form_updates_reach_grad_the_same_by_either_path(small_cfg, monkeypatch):
    """Without DDP or a loss scaler the updates are assigned to ``.grad`` directly; that path must
    equal the autograd-node path (bench.feedback.deliver._Deliver) value for value, leave every ``.grad`` in its
    parameter's layout (the fused optimizers read it so), and add into a ``.grad`` already there."""
    _, rule, depth, overrides, *_ = next(c for c in CASES if c[0] == "rlra-state-kappa")
    module, _ = build(small_cfg, rule, depth, *overrides)
    x, y = batch()
    grads, params, _, _ = module._closed_form_updates(x, y)
    # the case exercises the layout copy: ΔE of the shared state rule and the narrow-first
    # products come out as transposed views
    assert any(g.stride() != p.stride() for g, p in zip(grads, params))

    def step():
        surrogate, _, _ = module.objective(x, y)
        surrogate.backward()
        return [p.grad.clone() for p in params]

    for p in params:
        p.grad = None
    direct = step()
    assert all(p.grad.stride() == p.stride() for p in params)
    twice = step()  # no zero_grad: accumulates like autograd would
    for p in params:
        p.grad = None
    monkeypatch.setattr("bench.feedback.deliver.backward_is_watched", lambda trainer: True)
    through_autograd = step()
    for d, t, a, g in zip(direct, twice, through_autograd, grads):
        assert torch.equal(d, g) and torch.equal(a, g)
        assert torch.allclose(t, 2 * g, atol=1e-7)


def test_compile_is_refused_where_there_is_no_closed_form(small_cfg):
    cfg = compose(overrides=["algorithm.name=rlra", "algorithm.compile=true", "model.name=cnn", "model.channels=[2,3]",
                             "model.kernel=3", "data.name=synthetic", "data.shape=[1,8,8]", "data.num_classes=3"])
    model = create_model(cfg.model, (1, 8, 8), 3)
    with pytest.raises(ValueError, match="algorithm.compile applies to the closed-form update"):
        RecursiveLRA(cfg, model, 3, (1, 8, 8))


def test_elastic_units_differ_from_plain(small_cfg):
    """The elastic case is a real test: with α_e = 1 the same net gives different error units."""
    case = CASES[2]
    plain, _ = build(small_cfg, "rlra", 3)
    elastic, _ = build(small_cfg, "rlra", 3, *case[3])
    x, y = batch()
    e_plain = plain.error_units(plain.forward_layers(x), y)[0]
    e_elastic = elastic.error_units(elastic.forward_layers(x), y)[0]
    for l in (1, 2, 3):
        assert (e_plain[l] - e_elastic[l]).abs().max() > 1e-2


def patched_training_step(module, x, y, lr=1.0):
    """Run the real ``training_step`` without a Trainer: SGD(lr) over every module parameter."""
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=lr)
    module.optimizers = lambda: opt
    module.manual_backward = lambda s: s.backward()
    module.training_step((x, y), 0)


@pytest.mark.parametrize("elastic", [False, True], ids=["plain", "elastic"])
def test_reprojection_at_norm_c_clips_every_update_tensor(small_cfg, elastic):
    extra = ["algorithm.alpha_depth1=0.19", "algorithm.alpha_depth2=0.24"] if elastic else []
    alphas = {3: 0.24, 2: 0.19, 1: 0.24} if elastic else {3: 1.0, 2: 1.0, 1: 1.0}
    wiring = {3: 4, 2: 4, 1: 2}
    probe, linears = build(small_cfg, "rlra", 3, *extra)
    E = {(j, i): probe.error_synapses[f"{j}_to_{i}"].detach().clone() for i, j in wiring.items()}
    x, y = batch()
    a = probe.cfg.algorithm
    hand = hand_step(linears, E, wiring, x, y, beta=float(a.beta), gamma=float(a.error_gamma), alphas=alphas,
                     kappa=[1, 1, 1, 1])
    deltas = {**{f"W{l}": hand["dW"][l] for l in hand["dW"]}, **{f"b{l}": hand["db"][l] for l in hand["db"]},
              **{f"E{j}{i}": v for (j, i), v in hand["dE"].items()}}
    norms = sorted(float(v.norm()) for v in deltas.values())
    c = norms[len(norms) // 2]  # half the update tensors lie above c, half below

    module, linears = build(small_cfg, "rlra", 3, *extra, f"algorithm.max_grad_norm={c}")
    before_W = [l.weight.detach().clone() for l in linears]
    before_E = {k: v.detach().clone() for k, v in module.error_synapses.items()}
    patched_training_step(module, x, y, lr=1.0)

    def nm(delta):  # Nm(Δ, c) of the appendix, by hand
        n = float(delta.norm())
        return delta * (c / n) if n >= c else delta

    clipped = 0
    for l, lin in enumerate(linears, start=1):
        expected = before_W[l - 1] - nm(hand["dW"][l])
        assert torch.allclose(lin.weight.detach(), expected, atol=1e-6), f"W_{l}"
        clipped += float(hand["dW"][l].norm()) > c
    for (j, i), dE in hand["dE"].items():
        key = f"{j}_to_{i}"
        # θ ← θ − λ·Nm(ΔE): with ΔE = −γ d eᵀ the error synapse moves along +γ d eᵀ
        expected = before_E[key] - nm(dE)
        assert torch.allclose(module.error_synapses[key].detach(), expected, atol=1e-6), f"E_{j}→{i}"
        clipped += float(dE.norm()) > c
    assert 0 < clipped < len(linears) + len(hand["dE"])  # both branches of Nm were exercised


def test_sign_mlp_loss_decreases_over_50_steps(small_cfg, tmp_path):
    """No φ′: a sign-activation MLP under rec-LRA lowers the loss over 50 steps (synthetic blobs)."""
    common = ["algorithm.name=rlra", "model.activation=sign", "model.depth=2", "model.width=32",
              "data.n_train=832", "trainer.max_steps=50", "algorithm.lr=0.01"]
    start = train(small_cfg(*common, "algorithm.lr=0.0", f"output.root={tmp_path / 'frozen'}"))
    trained = train(small_cfg(*common, f"output.root={tmp_path / 'trained'}"))
    assert start["status"] == trained["status"] == "finished"
    assert trained["last_epoch"]["step"] == 50
    before, after = start["final"]["final_train/loss"], trained["final"]["final_train/loss"]
    assert after < 0.8 * before, (before, after)
    # the hidden sign layers learned too, not only the output layer
    w0 = load_state(one_run_dir(tmp_path / "frozen"))["model.net.3.weight"]
    w1 = load_state(one_run_dir(tmp_path / "trained"))["model.net.3.weight"]
    assert (w1 - w0).abs().max() > 1e-3


def test_probe_reports_update_and_signal_angles_for_rlra(small_cfg):
    module, linears = build(small_cfg, "rlra", 2, "probe.signals=true")
    x, y = batch()
    surrogate, _, _ = module.probed_objective(x, y)
    surrogate.backward()
    rule_grads = {n: p.grad.clone() for n, p in module.model.named_parameters()}
    values = AlignmentProbe().measure(SimpleNamespace(world_size=1), module)

    hand = hand_step(linears, {(j, i): module.error_synapses[f"{j}_to_{i}"].detach() for i, j in {2: 3, 1: 2}.items()},
                     {2: 3, 1: 2}, x, y, beta=float(module.cfg.algorithm.beta),
                     gamma=float(module.cfg.algorithm.error_gamma), alphas={1: 1.0, 2: 1.0}, kappa=[1, 1, 1])
    with torch.no_grad():  # backprop by hand: δ_L = (softmax − onehot)/B, δ_ℓ = (δ_{ℓ+1} W_{ℓ+1}) ⊙ (1 − z_ℓ²)
        z, W, B = hand["z"], [l.weight.detach() for l in linears], x.shape[0]
        bp, gz = tanh_mlp_backprop(z, W, (z[3] - F.one_hot(y, CLASSES).float()) / B)
    names = {1: "net.1", 2: "net.3", 3: "net.5"}
    assert sorted(k for k in values if k.startswith("align/update/")) == sorted(f"align/update/{n}" for n in names.values())
    for l, n in names.items():
        assert torch.allclose(rule_grads[f"{n}.weight"], hand["dW"][l], atol=1e-6)
        assert values[f"align/update/{n}"] == pytest.approx(angle(hand["dW"][l], bp[l]), abs=1e-4)
        assert values[f"align/ratio/{n}"] == pytest.approx(float(hand["dW"][l].norm() / bp[l].norm()), rel=1e-5)
    assert values["align/update/net.5"] < 1e-3  # the output layer's update is backprop's
    assert values["align/update/net.1"] > 1.0 and values["align/update/net.3"] > 1.0
    # teaching signal: the error unit e_ℓ against backprop's ∂L/∂z_ℓ, per sample (Launay Eq. 6)
    for point, l, g_bp in (("net.2", 1, gz[1]), ("net.4", 2, gz[2])):
        per_sample = [angle(a, b) for a, b in zip(hand["errors"][l], g_bp)]
        assert values[f"align/signal/{point}"] == pytest.approx(statistics.fmean(per_sample), abs=1e-4)
        assert values[f"align/signal_std/{point}"] == pytest.approx(statistics.stdev(per_sample), abs=1e-4)
    # the probe left the rule's update untouched
    for n, p in module.model.named_parameters():
        assert torch.equal(p.grad, rule_grads[n])


def test_probe_in_a_training_run_reports_every_layer(small_cfg, tmp_path):
    summary = train(small_cfg("algorithm.name=rlra", "probe.every=1", "trainer.max_steps=2"))
    assert summary["status"] == "finished"
    rows = read_csv(one_run_dir(tmp_path / "runs") / "probe.csv")
    assert [int(float(r["step"])) for r in rows] == [0, 1]
    for r in rows:
        updates = {k: float(v) for k, v in r.items() if k.startswith("align/update/") and v != ""}
        assert sorted(updates) == ["align/update/net.1", "align/update/net.3", "align/update/net.5"]
        assert updates["align/update/net.5"] < 1e-3
        assert all(0.0 <= v <= 180.0 for v in updates.values())
        assert {k for k in r if k.startswith("align/signal/")} == {"align/signal/net.2", "align/signal/net.4"}


def test_error_synapses_are_optimizer_parameters_and_memory(small_cfg):
    module, _ = build(small_cfg, "rlra", 3)
    opt = module.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    stepped = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in stepped for p in module.error_synapses.values())
    # E_{4→3}: 5×3, E_{4→2}: 5×3, E_{2→1}: 5×5
    assert module.error_synapse_floats() == 15 + 15 + 25
    with pytest.raises(ValueError, match="kappa"):
        build(small_cfg, "rlra", 2, "algorithm.kappa=[1.0]")
    with pytest.raises(ValueError, match="valid choices: unit, gaussian"):
        build(small_cfg, "rlra", 2, "algorithm.error_init=orthogonal")
    # unit-Gaussian error synapses (the paper's ResNets): N(0, 1), whatever error_sigma says
    unit = RecursiveLRA(small_cfg("algorithm.name=rlra", "model.width=64", "algorithm.error_init=unit"),
                        create_model(small_cfg("model.width=64").model, (12,), 3), 3, (12,))
    big = unit.error_synapses["2_to_1"]
    assert big.shape == (64, 64) and 0.9 < float(big.std()) < 1.1
    sigma = RecursiveLRA(small_cfg("algorithm.name=rlra", "model.width=64", "algorithm.error_sigma=0.05"),
                         create_model(small_cfg("model.width=64").model, (12,), 3), 3, (12,))
    assert 0.045 < float(sigma.error_synapses["2_to_1"].std()) < 0.055  # σ-Gaussian (the MLP protocol)


# ---------------------------------------------------------------- Algorithm 2: general wiring
def test_recursion_depth_wiring_and_levels(small_cfg):
    """D = 3, g = 2 on 7 hidden layers: level 1 at ℓ mod 4 = 0 (from the output), level 2 at
    ℓ mod 2 = 0 (from the nearest level-1 layer above), level 3 pairwise; D = 1: all from L."""
    module, _ = build(small_cfg, "rlra", 7, "algorithm.recursion_depth=3")
    assert module.source == {7: 8, 6: 8, 5: 6, 4: 8, 3: 4, 2: 4, 1: 2}
    assert module.level == {7: 3, 6: 2, 5: 3, 4: 1, 3: 3, 2: 2, 1: 3}
    flat, _ = build(small_cfg, "rlra", 3, "algorithm.recursion_depth=1", "algorithm.skip_gap=3")
    assert flat.source == {1: 4, 2: 4, 3: 4} and set(flat.level.values()) == {1}
    pairwise, _ = build(small_cfg, "lra_e", 3)
    assert pairwise.source == {1: 2, 2: 3, 3: 4}
    with pytest.raises(ValueError, match="unknown key algorithm.recursion_depth"):  # LRA-E has no recursion
        build(small_cfg, "lra_e", 3, "algorithm.recursion_depth=3")
    with pytest.raises(ValueError, match="recursion_depth"):
        build(small_cfg, "rlra", 2, "algorithm.recursion_depth=0")
    with pytest.raises(ValueError, match="valid choices: conv, lowrank, dense"):
        build(small_cfg, "rlra", 2, "algorithm.map_synapse=full")


def test_depth3_elastic_step_matches_algorithm_2_by_hand(small_cfg):
    """Depth-3 wiring on 4 hidden layers ({4: 5, 3: 4, 2: 4, 1: 2}), elastic units per level."""
    wiring, alphas = {4: 5, 3: 4, 2: 4, 1: 2}, {4: 0.19, 3: 0.24, 2: 0.24, 1: 0.24}
    module, linears = build(small_cfg, "rlra", 4, "algorithm.recursion_depth=3", "algorithm.alpha_depth1=0.19",
                            "algorithm.alpha_depth2=0.24")
    assert module.source == wiring
    E = {(j, i): module.error_synapses[f"{j}_to_{i}"].detach().clone() for i, j in wiring.items()}
    x, y = batch()
    a = module.cfg.algorithm
    hand = hand_step(linears, E, wiring, x, y, beta=float(a.beta), gamma=float(a.error_gamma), alphas=alphas,
                     kappa=[1] * 5)
    surrogate, _, _ = module.objective(x, y)
    surrogate.backward()
    for l, lin in enumerate(linears, start=1):
        assert torch.allclose(lin.weight.grad, hand["dW"][l], atol=1e-6), f"ΔW_{l}"
    for (j, i), dE in hand["dE"].items():
        assert torch.allclose(module.error_synapses[f"{j}_to_{i}"].grad, dE, atol=1e-6), f"ΔE_{j}→{i}"


# ---------------------------------------------------------------- §3.3: residual and conv nets
RES_SHAPE = (3, 8, 8)


def build_net(small_cfg, model, *overrides):
    """rec-LRA on a zoo conv net at 8×8 (timm ResNet-18 with the CIFAR stem, pResNet, CNN)."""
    del small_cfg  # its 2×8 MLP keys do not apply to these models
    cfg = compose(overrides=["algorithm.name=rlra", "data.name=synthetic", f"data.shape=[{','.join(map(str, RES_SHAPE))}]",
                             f"data.num_classes={CLASSES}", "guard.every=0", "algorithm.error_init=unit", *model, *overrides])
    torch.manual_seed(0)
    net = create_model(cfg.model, RES_SHAPE, CLASSES)
    with torch.no_grad():  # timm zero-inits each block's last BN scale, which would zero conv2's update
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.fill_(1.0)
    return RecursiveLRA(cfg, net, CLASSES, RES_SHAPE)


RESNET = ["model.name=timm:resnet18", "model.cifar_stem=true"]
NETS = {
    "resnet-conv": (RESNET, []),
    "resnet-lowrank": (RESNET, ["algorithm.map_synapse=lowrank", "algorithm.synapse_rank=4"]),
    "resnet-local_bp": (RESNET, ["algorithm.block_update=local_bp"]),
    "presnet-conv": (["model.name=presnet18", "model.masks=4"], []),
    "cnn-conv": (["model.name=cnn", "model.channels=[4,6,6]", "model.kernel=3", "model.batchnorm=true"], []),
}


def res_batch():
    return fixed(4, *RES_SHAPE, scale=1.0, offset=0.7), torch.tensor([0, 2, 1, 2])


SLOW_NETS = ("resnet-lowrank", "presnet-conv")  # ~5 s each on an idle 2-core CPU; the others cover the code paths


@pytest.mark.parametrize("net", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_NETS else n for n in NETS])
def test_one_step_on_conv_nets_updates_every_weight(small_cfg, net):
    model, extra = NETS[net]
    module = build_net(small_cfg, model, *extra)
    x, y = res_batch()
    surrogate, logits, _ = module.objective(x, y)
    surrogate.backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if p.ndim >= 2:
            assert p.grad.abs().max() > 0, name
    if net.startswith("resnet"):
        blocks = 8 if "local_bp" in net else 16  # stem + 8 block outputs (+ 8 inner maps)
        assert len(module.regions.names) == 1 + blocks + 1
        # every block output and the stem hear the output directly (E_{L→i}); inner maps their block
        L = len(module.regions.names)
        for i, name in enumerate(module.regions.names[:-1], start=1):
            inner = name.endswith(".act1") and name != "net.act1"
            assert module.source[i] == (i + 1 if inner else L) and module.level[i] == (2 if inner else 1)


def test_resnet_error_synapse_memory(small_cfg):
    """Dense E_{L→i} into the stem and the 8 block outputs, k×k conv synapses into the inner maps."""
    module = build_net(small_cfg, RESNET, "algorithm.synapse_kernel=3")
    sizes = {n: int(torch.Size(s).numel()) for n, s in zip(module.regions.names, module.shapes.values())}
    # CIFAR stem at 8×8: 64×8×8, layer2 128×4×4, layer3 256×2×2, layer4 512×1×1
    assert sizes["net.act1"] == 4096 and sizes["net.layer2.0.act2"] == 2048 and sizes["net.layer4.1.act2"] == 512
    dense = 4 * CLASSES * sum(v for k, v in sizes.items() if k == "net.act1" or k.endswith(".act2"))
    widths = [64, 64, 128, 128, 256, 256, 512, 512]
    conv = 4 * sum(c * c * 9 for c in widths)
    assert module.error_synapse_memory() == {"dense": dense, "conv": conv, "lowrank": 0, "total": dense + conv}
    pointwise = build_net(small_cfg, RESNET)  # the default k = 1: a ninth of the conv bytes
    assert pointwise.error_synapse_memory() == {"dense": dense, "conv": conv // 9, "lowrank": 0, "total": dense + conv // 9}
    local = build_net(small_cfg, RESNET, "algorithm.block_update=local_bp")
    assert local.error_synapse_memory()["total"] == dense  # local BP needs no synapses inside the blocks


def test_local_bp_inside_block_equals_backprop_of_the_block_error_units(small_cfg):
    """block_update=local_bp: e_b = z_b − relu(h_b − β E_{L→b} e_L) by hand, and every weight of the
    block gets exactly backprop of ⟨e_b, h_b⟩/B through that block alone (autograd on timm's modules)."""
    module = build_net(small_cfg, RESNET, "algorithm.block_update=local_bp")
    x, y = res_batch()
    layers = module.forward_layers(x)
    errors, _, _, _ = module.error_units(layers, y)
    L, B, beta = len(layers), x.shape[0], float(module.cfg.algorithm.beta)
    surrogate, logits, _ = module.objective(x, y)
    surrogate.backward()
    e_L = torch.softmax(logits.detach(), 1) - F.one_hot(y, CLASSES).float()
    for i, (name, blk) in ((4, module.regions.blocks[2]), (9, module.regions.blocks[7])):  # layer2.0 (projection), layer4.1
        assert module.regions.names[i - 1] == f"{name}.act2"
        x_b, h_b, z_b = layers[i - 1]
        E = module.error_synapses[f"{L}_to_{i}"].detach()
        d = (e_L @ E.t()).view_as(z_b)
        e_hand = z_b - torch.relu(h_b.detach() - beta * d)
        assert torch.allclose(errors[i], e_hand, atol=1e-6) and e_hand.abs().max() > 1e-3
        # backprop inside the block only, from its error units, with autograd on the block's modules
        params = [p for p in blk.parameters()]
        x_in = x_b.detach()
        inner = blk.act1(blk.bn1(blk.conv1(x_in)))
        shortcut = blk.downsample(x_in) if blk.downsample is not None else x_in
        h = blk.bn2(blk.conv2(inner)) + shortcut
        grads = torch.autograd.grad(h, params, grad_outputs=e_hand / B)
        for (n, p), g in zip(blk.named_parameters(), grads):
            assert torch.allclose(p.grad, g, atol=1e-5), f"{name}.{n}"
        assert any(n.startswith("downsample") for n, _ in blk.named_parameters()) == (i == 4)


def test_resnet_inner_region_conv_synapse_by_hand(small_cfg):
    """block_update=rlra: the inner map's d = E ⊛ e_b (3×3 conv), its target, ΔW of conv1 (through
    bn1 only), ΔE = −γ d e_bᵀ as the conv kernel's gradient, and conv2 learning from e_b alone."""
    module = build_net(small_cfg, RESNET, "algorithm.synapse_kernel=3")  # the default 1×1 is the k = 1 case
    x, y = res_batch()
    layers = module.forward_layers(x)
    errors, _, _, _ = module.error_units(layers, y)
    surrogate, _, _ = module.objective(x, y)
    surrogate.backward()
    a, B = module.cfg.algorithm, x.shape[0]
    beta, gamma = float(a.beta), float(a.error_gamma)
    name, blk = module.regions.blocks[1]  # layer1.1: regions 4 (act1) and 5 (act2)
    i1, i2 = 4, 5
    assert module.regions.names[i1 - 1] == f"{name}.act1" and module.source[i1] == i2
    K = module.error_synapses[f"{i2}_to_{i1}"]
    assert K.shape == (64, 64, 3, 3)
    x_b, h1, z1 = layers[i1 - 1]
    with torch.no_grad():
        d = F.conv2d(errors[i2], K, padding=1)
        e1 = z1 - torch.relu(h1 - beta * d)
    assert torch.allclose(errors[i1], e1, atol=1e-5)
    # ΔE: ⟨−γ d, K ⊛ e_b⟩/B differentiated in K
    Kc = K.detach().clone().requires_grad_(True)
    (dK,) = torch.autograd.grad((-gamma * d * F.conv2d(errors[i2], Kc, padding=1)).sum() / B, Kc)
    assert torch.allclose(K.grad, dK, atol=1e-6) and dK.abs().max() > 0
    # conv1/bn1 from e_{act1}; conv2/bn2 from e_{act2}, on detached inputs
    (g1,) = torch.autograd.grad(blk.bn1(blk.conv1(x_b.detach())), [blk.conv1.weight], grad_outputs=e1 / B)
    assert torch.allclose(blk.conv1.weight.grad, g1, atol=1e-5)
    (g2,) = torch.autograd.grad(blk.bn2(blk.conv2(z1.detach())) + x_b.detach(), [blk.conv2.weight],
                                grad_outputs=errors[i2] / B)
    assert torch.allclose(blk.conv2.weight.grad, g2, atol=1e-5)


def test_pseudo_conv_update_is_the_papers_delta_w(small_cfg):
    """pResNet under rec-LRA: each pseudo-conv's combination weights get Δw^m = Σ e·φ_r(z^m + n^m)
    (PseudoConv2d.local_update, the paper's §3.3 formula) with e the error at the pseudo-conv's
    output, averaged over the batch; the fixed noise maps get nothing."""
    module = build_net(small_cfg, ["model.name=presnet18", "model.masks=4"])
    x, y = res_batch()
    layers = module.forward_layers(x)
    errors, _, _, _ = module.error_units(layers, y)
    surrogate, _, _ = module.objective(x, y)
    surrogate.backward()
    B = x.shape[0]
    for k, (name, blk) in enumerate(module.regions.blocks[:3]):
        i1 = 2 + 2 * k  # the block's inner region (act1): h = drop_block(bn1(conv1(x_b)))
        assert module.regions.names[i1 - 1] == f"{name}.act1"
        x_b = layers[i1 - 1][0].detach()
        out = blk.conv1(x_b).detach().requires_grad_(True)
        (e_out,) = torch.autograd.grad(blk.bn1(out), out, grad_outputs=errors[i1])  # e at the pseudo-conv output
        delta = type(blk.conv1).local_update(e_out, blk.conv1.perturbed(x_b)) / B
        assert torch.allclose(blk.conv1.combine.weight.grad, delta, atol=1e-5), name
        assert delta.abs().max() > 0
    assert all(b.grad is None for b in module.model.buffers())


@pytest.mark.parametrize("update", ["rlra", "local_bp"])
def test_probe_reports_update_angle_for_every_resnet_weight(small_cfg, update):
    module = build_net(small_cfg, RESNET, f"algorithm.block_update={update}", "probe.signals=true")
    x, y = res_batch()
    surrogate, _, _ = module.probed_objective(x, y)
    surrogate.backward()
    values = AlignmentProbe().measure(SimpleNamespace(world_size=1), module)
    weights = [n.removesuffix(".weight") for n, p in module.model.named_parameters() if p.ndim >= 2]
    assert len(weights) == 21  # stem, 16 block convs, 3 projections, fc
    updates = {k.removeprefix("align/update/"): v for k, v in values.items() if k.startswith("align/update/")}
    assert sorted(updates) == sorted(weights)
    assert all(0.0 <= v <= 180.0 for v in updates.values())
    assert updates["net.fc"] < 1e-3  # the output layer's update is backprop's
    signals = {k for k in values if k.startswith("align/signal/")}
    # signal angles where the regions' units are the micro points (block_update=rlra): all 17
    assert len(signals) == (17 if update == "rlra" else 0)


# ---------------------------------------------------------------- rlra-2/-5's CNN: Bartunov's locally-connected net
LC_SHAPE = (3, 16, 16)


def build_lcnet(*overrides, channels="[4,8,8]", shape=LC_SHAPE):
    cfg = compose(overrides=["algorithm.name=rlra", "data.name=synthetic", f"data.shape=[{','.join(map(str, shape))}]",
                             f"data.num_classes={CLASSES}", "guard.every=0", "model.name=lcnet",
                             f"model.channels={channels}", *overrides])
    torch.manual_seed(0)
    return RecursiveLRA(cfg, create_model(cfg.model, shape, CLASSES), CLASSES, shape)


def test_one_step_on_lcnet_updates_every_weight():
    """BN + LN + dropout lcnet: every LC weight, norm, classifier and error synapse gets a finite, nonzero update."""
    module = build_lcnet("model.batchnorm=true", "model.layernorm=true", "model.dropout=0.1")
    lcs = [b.lc for b in module.model.features]
    assert [type(s.linear).__name__ for s in module.regions.stages] == ["LocallyConnected2d"] * 3 + ["Linear"]
    assert module.points == ["features.0.act", "features.1.act", "features.2.act"]
    x, y = fixed(4, *LC_SHAPE, scale=1.0, offset=0.7), torch.tensor([0, 2, 1, 2])
    surrogate, logits, loss = module.objective(x, y)
    surrogate.backward()
    assert logits.shape == (4, CLASSES) and torch.isfinite(loss)
    for name, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if p.ndim >= 2:
            assert p.grad.abs().max() > 0, name
    assert [tuple(lc.weight.grad.shape) for lc in lcs] == [(64, 4, 75), (16, 8, 100), (16, 8, 72)]


def test_lcnet_step_matches_local_update_by_hand():
    """No norms, g = 2: wiring {3: 4, 2: 4, 1: 2} (E_{4→3}, E_{4→2} dense from the logits, E_{2→1} a
    3×3 conv synapse on e_2 upsampled to z_1's 8×8). Forward per position with a Python loop, targets
    y = tanh(h − βd), ΔW_l = (1/B) Σ_b e_l p_lᵀ for every position l of every LC layer, ΔE = −γ d eᵀ."""
    module = build_lcnet("algorithm.error_init=gaussian", "algorithm.error_sigma=0.3", "algorithm.synapse_kernel=3")
    lcs = [b.lc for b in module.model.features]
    fc = module.model.classifier
    assert module.source == {3: 4, 2: 4, 1: 2} and module.kinds == {(4, 3): "dense", (4, 2): "dense", (2, 1): "conv"}
    with torch.no_grad():
        for i, lc in enumerate(lcs):
            lc.weight.copy_(fixed(*lc.weight.shape, scale=0.3, offset=i))
            lc.bias.copy_(fixed(*lc.bias.shape, scale=0.1, offset=10 + i))
    E = {k: v.detach().clone() for k, v in module.error_synapses.items()}
    x, y = fixed(4, *LC_SHAPE, scale=1.0, offset=0.7), torch.tensor([0, 2, 1, 2])
    a = module.cfg.algorithm
    beta, gamma, B = float(a.beta), float(a.error_gamma), x.shape[0]
    with torch.no_grad():
        z, h, p = {0: x}, {}, {}
        for l, lc in enumerate(lcs, start=1):
            p[l] = F.unfold(z[l - 1], lc.kernel_size, padding=lc.padding, stride=lc.stride)  # (B, K, L)
            W = lc.weight.detach()
            cols = [p[l][:, :, q] @ W[q].T for q in range(W.shape[0])]  # one dense layer per position
            h[l] = torch.stack(cols, 2).reshape(B, lc.out_channels, *lc.out_size) + lc.bias.detach()
            z[l] = torch.tanh(h[l])
        logits = z[3].flatten(1) @ fc.weight.detach().T + fc.bias.detach()
        e = {4: torch.softmax(logits, 1) - F.one_hot(y, CLASSES).float()}
        d = {3: (e[4] @ E["4_to_3"].T).view_as(z[3]), 2: (e[4] @ E["4_to_2"].T).view_as(z[2])}
        e[3], e[2] = z[3] - torch.tanh(h[3] - beta * d[3]), z[2] - torch.tanh(h[2] - beta * d[2])
        d[1] = F.conv2d(F.interpolate(e[2], size=(8, 8), mode="nearest"), E["2_to_1"], padding=1)
        e[1] = z[1] - torch.tanh(h[1] - beta * d[1])
        dW = {l: torch.stack([e[l].flatten(2)[:, :, q].T @ p[l][:, :, q] for q in range(p[l].shape[2])]) / B
              for l in (1, 2, 3)}
        dE = {"4_to_3": -gamma * d[3].flatten(1).T @ e[4] / B, "4_to_2": -gamma * d[2].flatten(1).T @ e[4] / B}
    surrogate, out, _ = module.objective(x, y)
    surrogate.backward()
    assert torch.allclose(out, logits, atol=1e-5)
    for l, lc in enumerate(lcs, start=1):
        assert torch.allclose(lc.weight.grad, dW[l], atol=1e-6), f"ΔW_{l}"
        assert torch.allclose(lc.bias.grad, e[l].sum(0) / B, atol=1e-6), f"Δb_{l}"
    # the layer's own local_update (ΔW_l = Σ_b e_l p_lᵀ) is the same update
    assert torch.allclose(lcs[0].weight.grad, lcs[0].local_update(e[1], p[1]) / B, atol=1e-6)
    assert torch.allclose(fc.weight.grad, e[4].T @ z[3].flatten(1) / B, atol=1e-6)  # the output's: BP's
    for k, v in dE.items():
        assert torch.allclose(module.error_synapses[k].grad, v, atol=1e-6), f"ΔE_{k}"
    # conv synapse: ΔE_{2→1} is the correlation of −γ d_1 with the resized e_2 (autograd of ⟨−γ d_1, E ⊛ e_2⟩)
    up = F.interpolate(e[2], size=(8, 8), mode="nearest")
    dE21 = torch.nn.grad.conv2d_weight(up, E["2_to_1"].shape, -gamma * d[1] / B, padding=1)
    assert torch.allclose(module.error_synapses["2_to_1"].grad, dE21, atol=1e-6)


@pytest.mark.parametrize("gap, wiring", [
    (1, {6: 7, 5: 7, 4: 7, 3: 7, 2: 7, 1: 7}),
    (2, {6: 7, 5: 6, 4: 7, 3: 4, 2: 7, 1: 2}),
    (3, {6: 7, 5: 6, 4: 5, 3: 7, 2: 3, 1: 2}),
    (6, {6: 7, 5: 6, 4: 5, 3: 4, 2: 3, 1: 2}),
])
def test_lcnet_skip_gap_wiring(gap, wiring):
    """Algorithm 1 on a 6-LC-layer lcnet: ℓ gets E_{L→ℓ} (L = 7, dense) when ℓ mod g = 0, else a conv
    synapse E_{ℓ+1→ℓ} between the two maps."""
    module = build_lcnet(f"algorithm.skip_gap={gap}", "model.kernel=[3,3,3,3,3,3]", "model.stride=[1,1,1,1,1,1]", channels="[2,3,2,3,2,3]",
                         shape=(3, 4, 4))
    assert module.source == wiring
    assert module.level == {l: 1 if j == 7 else 2 for l, j in wiring.items()}
    assert module.kinds == {(j, l): "dense" if j == 7 else "conv" for l, j in wiring.items()}
    assert set(module.error_synapses) == {f"{j}_to_{l}" for l, j in wiring.items()}


@pytest.mark.parametrize("closed_form", [True, False])
def test_displacement_descent_steps_eq6_the_other_way_and_nothing_else(small_cfg, closed_form):
    """The two readings of Eq. 6's sign differ only in the error synapses' .grad, which flips
    (bench/investigations/rlra_error_sign.py measures what each does to training)."""
    x, y = batch()
    grads = {}
    for rule in ("displacement", "displacement_descent"):
        module, linears = build(small_cfg, "rlra", 3, f"algorithm.error_update={rule}")
        module.closed_form = closed_form and module.closed_form
        surrogate, _, _ = module.objective(x, y)
        surrogate.backward()
        grads[rule] = ([lin.weight.grad.clone() for lin in linears],
                       {k: E.grad.clone() for k, E in module.error_synapses.items()})
    (w_a, e_a), (w_b, e_b) = grads["displacement"], grads["displacement_descent"]
    for a, b in zip(w_a, w_b):
        torch.testing.assert_close(a, b)
    assert e_a.keys() == e_b.keys() and e_a
    for k in e_a:
        assert e_a[k].abs().max() > 0
        torch.testing.assert_close(e_b[k], -e_a[k])
