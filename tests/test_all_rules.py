"""Checks every registered rule gets without anyone listing it (issue 16 §5).

Parametrized over ``RULES.names()`` and ``MODELS.names()``: registering a rule (one file in
bench/algorithms/, one config delta) is all it takes to get

* a one-step run on a small instance of every zoo model, through Lightning with the rule's own
  hooks: the rule either trains (finite loss; every parameter it hands the optimizer gets a finite
  ``.grad``; every parameter with a non-zero update moves; the update reaches the model's first
  and last weight tensors) or refuses the model at build time with one line (a ``ConfigError``
  or the rule's ``ValueError``). Anything else fails. The support matrix this discovers is
  printed at the end of the session (``conftest.pytest_terminal_summary``);
* kill-and-resume equality on the MLP: two epochs straight against one epoch, a kill, and the
  same command again; every tensor of the final checkpoint compared exactly;
* an alignment-probe run on the MLP (``probe.every=1``) whose angles are finite and in [0°, 180°];
* a bad value for one of the rule's own declared options through ``python -m bench run``'s
  entry point: exit status 2 and one line on stderr.

"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from bench import cli, options
from bench.algorithms import RULES
from bench.config import ConfigError, compose
from bench.models import MODELS, create_model
from bench.results.io import read_csv
from bench.run.recorder import RunRecorder
from bench.run.train import train
from conftest import SMALL as SMALL_RUN
from conftest import one_run_dir
from test_options import bad_value

REPO = Path(__file__).resolve().parent.parent

# A small instance of the zoo's model families: (model overrides, input shape, classes). Token
# models (``input_dtype = torch.long``) read the shape as (sequence length,) and classes as the
# vocabulary. Every other registered model is built as tests/test_models.py builds it (its first
# SMALL variant, else no options on 3×32×32 with 10 classes) and marked slow.
SMALL: dict[str, tuple[list[str], tuple[int, ...], int]] = {
    "mlp": (["model.depth=2", "model.width=8"], (12,), 3),
    "cnn": (["model.channels=[4,4]", "model.kernel=3", "model.hidden=[8]"], (3, 8, 8), 3),
    "lcnet": (["model.channels=[4,4]", "model.kernel=[3,3]", "model.stride=[2,1]"], (3, 8, 8), 3),
    "timm:resnet18": (["model.cifar_stem=true"], (3, 8, 8), 3),
    "transformer": (["model.n_layer=1", "model.n_head=2", "model.n_embd=16"], (8,), 11),
}
SLOW_MODELS = {"timm:resnet18"}  # ~2 s a step (11M parameters) on 2 busy cores
# Real bugs the generated checks found, not fixed here (the rule's owner fixes them; strict xfail
# turns into a failure the day they are fixed, so this list cannot go stale).
KNOWN_BUGS = {
    ("lra_e", "timm:resnet18"): "lra_e on a ResNet: the pairwise error signal is exactly 0 in float32 below "
                                "the 10th error unit, so the stem and the first stages never get an update",
}


def recipe(model: str) -> tuple[list[str], tuple[int, ...], int]:
    if model in SMALL:
        return SMALL[model]
    from test_models import SMALL as MODEL_VARIANTS

    _, shape, classes, opts = MODEL_VARIANTS.get(model, [("default", (3, 32, 32), 10, {})])[0]
    return [f"model.{k}={json.dumps(v)}" for k, v in opts.items()], tuple(shape), classes


DISCOVERED: dict[tuple[str, str], str] = {}  # (rule, model) -> "trains" | "refuses: <line>"; printed by conftest


def _param(rule: str, model: str):
    marks = []
    if model not in SMALL or model in SLOW_MODELS:
        marks.append(pytest.mark.slow)
    if (rule, model) in KNOWN_BUGS:
        marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[rule, model]))
    return pytest.param(rule, model, marks=marks, id=f"{rule}-{model}")


def small_config(rule: str, model: str, *extra: str):
    overrides, shape, classes = recipe(model)
    return compose(overrides=["data.name=synthetic", f"data.shape=[{','.join(map(str, shape))}]",
                              f"data.num_classes={classes}", "probe.every=0", "output.progress=none",
                              "trainer.max_steps=1", f"algorithm.name={rule}", f"model.name={model}", *overrides,
                              # Adam's first step moves every element with a non-zero update by ≈ lr
                              "algorithm.optimizer=adam", "algorithm.lr=0.001", "algorithm.weight_decay=0.0",
                              *extra])


def build(rule: str, model: str):
    """(module, input shape, classes), or the refusal: compose and the rule's constructor may refuse."""
    cfg = small_config(rule, model)
    _, shape, classes = recipe(model)
    torch.manual_seed(0)
    net = create_model(cfg.model, shape, classes)
    return RULES.get(rule)(cfg, net, classes, shape), shape, classes


