"""DDP equivalence on CPU (docs/architecture.md): gloo with 2 processes at batch b must give the same weights
as one process at batch 2b, for every registered rule, after 3 steps.

With SGD the two agree to 1e-6: the only difference is the order in which float32 sums are taken
(two half-batch sums all-reduced, or one whole-batch sum), and SGD passes a gradient error δ to
the weights as lr·δ. Adam does not: its step lr·m̂/(√v̂ + ε) is normalised per element, so an
element whose gradient nearly cancels over the batch (|g| small beside the per-sample terms it
sums) turns the same rounding-level δ into a visible change of its step (issue 17 §6 measured up
to 6.5e-5 after 3 steps). ``test_ddp_adam_within_the_rounding_bound`` therefore derives its
tolerance per element from that argument instead of using a fixed number; see its docstring.

All rules run in one pair of DDP worker processes: each worker sets the environment a launcher
(torchrun, SLURM) would set, so Lightning's DDP strategy joins it instead of relaunching, and then
trains every rule in turn through ``bench.run.train.train`` — the code path of ``python -m bench run``.
Paying the Lightning import once per worker instead of once per rule and rank keeps this test
affordable as the rule list grows. Adding a rule adds its row here automatically; a rule that
needs extra settings for this tiny problem lists them in ``RULE_OVERRIDES``.
"""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from bench.algorithms import RULES
from bench.config import compose
from conftest import load_state, run_dirs

COMMON = [
    "data.name=synthetic", "data.shape=[20]", "data.num_classes=4", "data.n_train=400", "data.n_test=40",
    "data.val_size=0", "data.eval_batch_size=40",
    "algorithm.optimizer=sgd", "algorithm.lr=0.1", "trainer.max_steps=3", "probe.every=0",
    "output.progress=none", "output.wandb=disabled",
]
RULE_OVERRIDES: dict[str, list[str]] = {  # rule → extra overrides it needs on this toy problem
    # Target rules: the first layer's error unit is β²-small at the default β and σ_E (its weights
    # would move < 1e-4 in 3 steps); a larger displacement makes the movement check meaningful.
    "rlra": ["algorithm.beta=1.0", "algorithm.error_sigma=0.3"],
    "lra_e": ["algorithm.beta=1.0", "algorithm.error_sigma=0.3"],
    # rule@variant: DFA with macro points, i.e. local BP inside each conv block (conv → tanh →
    # avg-pool) of a small CNN; the MLP's macro points are its micro points.
    # Associated Learning trains only its folded models; lr 1 so that every sigmoid layer moves > 1e-4 in 3 steps.
    "al": ["model.name=al_mlp", "model.width=8", "model.bridge=16", "algorithm.lr=1.0"],
    "dfa@macro": ["algorithm.granularity=macro", "model.name=cnn", "data.shape=[1,6,6]", "model.channels=[3,4]",
                  "model.kernel=3", "model.pool=avg", "model.hidden=[8]"],
}
MLP = ["model.depth=2", "model.width=16"]  # the toy model, unless an entry names its own
RULES_UNDER_TEST = [*RULES.names(), *(r for r in RULE_OVERRIDES if "@" in r)]
# The Adam runs of issue 17 §6 ("adam:<rule>"), trained by the same pair of DDP workers.
ADAM = ["algorithm.optimizer=adam", "algorithm.lr=0.001", "algorithm.betas=[0.9,0.999]", "algorithm.weight_decay=0.0"]
ADAM_RULES = ["adam:usf_sn", "adam:rlra", "adam:kp"]


def rule_config(rule: str, *extra: str):
    optimizer = ADAM if rule.startswith("adam:") else []
    rule = rule.removeprefix("adam:")
    overrides = RULE_OVERRIDES.get(rule, [])
    model = [] if any(o.startswith("model.name=") for o in overrides) else MLP
    return compose(overrides=[*COMMON, *model, f"algorithm.name={rule.split('@')[0]}", *overrides, *optimizer, *extra])


