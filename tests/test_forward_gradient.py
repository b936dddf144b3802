"""Forward gradients and GrAPE (bench/feedback/forward_gradient.py, bench/algorithms/forward_gradient.py):
unbiasedness, JVP against finite differences, the B update, GrAPE = DFA with the same B, convolutions
through conv2d_weight, DDP equivalence of the stochastic estimator, and every zoo model trained one
step or refused in one line (shared with PEPITA)."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.multiprocessing as mp
import torch.nn.functional as F

from bench.algorithms import RULES
from bench.config import ConfigError, compose
from bench.feedback.forward_gradient import (ActivityPerturbation, WeightTangentFree, directional_derivative,
                                             estimate_activity_gradients, per_row_error)
from bench.feedback.noise import SharedNoise
from bench.models import MODELS, create_model
from conftest import load_state, run_dirs


def train_fn():
    from bench.run.train import train

    return train


def build(rule: str, *overrides: str, shape=(6,), classes=3, depth=2, width=5):
    mlp = [] if any(o.startswith("model.name=") for o in overrides) else [f"model.depth={depth}", f"model.width={width}"]
    cfg = compose(overrides=[f"algorithm.name={rule}", "data.name=synthetic", f"data.shape=[{','.join(map(str, shape))}]",
                             f"data.num_classes={classes}", *mlp, *overrides])
    torch.manual_seed(0)
    model = create_model(cfg.model, shape, classes)
    return RULES.get(rule)(cfg, model, classes, shape)


def tanh_net(dtype=torch.float64):
    """A 3-layer tanh MLP (2 hidden layers, 2 feedback points) in double precision."""
    cfg = compose(overrides=["data.name=synthetic", "data.shape=[8]", "data.num_classes=4", "model.depth=2",
                             "model.width=6", "model.activation=tanh"])
    torch.manual_seed(3)
    return create_model(cfg.model, (8,), 4).to(dtype)


def true_activity_gradients(model, x, y):
    """∂(Σ_b ℓ_b)/∂h_l at every point, by backprop."""
    names = model.feedback_points("micro")
    modules = dict(model.named_modules())
    hs = []
    handles = [modules[n].register_forward_hook(lambda m, i, o: hs.append(o)) for n in names]
    logits = model(x)
    for h in handles:
        h.remove()
    loss = F.cross_entropy(logits, y, reduction="sum")
    return torch.autograd.grad(loss, hs)


def cosine(a, b) -> float:
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    return float(a.dot(b) / (a.norm() * b.norm()))


def test_forward_gradient_is_unbiased_over_4000_draws_and_noisy_alone():
    model = tanh_net()
    x, y = torch.randn(5, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 1])
    true = true_activity_gradients(model, x, y)
    loss = lambda z, t: F.cross_entropy(z, t)
    names = model.feedback_points("micro")
    # 4,000 independent draws in one pass: the batch repeated 4,000 times (every row gets its own
    # perturbation, and a row's estimate depends on nothing else), then averaged per sample
    draws = 4000
    per_row = estimate_activity_gradients(model, names, x.repeat(draws, 1), y.repeat(draws), loss, SharedNoise(11))
    mean = [g.reshape(draws, *x.shape[:1], -1).mean(0) for g in per_row]
    # ``jvps`` averages the same way over passes (3 here, to check that path against the first)
    three = estimate_activity_gradients(model, names, x, y, loss, SharedNoise(12), jvps=3)
    singles = [estimate_activity_gradients(model, names, x, y, loss, SharedNoise(100 + k), jvps=1) for k in range(20)]
    for l, g in enumerate(true):
        assert cosine(three[l], g) > 0  # three draws: noisy, on the right side
    for l, g in enumerate(true):
        averaged = cosine(mean[l], g)
        single = sum(cosine(s[l], g) for s in singles) / len(singles)
        print(f"point {l}: cos(mean of 4000, true) = {averaged:.4f}, mean single-draw cos = {single:.3f}")
        assert averaged > 0.95, (l, averaged)
        assert single < 0.5, (l, single)  # one draw alone is far from the gradient (so the first assert can fail)


def test_jvp_equals_central_finite_difference():
    model = tanh_net()
    names = model.feedback_points("micro")
    x, y = torch.randn(4, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    perturb = ActivityPerturbation(model, names, SharedNoise(5))
    with fwAD.dual_level():
        perturb.start(cut=False)
        logits, tangent = fwAD.unpack_dual(model(x))
        perturb.stop()
    vs = perturb.perturbations
    perturb.remove()
    d = directional_derivative(per_row_error(logits, y, lambda z, t: F.cross_entropy(z, t)), tangent)

    modules = dict(model.named_modules())

    def per_sample_loss(eps):
        handles = [modules[n].register_forward_hook(lambda m, i, o, v=v: o + eps * v) for n, v in zip(names, vs)]
        try:
            with torch.no_grad():
                return F.cross_entropy(model(x), y, reduction="none")
        finally:
            for h in handles:
                h.remove()

    eps = 1e-5
    fd = (per_sample_loss(eps) - per_sample_loss(-eps)) / (2 * eps)
    d = d.detach()
    print("max |JVP − central FD| =", float((d - fd).abs().max()), "of", float(d.abs().max()))
    assert float((d - fd).abs().max()) < 1e-4
    assert float(d.abs().min()) > 1e-3  # a non-trivial directional derivative on every sample


class CountMatmuls(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the matrix products and convolutions aten runs."""

    OPS = {"mm", "addmm", "bmm", "convolution"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("net", ["mlp", "conv"])
def test_weight_tangent_free_equals_pytorch_forward_ad_with_half_the_products(net):
    """The workaround for pytorch#69687 (bench/feedback/forward_gradient.py, WeightTangentFree):
    same primal, tangent and weight gradients as PyTorch's own forward AD, one product per layer
    for the tangent instead of two."""
    torch.manual_seed(0)
    if net == "mlp":
        model = tanh_net()
        x = torch.randn(5, 8, dtype=torch.float64)
    else:
        model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, stride=2, padding=1), torch.nn.Tanh(), torch.nn.Flatten(),
                                    torch.nn.Linear(3 * 4 * 4, 4)).double()
        x = torch.randn(5, 2, 8, 8, dtype=torch.float64)
    v = torch.randn_like(x)
    results = []
    for use_mode in (False, True):
        counter = CountMatmuls()
        with fwAD.dual_level(), counter:
            if use_mode:
                with WeightTangentFree():
                    out = model(fwAD.make_dual(x, v))
            else:
                out = model(fwAD.make_dual(x, v))
            primal, tangent = fwAD.unpack_dual(out)
        grads = torch.autograd.grad(primal.pow(2).sum(), list(model.parameters()))
        results.append((primal.detach(), tangent, grads, counter.count))
    (p0, t0, g0, n0), (p1, t1, g1, n1) = results
    layers = 3 if net == "mlp" else 2
    print(f"{net}: products with PyTorch's formula {n0}, with the mode {n1}")
    assert torch.allclose(p0, p1, rtol=0, atol=1e-12) and torch.allclose(t0, t1, rtol=0, atol=1e-12)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(g0, g1))
    assert float(t0.detach().abs().max()) > 1e-3
    assert n0 == 3 * layers and n1 == 2 * layers  # primal + two tangent products per layer, then one