def batch(module, shape, classes, n=4):
    g = torch.Generator().manual_seed(1)
    if getattr(module.model, "input_dtype", torch.float32) == torch.long:  # a language model: ids in, ids out
        return torch.randint(0, classes, (n, *shape), generator=g), torch.randint(0, classes, (n, *shape), generator=g)
    return torch.randn(n, *shape, generator=g), torch.arange(n) % classes


def one_lightning_step(module, x, y):
    """One step through a Lightning Trainer (the rule's hooks in Lightning's order). Returns the
    loss and every optimizer parameter's .grad as the optimizer receives it."""
    import lightning as L

    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    grads: dict[str, torch.Tensor | None] = {}
    losses: list[torch.Tensor] = []

    class Capture(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.update({n: None if p.grad is None else p.grad.detach().clone() for n, p in params.items()})

    objective = module.objective

    def recording(xb, yb):
        surrogate, logits, loss = objective(xb, yb)
        losses.append(loss.detach())
        return surrogate, logits, loss

    module.objective = recording
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[Capture()])
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=len(x)))
    assert len(losses) == 1 and trainer.global_step == 1
    return losses[0], params, grads


@pytest.fixture(scope="module", autouse=True)
def _quiet_and_one_thread(one_thread):
    """Tiny steps: one torch thread (conftest.one_thread), and Lightning's advice silenced."""
    from bench.run.train import quiet_lightning

    quiet_lightning()


@pytest.mark.parametrize("rule, model", [_param(r, m) for r in RULES.names() for m in MODELS.names()])
def test_rule_trains_one_step_or_refuses_in_one_line(rule, model):
    try:
        module, shape, classes = build(rule, model)
    except (ConfigError, ValueError) as exc:  # the rule (or its options' check) refuses this model
        message = str(exc)
        assert message and "\n" not in message, f"{rule} on {model}: a refusal must be one line: {message!r}"
        DISCOVERED[rule, model] = f"refuses: {type(exc).__name__}: {message}"
        return
    x, y = batch(module, shape, classes)
    weights = [n for n, p in module.model.named_parameters() if p.requires_grad and p.ndim >= 2]
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    loss, params, grads = one_lightning_step(module, x, y)
    assert torch.isfinite(loss), f"{rule} on {model}: loss {float(loss)}"
    assert params, f"{rule} on {model}: the optimizer has no parameters"
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, f"{rule} on {model}: parameters handed to the optimizer without a .grad: {missing}"
    bad = [n for n, g in grads.items() if not torch.isfinite(g).all()]
    assert not bad, f"{rule} on {model}: non-finite .grad in {bad}"
    for n, p in module.named_parameters():
        assert torch.isfinite(p).all(), f"{rule} on {model}: {n} is not finite after the step"
    still = [n for n, g in grads.items() if g.abs().max() > 0 and torch.equal(params[n].detach(), before[n])]
    assert not still, f"{rule} on {model}: a non-zero update did not move {still}"
    # the update reaches both ends of the network (a rule that trains only the head fails here)
    for end in (weights[0], weights[-1]):
        assert float(grads[f"model.{end}"].abs().max()) > 0, f"{rule} on {model}: no update reaches {end}"
    DISCOVERED[rule, model] = "trains"