def _ddp_worker(rank: int, port: int, root: str, rules: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                      LOCAL_RANK=str(rank), RANK=str(rank), CI="true", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from bench.run.train import train

    for rule in rules:
        train(rule_config(rule, "trainer.name=ddp_cpu", "data.batch_size=8", f"output.root={root}/{rule}"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_ddp_worker, args=(_free_port(), str(root), [*RULES_UNDER_TEST, *ADAM_RULES]), nprocs=2,
                       start_method="spawn", join=True)
    return root


def initial_weights(rule: str, root) -> dict[str, torch.Tensor]:
    """The weights a rule's runs start from: its config with lr = 0 (same seed, same model)."""
    from bench.run.train import train

    train(rule_config(rule, "algorithm.lr=0.0", "trainer.max_steps=1", "data.batch_size=16", f"output.root={root}"))
    return model_tensors(load_state(run_dirs(root)[0]))


@pytest.fixture(scope="module")
def init_weights(tmp_path_factory):
    return initial_weights("bp", tmp_path_factory.mktemp("init"))


def model_tensors(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith("model.")}


@pytest.mark.parametrize("rule", RULES_UNDER_TEST)
def test_ddp_two_processes_equal_one_process_double_batch(rule, tmp_path, ddp_root, init_weights):
    from bench.run.train import train

    single = train(rule_config(rule, "trainer.name=cpu", "data.batch_size=16", f"output.root={tmp_path}"))
    (ddp_dir,) = run_dirs(ddp_root / rule)
    (single_dir,) = run_dirs(tmp_path)
    ddp_summary = json.loads((ddp_dir / "summary.json").read_text())
    assert ddp_summary["status"] == single["status"] == "finished", ddp_summary.get("error")
    assert (ddp_summary["world_size"], single["world_size"]) == (2, 1)
    assert ddp_summary["last_epoch"]["step"] == single["last_epoch"]["step"] == 3

    ddp, one = model_tensors(load_state(ddp_dir)), model_tensors(load_state(single_dir))
    assert ddp.keys() == one.keys()
    for key in ddp:
        diff = (ddp[key] - one[key]).abs().max().item()
        assert diff < 1e-6, f"{rule}: {key} differs by {diff:.3g}"
    # the comparison means something only if training moved every weight well beyond 1e-6
    init = init_weights if init_weights.keys() == one.keys() else initial_weights(rule, tmp_path / "init")
    for key, w0 in init.items():
        if key.endswith("weight"):
            moved = (one[key] - w0).abs().max().item()
            assert moved > 1e-4, f"{rule}: {key} moved only {moved:.3g}"


# ----------------------------------------------------------------------------- Adam (issue 17 §6)

U = 2.0 ** -24  # float32 unit roundoff


def rounding_bound(per_sample: list[torch.Tensor], layers: int, fan_in: int) -> torch.Tensor:
    """Per element, a bound on |δ|, the difference between two float32 evaluations of the batch
    update (1/B)·Σ_b x_b that differ only in summation order and batch split:

    * the sum of B terms taken in two orders: each is within (B−1)·u·Σ|x_b| of the exact sum
      (the standard recursive-summation bound), so the two differ by ≤ 2(B−1)·u·Σ|x_b|;
    * each per-sample term x_b itself comes out of ``layers`` forward and backward products of
      inner length ≤ ``fan_in``, computed by kernels that may block differently for batch 8 and
      16: ≤ 2·layers·fan_in·u relative error, on each side.

    Σ|x_b| uses the per-sample updates actually present, so an element whose batch mean cancels
    to near zero keeps the large bound its summands imply."""
    x = torch.stack([p.double() for p in per_sample])
    b = x.shape[0]
    return 2 * U * ((b - 1) + 2 * layers * fan_in) * x.abs().sum(0) / b


def adam_steps(grads: list[torch.Tensor], lr: float, betas=(0.9, 0.999), eps: float = 1e-8) -> list[torch.Tensor]:
    """torch.optim.Adam's per-step displacements (no weight decay, no amsgrad), in float64."""
    m = v = torch.zeros_like(grads[0])
    steps = []
    for t, g in enumerate(grads, 1):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        steps.append(-lr / (1 - betas[0] ** t) * m / ((v / (1 - betas[1] ** t)).sqrt() + eps))
    return steps


def adam_tolerance(grads: list[torch.Tensor], deltas: list[torch.Tensor], lr: float) -> torch.Tensor:
    """Per element, the largest change of the summed Adam displacement when every step's gradient
    g_s may be off by up to δ_s: the maximum over g_s + {−δ_s, 0, +δ_s} (and 0 where |g_s| ≤ δ_s,
    where the step's sign can flip) of |Σ_t step_t(g') − step_t(g)|, bounded step by step and
    summed over the steps. Elementwise, so this is exact over those points, not linearised: it
    holds where δ ≪ |g| (Adam's step barely moves) and where δ ≳ |g| (it can flip)."""
    import itertools

    grads = [g.double() for g in grads]
    base = adam_steps(grads, lr)
    worst = [torch.zeros_like(g) for g in grads]
    choices = [(-1.0, 0.0, 1.0, None)] * len(grads)
    for combo in itertools.product(*choices):
        trial = []
        for g, d, c in zip(grads, deltas, combo):
            trial.append(torch.where(g.abs() <= d, torch.zeros_like(g), g) if c is None else g + c * d)
        for t, step in enumerate(adam_steps(trial, lr)):
            worst[t] = torch.maximum(worst[t], (step - base[t]).abs())
    return sum(worst)


def capture_updates(monkeypatch, store: list) -> None:
    """Around every training step of the single-process run: the rule's update for each sample
    alone (same weights, same RNG state, nothing applied), then the batch update the step used."""
    from bench.algorithms.base import AlgorithmModule

    real = AlgorithmModule.training_step

    def capturing(self, batch, batch_idx):
        x, y = batch
        rng = torch.get_rng_state()
        per_sample = []
        for b in range(len(x)):
            for p in self.parameters():
                p.grad = None
            surrogate, _, _ = self.objective(x[b:b + 1], y[b:b + 1])
            if surrogate.requires_grad:
                surrogate.backward()
            self.after_backward()
            per_sample.append({n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None})
        for p in self.parameters():
            p.grad = None
        torch.set_rng_state(rng)
        out = real(self, batch, batch_idx)
        batch_update = {n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None}
        store.append((per_sample, batch_update))
        return out

    monkeypatch.setattr(AlgorithmModule, "training_step", capturing)


@pytest.mark.parametrize("rule", ADAM_RULES)
def test_ddp_adam_within_the_rounding_bound(rule, tmp_path, ddp_root, monkeypatch):
    """2 gloo ranks × batch 8 against 1 process × batch 16, Adam, 3 steps: every weight within the
    tolerance derived from float32 rounding and the gradients of this very run (no fixed number).

    The argument: DDP changes only the order of float32 sums, so each step's update differs by
    some δ with |δ| ≤ :func:`rounding_bound` (u = 2⁻²⁴ and the per-sample updates measured here).
    Adam maps the gradient sequence to lr·m̂/(√v̂ + ε) per element; :func:`adam_tolerance` takes the
    worst change of that map over gradients within δ of the measured ones, summed over the steps.
    Added: each side's own rounding of w − step and of the step. Not covered, and negligible here
    by the margins this test prints: a step's weight difference changing the next step's gradient
    (δ's effect on the weights, fed back through one more product)."""
    from bench.run.train import train

    store: list = []
    capture_updates(monkeypatch, store)
    cfg = rule_config(rule, "trainer.name=cpu", "data.batch_size=16", f"output.root={tmp_path}")
    single = train(cfg)
    assert single["status"] == "finished" and len(store) == 3
    (ddp_dir,) = run_dirs(ddp_root / rule)
    ddp_summary = json.loads((ddp_dir / "summary.json").read_text())
    assert ddp_summary["status"] == "finished" and ddp_summary["world_size"] == 2
    ddp, one = model_tensors(load_state(ddp_dir)), model_tensors(load_state(run_dirs(tmp_path)[0]))

    lr, layers = float(cfg.algorithm.lr), int(cfg.model.depth) + 1
    fan_in = max(int(cfg.model.width), *cfg.data.shape)
    report = []
    trained = [k for k in ddp if k in store[0][1]]  # Adam's parameters (buffers such as B follow from them)
    assert len(trained) >= 2 * layers
    for key in trained:
        per_step = [([s[key] for s in per_sample], batch[key]) for per_sample, batch in store]
        # the update is a batch mean of per-sample updates (what makes the rounding argument apply)
        for samples, batch in per_step:
            torch.testing.assert_close(torch.stack(samples).mean(0), batch, rtol=1e-4, atol=1e-7, msg=key)
        deltas = [rounding_bound(samples, layers, fan_in) for samples, _ in per_step]
        grads = [batch for _, batch in per_step]
        steps = adam_steps([g.double() for g in grads], lr)
        # plus each side's own float32 rounding: storing w − step (half an ulp ≤ u·|w| per step and
        # side) and computing the step (m, v, √, ÷ and two bias corrections: ≤ 8u relative)
        own = len(grads) * 2 * U * (one[key].double().abs() + len(grads) * lr) + 8 * U * sum(st.abs() for st in steps)
        tol = adam_tolerance(grads, deltas, lr) + own
        diff = (ddp[key] - one[key]).double().abs()
        report.append((key, diff.max().item(), tol.max().item(), (diff / tol.clamp_min(1e-30)).max().item()))
        worst = int((diff - tol).argmax())
        assert bool((diff <= tol).all()), (f"{rule}: {key} element {worst} differs by {diff.flatten()[worst]:.3g}, "
                                           f"beyond its rounding bound {tol.flatten()[worst]:.3g}")
        # the bound is informative: most elements are bound far below their 3-step movement (≈ 3·lr)
        assert float(tol.median()) < 1e-2 * lr, f"{rule}: {key} median tolerance {float(tol.median()):.3g}"
    print(rule, *(f"{k}: max diff {d:.2g}, max tol {t:.2g}, max diff/tol {r:.2g}" for k, d, t, r in report), sep="\n  ")
