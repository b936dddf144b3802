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
from bench.models import create_model
from bench.results.io import read_csv
from bench.train import train
from conftest import angle, fixed, load_state, one_run_dir

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


def hand_step(linears, E, wiring, x, y, *, act="tanh", beta, gamma, alphas, kappa, rule="displacement"):
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
    ("rlra-state-rule", "rlra", 2, ["algorithm.error_update=state"], {2: 3, 1: 2}, {2: 1.0, 1: 1.0}, [1, 1, 1],
     "tanh", "state"),
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
                     alphas=alphas, kappa=kappa, rule=e_rule)
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
        g3 = (z[3] - F.one_hot(y, CLASSES).float()) / B
        gz2 = g3 @ W[2]
        g2 = gz2 * (1 - z[2] ** 2)
        gz1 = g2 @ W[1]
        g1 = gz1 * (1 - z[1] ** 2)
        bp = {1: g1.T @ z[0], 2: g2.T @ z[1], 3: g3.T @ z[2]}
    names = {1: "net.1", 2: "net.3", 3: "net.5"}
    assert sorted(k for k in values if k.startswith("align/update/")) == sorted(f"align/update/{n}" for n in names.values())
    for l, n in names.items():
        assert torch.allclose(rule_grads[f"{n}.weight"], hand["dW"][l], atol=1e-6)
        assert values[f"align/update/{n}"] == pytest.approx(angle(hand["dW"][l], bp[l]), abs=1e-4)
        assert values[f"align/ratio/{n}"] == pytest.approx(float(hand["dW"][l].norm() / bp[l].norm()), rel=1e-5)
    assert values["align/update/net.5"] < 1e-3  # the output layer's update is backprop's
    assert values["align/update/net.1"] > 1.0 and values["align/update/net.3"] > 1.0
    # teaching signal: the error unit e_ℓ against backprop's ∂L/∂z_ℓ, per sample (Launay Eq. 6)
    for point, l, g_bp in (("net.2", 1, gz1), ("net.4", 2, gz2)):
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