def test_a_crash_that_is_not_a_refusal_fails_the_matrix(monkeypatch):
    """The matrix must fail on a rule that neither trains nor refuses cleanly: a build error of
    another type, or a refusal spread over lines, is not a refusal."""
    cls = RULES.get("bp")
    monkeypatch.setattr(cls, "setup_rule", lambda self: (_ for _ in ()).throw(KeyError("boom")))
    with pytest.raises(KeyError):
        test_rule_trains_one_step_or_refuses_in_one_line("bp", "mlp")
    monkeypatch.setattr(cls, "setup_rule", lambda self: (_ for _ in ()).throw(ValueError("line 1\nline 2")))
    with pytest.raises(AssertionError, match="must be one line"):
        test_rule_trains_one_step_or_refuses_in_one_line("bp", "mlp")
    monkeypatch.setattr(cls, "after_backward", lambda self: [p.grad.zero_() for p in self.model.parameters()])
    monkeypatch.setattr(cls, "setup_rule", lambda self: None)
    with pytest.raises(AssertionError, match="no update reaches"):
        test_rule_trains_one_step_or_refuses_in_one_line("bp", "mlp")
    DISCOVERED.pop(("bp", "mlp"), None)  # the real entry comes from the real test


# ----------------------------------------------------------------------------- runs through train()

@functools.lru_cache(maxsize=None)
def home(rule: str) -> str:
    """Where a rule's runs are checked: the MLP, or for a rule that refuses it the first model of
    SMALL, then of the zoo, that it builds on."""
    for model in [*SMALL, *(m for m in MODELS.names() if m not in SMALL)]:
        try:
            build(rule, model)
        except (ConfigError, ValueError):
            continue
        return model
    raise AssertionError(f"{rule} refuses every zoo model")


def run_overrides(rule: str, *extra: str) -> list[str]:
    overrides, shape, classes = recipe(home(rule))
    base = [o for o in SMALL_RUN if not o.startswith(("model.", "data.shape=", "data.num_classes="))]
    return [*base, f"data.shape=[{','.join(map(str, shape))}]", f"data.num_classes={classes}",
            f"model.name={home(rule)}", *overrides, f"algorithm.name={rule}", *extra]


RESUME = ["data.n_train=96", "data.val_size=16", "data.n_test=16", "trainer.max_steps=-1", "trainer.epochs=2",
          "trainer.threads=1", "algorithm.optimizer=adam", "seed=5"]


class Killed(SystemExit):
    """Stands in for SIGKILL right after an epoch's checkpoint (a SystemExit, like Lightning's
    SIGTERM exception: the recorder leaves the run "running", not "failed")."""


def _comparable(ckpt: dict) -> dict:
    # callbacks hold wall-clock times (the timer) and metric rows with them; compared apart
    return {k: v for k, v in ckpt.items() if k not in ("callbacks",)}


def assert_same(a, b, where="checkpoint"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same(u, v, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _ckpt(run_dir: Path) -> dict:
    return torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)


def _rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "mem/"))} for r in read_csv(run_dir / "metrics.csv")]


def _run_cases():
    """Rules whose runs go on a model outside SMALL (full-size defaults) are slow."""
    return [r if home(r) in SMALL and home(r) not in SLOW_MODELS else pytest.param(r, marks=pytest.mark.slow)
            for r in RULES.names()]


