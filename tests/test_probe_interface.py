"""The rule ↔ probe interface: AlgorithmModule.probe_requested and probe_step() (a ProbeStep with
the batch and the RNG state to replay), the only things the alignment probe reads from a rule."""
from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch

from bench.algorithms import RULES
from bench.algorithms.base import ProbeStep
from bench.callbacks import probe as probe_module
from bench.callbacks.probe import AlignmentProbe
from bench.models import create_model


def fa_with_dropout(small_cfg, *overrides):
    cfg = small_cfg("algorithm.name=fa", "data.shape=[6]", "data.num_classes=3", "model.depth=2",
                    "model.width=5", "model.dropout=0.5", *overrides)
    torch.manual_seed(0)
    return RULES.get("fa")(cfg, create_model(cfg.model, (6,), 3), 3, (6,))


def test_probe_step_holds_the_batch_and_replays_the_rng(small_cfg):
    module = fa_with_dropout(small_cfg)
    assert module.probe_requested is False
    with pytest.raises(RuntimeError, match="probed_objective"):
        module.probe_step()
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    torch.manual_seed(11)
    module.probed_objective(x, y)  # draws dropout masks from the global RNG
    after = torch.rand(5)
    step = module.probe_step()
    assert isinstance(step, ProbeStep) and step.x is x and step.y is y and step.cuda_rng is None
    torch.manual_seed(11)
    expected_first = torch.rand(5)
    torch.set_rng_state(step.cpu_rng)
    torch.rand(1)  # move the global RNG off the step's state
    before = torch.get_rng_state()
    with step.replayed_rng():
        assert torch.equal(torch.rand(5), expected_first)  # the state the step's forward started from
    assert torch.equal(torch.get_rng_state(), before)    # and the global stream is left as it was
    assert not torch.equal(after, expected_first)


def test_training_step_sets_probe_requested_on_the_schedule(small_cfg):
    module = fa_with_dropout(small_cfg, "probe.every=3")
    seen = []

    class Opt:
        def zero_grad(self, set_to_none=True):
            pass

        def step(self):
            seen.append(module.probe_requested)

    module.optimizers = lambda: Opt()
    module.manual_backward = lambda s: s.backward()
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    for step in range(7):
        module.trainer = SimpleNamespace(global_step=step)  # LightningModule.global_step reads it
        module.training_step((x, y), step)
        if module.probe_requested:  # a probed step leaves its batch for the probe
            assert module.probe_step().x is x
    assert seen == [True, False, False, True, False, False, True]


def test_probe_skips_unrequested_steps_and_measures_through_the_interface(small_cfg):
    module = fa_with_dropout(small_cfg, "probe.signals=true")
    probe = AlignmentProbe()
    trainer = SimpleNamespace(world_size=1, is_global_zero=True, loggers=[], current_epoch=0)
    module._probe_requested = False
    probe.on_before_optimizer_step(trainer, SimpleNamespace(probe_requested=False), None)
    assert probe.records == []
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    surrogate, _, _ = module.probed_objective(x, y)
    surrogate.backward()
    values = probe.measure(trainer, module)
    # the output layer's FA update is backprop's; the hidden ones are not
    assert values["align/update/net.7"] == pytest.approx(0.0, abs=1e-3)
    assert values["align/update/net.1"] > 1.0
    assert set(k.split("/")[1] for k in values) >= {"update", "ratio", "signal", "signal_cos", "wb"}
    # the probe reads no private attribute of the rule
    assert "pl_module._" not in inspect.getsource(probe_module)