def batch_cosine(module, x, y, i):
    """cos over the batch between B_i e and the true ∂ℓ/∂h_i (all rows flattened)."""
    g = true_activity_gradients(module.model, x, y)[i]
    with torch.no_grad():
        e = per_row_error(module.model(x), y, module.loss_fn)
        return cosine(e.mm(module.feedback_matrix(i).t()), g)


def test_b_update_raises_the_batch_cosine_within_50_steps():
    module = build("grape", "algorithm.b_lr=0.05", shape=(8,), classes=4, depth=2, width=6)
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    before = [batch_cosine(module, x, y, i) for i in range(2)]
    for _ in range(50):  # weights fixed: only B moves
        module.objective(x, y)
    after = [batch_cosine(module, x, y, i) for i in range(2)]
    print("batch cosine with the true gradient, before → after 50 B steps:", before, after)
    for b, a in zip(before, after):
        assert a > b + 0.2, (b, a)


@pytest.mark.parametrize("tokens", [1, 3])
def test_one_jvp_statistics_equal_the_materialised_estimates(tokens):
    """With one JVP the statistics skip forming Ĝ = diag(d) V; they must equal Ĝᵀ E and ‖Ĝ‖² of
    the estimates themselves, also when a sample owns several rows (tokens)."""
    module = build("grape", shape=(6,), classes=3, depth=2, width=5)
    g = torch.Generator().manual_seed(3)
    batch = 4
    errors = torch.randn(batch * tokens, 3, generator=g, dtype=torch.float64)
    d = torch.randn(batch, generator=g, dtype=torch.float64)
    vs = [torch.randn(batch, tokens, 5, generator=g, dtype=torch.float64).squeeze(1) for _ in range(2)]
    fast = module.alignment_statistics([d], errors, [vs], [None])
    estimates = [v * d.view(-1, *([1] * (v.dim() - 1))) for v in vs]
    for i, est in enumerate(estimates):
        rows = est.reshape(batch * tokens, -1)
        torch.testing.assert_close(fast[2 * i], rows.t().mm(errors), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fast[2 * i + 1], rows.pow(2).sum().reshape(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast[-1], errors.t().mm(errors))
    # two JVPs average their estimates: the same statistics as the mean Ĝ
    two = module.alignment_statistics([d, 2 * d], errors, [vs, vs], [None, None])
    torch.testing.assert_close(two[0], 1.5 * fast[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(two[1], 2.25 * fast[1], rtol=1e-12, atol=1e-12)


def test_literal_eq6_leaves_b_direction_unchanged_and_norms_stay_constant():
    literal = build("grape", "algorithm.b_update=literal", "algorithm.b_noise=0.0", "algorithm.b_lr=0.5")
    default = build("grape", "algorithm.b_lr=0.05")
    start_literal = [literal.feedback_matrix(i) for i in range(2)]
    start_default = [default.feedback_matrix(i) for i in range(2)]
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(20):
        literal.objective(x, y)
        default.objective(x, y)
    for i in range(2):
        b0, b1 = start_literal[i], literal.feedback_matrix(i)
        assert float((b1 / b1.norm() - b0 / b0.norm()).abs().max()) < 1e-6
        assert abs(float(b1.norm() / b0.norm()) - 1) < 1e-6
        d0, d1 = start_default[i], default.feedback_matrix(i)
        assert abs(float(d1.norm() / d0.norm()) - 1) < 1e-6
        assert float((d1 / d1.norm() - d0 / d0.norm()).abs().max()) > 1e-3  # the default does move B


def test_jacobian_variant_keeps_column_norms_and_trains():
    module = build("grape", "algorithm.align_to=jacobian", "algorithm.b_lr=0.05")
    cols = [module.feedback_matrix(i).norm(dim=0) for i in range(2)]
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(5):
        surrogate, _, _ = module.objective(x, y)
    surrogate.backward()
    for i in range(2):
        torch.testing.assert_close(module.feedback_matrix(i).norm(dim=0), cols[i], rtol=1e-6, atol=0)
    assert all(p.grad is not None for p in module.model.parameters())


def test_grape_weight_update_equals_dfa_with_the_same_b_by_hand():
    module = build("grape", depth=2, width=5)
    x, y = torch.randn(4, 6), torch.tensor([0, 2, 1, 2])
    surrogate, logits, _ = module.objective(x, y)
    surrogate.backward()
    bs = [module.feedback_matrix(i) for i in range(2)]  # after this step's B update (B moves before W)
    e = (torch.softmax(logits.detach(), -1) - F.one_hot(y, 3)) / 4
    layers = [module.model.net[1], module.model.net[3]]
    h = x
    for layer, b in zip(layers, bs):
        a = h @ layer.weight.T + layer.bias
        delta = (e @ b.T) * (1 - torch.tanh(a) ** 2)
        torch.testing.assert_close(layer.weight.grad, delta.T @ h, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(layer.bias.grad, delta.sum(0), rtol=1e-5, atol=1e-7)
        h = torch.tanh(a)
    out = module.model.net[5]
    torch.testing.assert_close(out.weight.grad, e.T @ h, rtol=1e-5, atol=1e-7)
    # and DFA itself (its own per-layer matrices replaced by GrAPE's) gives the same update
    dfa = build("dfa", "algorithm.unified=false", depth=2, width=5)
    dfa.model.load_state_dict(module.model.state_dict())
    for i, b in enumerate(bs):
        getattr(dfa.feedback, f"matrix_{i}").copy_(b / dfa.feedback.scales[i])
    s2, _, _ = dfa.objective(x, y)
    s2.backward()
    for p, q in zip(module.model.parameters(), dfa.model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("granularity", ["macro", "micro"])
def test_error_at_hidden_projects_the_error_at_the_head_input(granularity):
    """grape-3's GrAPE rows: with ``error_at: hidden`` every point receives B_l e, e = ∂(Σ ℓ)/∂(lm_head
    input) / rows, by hand through autograd on a plain forward; B_l is d_model × l."""
    shape, vocab = (8,), 24  # vocabulary ≠ d_model, so the two error locations cannot be confused
    module = build("grape", "model.name=transformer", "model.n_layer=2", "model.n_embd=16", "model.n_head=2",
                   f"algorithm.granularity={granularity}", "algorithm.error_at=hidden", "algorithm.b_lr=0",
                   "algorithm.b_noise=0", shape=shape, classes=vocab)
    assert all(module.feedback_matrix(i).shape[1] == 16 for i in range(len(module.feedback.sizes)))
    x, y = torch.randint(0, vocab, (3, *shape)), torch.randint(0, vocab, (3, *shape))
    head_in = []
    handle = module.model.lm_head.register_forward_pre_hook(lambda m, a: head_in.append(a[0]))
    logits = module.model(x)
    handle.remove()
    rows = logits.numel() // vocab
    (e,) = torch.autograd.grad(F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1), reduction="sum"), head_in)
    signal = e.reshape(rows, -1) / rows
    module.tap.capture = True
    surrogate, _, _ = module.objective(x, y)
    points = list(module.tap.outputs)
    module.tap.capture = False
    for h in points:
        h.retain_grad()
    surrogate.backward()
    for i, h in enumerate(points):
        expected = signal.mm(module.feedback_matrix(i).t()).reshape(h.shape)
        torch.testing.assert_close(h.grad, expected, rtol=1e-4, atol=1e-7)
    assert float(signal.abs().max()) > 1e-4


def test_convolution_update_is_conv2d_weight_of_the_projected_error():
    module = build("grape", "model.name=cnn", "model.channels=[3]", "model.kernel=3", "model.pool=none",
                   "model.hidden=[]", shape=(1, 6, 6), classes=3)
    conv = module.model.features[0].conv
    x, y = torch.randn(4, 1, 6, 6), torch.tensor([0, 1, 2, 0])
    surrogate, logits, _ = module.objective(x, y)
    surrogate.backward()
    e = (torch.softmax(logits.detach(), -1) - F.one_hot(y, 3)) / 4
    a = conv(x).detach()
    delta = (e @ module.feedback_matrix(0).T).reshape_as(a) * (1 - torch.tanh(a) ** 2)
    expected = torch.nn.grad.conv2d_weight(x, conv.weight.shape, delta, padding=1)
    torch.testing.assert_close(conv.weight.grad, expected, rtol=1e-5, atol=1e-6)


def test_perturbations_are_the_global_draw_sliced_per_rank(monkeypatch):
    """What DDP equivalence means for the estimator: rank r of R, holding rows [r·n, (r+1)·n) of the
    global batch, draws exactly those rows of the perturbation one process draws for the batch."""
    model = tanh_net(torch.float32)
    names = model.feedback_points("micro")
    full = ActivityPerturbation(model, names, SharedNoise(9))
    halves = []
    import bench.feedback.noise as noise

    for rank in range(2):
        p = ActivityPerturbation(model, names, SharedNoise(9))
        monkeypatch.setattr(noise, "rank_and_world", lambda rank=rank: (rank, 2))
        halves.append(p.draw(torch.zeros(3, 6)))
    monkeypatch.setattr(noise, "rank_and_world", lambda: (0, 1))
    whole = full.draw(torch.zeros(6, 6))
    torch.testing.assert_close(torch.cat(halves), whole, rtol=0, atol=0)


# ----------------------------------------------------------------------------- DDP (both rules)
DDP_RULES = {"grape": [], "grape@jacobian": ["algorithm.align_to=jacobian"], "pepita": [],
             "grape@jvps": ["algorithm.jvps=2", "algorithm.recycle=true"]}
COMMON = ["data.name=synthetic", "data.shape=[20]", "data.num_classes=4", "data.n_train=400", "data.n_test=40",
          "data.val_size=0", "data.eval_batch_size=40", "algorithm.optimizer=sgd", "algorithm.lr=0.1",
          "algorithm.momentum=0.0", "algorithm.scheduler=none", "trainer.max_steps=3", "probe.every=0",
          "output.progress=none", "output.wandb=disabled", "model.depth=2", "model.width=16"]


def ddp_config(rule: str, *extra: str):
    return compose(overrides=[*COMMON, f"algorithm.name={rule.split('@')[0]}", *DDP_RULES[rule], *extra])


def _worker(rank: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                      LOCAL_RANK=str(rank), RANK=str(rank), CI="true", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    train = train_fn()
    for rule in DDP_RULES:
        train(ddp_config(rule, "trainer.name=ddp_cpu", "data.batch_size=8", f"output.root={root}/{rule}"))


@pytest.fixture(scope="module")
def ddp_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(port, str(root)), nprocs=2, start_method="spawn", join=True)
    return root


@pytest.mark.parametrize("rule", list(DDP_RULES))
def test_ddp_two_ranks_equal_one_process_double_batch(rule, tmp_path, ddp_root):
    """2 gloo ranks × batch 8 = 1 process × batch 16 after 3 SGD steps, to 1e-6, weights *and* the
    GrAPE feedback matrices: the perturbations are one rank-shared stream sliced like the batch, and
    the B update's batch sums are all-reduced before the step."""
    single = train_fn()(ddp_config(rule, "trainer.name=cpu", "data.batch_size=16", f"output.root={tmp_path}"))
    (ddp_dir,) = run_dirs(ddp_root / rule)
    summary = json.loads((ddp_dir / "summary.json").read_text())
    assert summary["status"] == single["status"] == "finished", summary.get("error")
    assert (summary["world_size"], single["world_size"]) == (2, 1)
    ddp, one = load_state(ddp_dir), load_state(run_dirs(tmp_path)[0])
    keys = [k for k in one if one[k].is_floating_point()]
    assert any(k.startswith("feedback.") for k in keys) == rule.startswith("grape")
    for key in keys:
        diff = float((ddp[key] - one[key]).abs().max())
        assert diff < 1e-6, f"{rule}: {key} differs by {diff:.3g}"
    # the comparison means something only if training moved the weights well beyond 1e-6
    train_fn()(ddp_config(rule, "trainer.name=cpu", "algorithm.lr=0.0", "trainer.max_steps=1", "data.batch_size=16",
                          f"output.root={tmp_path / 'init'}"))
    init = load_state(run_dirs(tmp_path / "init")[0])
    for key in keys:
        if key.startswith("model.") and key.endswith("weight"):
            assert float((one[key] - init[key]).abs().max()) > 1e-4, f"{rule}: {key} did not move"


# ----------------------------------------------------------------------------- every zoo model
ZOO = {  # model → (overrides, input shape, classes); small inputs so each step is quick
    "mlp": (["model.depth=2", "model.width=8"], (1, 8, 8), 4),
    "cnn": (["model.channels=[3,4]", "model.kernel=3"], (1, 8, 8), 4),
    "lenet4": ([], (1, 28, 28), 4),
    "sfa_mnist": ([], (1, 12, 12), 4),
    "sfa_cifar1": ([], (3, 32, 32), 4),
    "sfa_cifar2": ([], (3, 32, 32), 4),
    "sfa_imagenet1": ([], (3, 64, 64), 4),
    "sfa_imagenet2": ([], (3, 64, 64), 4),
    "timm:resnet18": (["model.cifar_stem=true"], (3, 16, 16), 4),
    "timm:vgg16": (["model.cifar_stem=true", "model.head_width=16"], (3, 32, 32), 4),
    "presnet18": ([], (3, 16, 16), 4),
    "lcnet": ([], (3, 16, 16), 4),
    "alexnet": (["model.cifar=true", "model.fc_width=16"], (3, 32, 32), 4),
    "transformer": (["model.n_layer=1", "model.n_embd=16", "model.n_head=2"], (8,), 16),
}


def one_step_or_refusal(rule: str, model_name: str):
    """Train one step of ``rule`` on ``model_name`` and return None, or return the one-line refusal."""
    extra, shape, classes = ZOO.get(model_name, ([], (3, 32, 32), 4))
    overrides = [f"algorithm.name={rule}", f"model.name={model_name}", "data.name=synthetic",
                 f"data.shape=[{','.join(map(str, shape))}]", f"data.num_classes={classes}", "algorithm.lr=0.01", *extra]
    try:
        cfg = compose(overrides=overrides)
    except ConfigError as err:
        return str(err)
    torch.manual_seed(0)
    model = create_model(cfg.model, shape, classes)
    try:
        module = RULES.get(rule)(cfg, model, classes, shape)
    except ValueError as err:
        return str(err)
    if model_name == "transformer":
        x, y = torch.randint(0, classes, (2, *shape)), torch.randint(0, classes, (2, *shape))
    else:
        x, y = torch.randn(2, *shape), torch.randint(0, classes, (2,))
    opt = module.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    before = [p.detach().clone() for p in module.parameters()]
    opt.zero_grad()
    surrogate, logits, loss = module.objective(x, y)
    surrogate.backward()
    opt.step()
    module.after_step()
    assert torch.isfinite(loss)
    moved = sum(int(not torch.equal(b, p.detach())) for b, p in zip(before, module.parameters()))
    assert moved > 0, f"{rule} on {model_name}: no parameter moved"
    return None


# Full-size models take 5–16 s a step on 2 CPU cores; they run with -m slow (test_all_rules.py covers
# every rule on the small instance of each model family in the fast suite).
FAST_MODELS = {"mlp", "cnn", "lenet4", "lcnet", "transformer", "sfa_mnist"}


@pytest.mark.parametrize("model_name", [m if m in FAST_MODELS else pytest.param(m, marks=pytest.mark.slow)
                                        for m in sorted(MODELS.names())])
@pytest.mark.parametrize("rule", ["grape", "pepita"])
def test_every_zoo_model_trains_one_step_or_refuses_in_one_line(rule, model_name):
    refusal = one_step_or_refusal(rule, model_name)
    if refusal is not None:
        print(f"{rule} on {model_name}: {refusal}")
        assert "\n" not in refusal and rule in refusal and len(refusal) < 300
    if rule == "pepita":
        assert (refusal is None) == (model_name == "mlp"), refusal
    elif model_name in ("mlp", "cnn", "lenet4", "alexnet", "timm:vgg16", "transformer"):
        assert refusal is None, refusal  # the models of the grape tables must train