@pytest.mark.parametrize("rule", _run_cases())
def test_kill_after_epoch_1_and_resume_equals_two_epochs_straight(rule, tmp_path, monkeypatch):
    straight = train(compose(overrides=run_overrides(rule, *RESUME, f"output.root={tmp_path / 'a'}")))
    assert straight["status"] == "finished" and straight["epochs_done"] == 2

    cfg = compose(overrides=run_overrides(rule, *RESUME, f"output.root={tmp_path / 'b'}"))
    original = RunRecorder.on_train_epoch_end

    def killed_after_first_checkpoint(self, trainer, pl_module):
        original(self, trainer, pl_module)
        if trainer.current_epoch == 0:
            raise Killed(137)

    monkeypatch.setattr(RunRecorder, "on_train_epoch_end", killed_after_first_checkpoint)
    with pytest.raises(Killed):
        train(cfg)
    run_b = one_run_dir(tmp_path / "b")
    assert json.loads((run_b / "summary.json").read_text())["epochs_done"] == 1
    first = _ckpt(run_b)
    assert first["epoch"] == 0 and first["global_step"] > 0
    monkeypatch.setattr(RunRecorder, "on_train_epoch_end", original)
    resumed = train(cfg)
    assert resumed["status"] == "finished" and resumed["epochs_done"] == 2

    run_a = one_run_dir(tmp_path / "a")
    a, b = _ckpt(run_a), _ckpt(run_b)
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]) == (1, 2 * first["global_step"])
    assert_same(_comparable(a), _comparable(b))
    assert _rows(run_a) == _rows(run_b) and len(_rows(run_a)) == 2
    assert resumed["final"] == straight["final"]


@pytest.mark.parametrize("rule", _run_cases())
def test_probe_every_step_gives_finite_angles(rule, tmp_path):
    summary = train(compose(overrides=run_overrides(rule, "probe.every=1", "trainer.max_steps=2", f"output.root={tmp_path}")))
    assert summary["status"] == "finished"
    rows = read_csv(one_run_dir(tmp_path) / "probe.csv")
    assert [int(r["step"]) for r in rows] == [0, 1]
    for row in rows:
        angles = {k: float(v) for k, v in row.items() if k.startswith("align/update/") and v != ""}
        if home(rule) == "mlp":  # one update angle per weight layer of the 12 → 8 → 8 → 3 MLP
            assert sorted(angles) == ["align/update/net.1", "align/update/net.3", "align/update/net.5"], sorted(row)
        assert angles, sorted(row)
        values = {k: float(v) for k, v in row.items() if k.startswith("align/") and v != ""}
        assert all(math.isfinite(v) for v in values.values()), values
        for k, v in values.items():
            if k.startswith(("align/update/", "align/signal/", "align/wb/")):
                assert 0.0 <= v <= 180.0, (k, v)


def own_option(rule: str) -> str:
    """The first option the rule declares itself, or a shared one when it declares none."""
    shared = options.AlgorithmOptions.specs()
    own = [k for k in options.declared("algorithm", rule).specs() if k not in shared]
    return own[0] if own else "lr"


@pytest.mark.parametrize("rule", RULES.names())
def test_bad_value_of_an_own_option_is_one_line_and_exit_2(rule, tmp_path, capsys):
    key = own_option(rule)
    spec = options.declared("algorithm", rule).specs()[key]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", f"algorithm.name={rule}", f"algorithm.{key}={bad_value(spec)}", f"output.root={tmp_path}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and err.startswith(f"error: algorithm.{key}=") and "is not valid" in err, err
    assert not list(tmp_path.iterdir())  # refused before anything was built


# ----------------------------------------------------------------------------- tests mirror rule files

def test_every_rule_file_has_its_test_file():
    families = sorted(p.stem for p in (REPO / "bench" / "algorithms").glob("*.py") if p.stem not in ("__init__", "base"))
    assert len(families) >= 9
    missing = [f"tests/test_{f}.py" for f in families if not (REPO / "tests" / f"test_{f}.py").exists()]
    assert not missing, f"test files mirror rule files: add {missing}"
