"""Latent layers of trained runs (bench/results/latents.py): the layer names a t-SNE figure or a
class-distance table can ask for, and the class distances (al Table 7) put into the table cells."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from bench.config import compose
from bench.metrics.class_distance import class_distances
from bench.models import MODELS
from bench.results import latents
from bench.results.table import aggregate
from bench.run.cells import Cell

TOY = ["algorithm.name=al", "model.name=al_mlp", "model.width=6", "model.bridge=10", "data.name=synthetic",
       "data.shape=[5]", "data.num_classes=3", "data.n_train=64", "data.n_test=16", "data.val_size=16",
       "data.batch_size=8", "probe.every=0", "output.progress=none"]


def toy(twin: bool = False):
    from bench.algorithms import RULES

    extra = ["algorithm.name=bp", "model.name=al_mlp_bp"] if twin else []
    cfg = compose(overrides=[*TOY, *extra])
    torch.manual_seed(0)
    model = MODELS.get("al_mlp_bp" if twin else "al_mlp")(input_shape=(5,), num_classes=3, width=6, bridge=10)
    return cfg, RULES.get(str(cfg.algorithm.name))(cfg, model, 3, (5,))


def batches(n: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 5, generator=g), torch.arange(n) % 3
    return [(x[:8], y[:8]), (x[8:], y[8:])], x, y


@pytest.mark.parametrize("twin", [False, True])
def test_named_layers_are_the_modules_they_say(twin):
    """input = x; output = the rule's prediction; b.-1 = the top bridge b_K(s_K) of the AL net and
    of its BP twin alike; f.1 = s_2; top = the input of the last nn.Linear."""
    _, module = toy(twin)
    net = module.model
    loader, x, y = batches()
    module.eval()
    with torch.no_grad():
        expected = {"input": x, "output": module.predict(x), "b.-1": net.top(net.encode(x)),
                    "f.1": net.f[1](net.f[0](x))}
    for layer, want in expected.items():
        got, labels = latents.layer_latents(module, loader, 100, layer)
        assert torch.allclose(torch.from_numpy(got), want.float(), atol=1e-6), layer
        assert labels.tolist() == y.tolist()
    assert latents.resolve_layer(net, "b.-1") is net.b[len(net.b) - 1]
    top, _ = latents.top_latents(module, loader, 5)
    assert top.shape == (5, 6)
    with pytest.raises(ValueError, match="no submodule"):
        latents.resolve_layer(net, "nope")
    with pytest.raises(ValueError, match="no index"):
        latents.resolve_layer(net, "f.7")


def test_class_distances_reach_the_table_cells(monkeypatch):
    """A table whose metric has class_distance: {layer, samples} gets latent/inter, latent/intra and
    latent/ratio of that layer, on the first `samples` test samples, in every finished cell."""
    cfg, module = toy()
    loader, x, y = batches()

    class DM:
        def test_dataloader(self):
            return loader

    monkeypatch.setattr(latents, "load_trained", lambda run_dir: (module, DM()))
    table = OmegaConf.create({
        "id": "t", "title": "t", "columns": {"c": {}}, "rows": {"r": {}},
        "metric": {"fields": {"inter": "latent/inter", "intra": "latent/intra", "ratio": "latent/ratio"},
                   "class_distance": {"layer": "b.-1", "samples": 9}}})
    cells = [Cell("r", "c", 0, cfg=cfg, status="finished", summary={"final": {"test/acc1": 50.0}}),
             Cell("r", "c", 1, cfg=cfg, status="failed")]
    latents.add_class_distances(table, cells)
    module.eval()
    with torch.no_grad():
        want = class_distances(module.model.top(module.model.encode(x[:9])), y[:9])
    got = {r["field"]: r["measured_mean"] for r in aggregate(table, cells)}
    assert got == pytest.approx({k: want[k] for k in ("inter", "intra", "ratio")}, rel=1e-5)
    assert cells[0].summary["final"]["test/acc1"] == 50.0 and cells[1].summary == {}
    # the output layer differs from the bridge's: the layer named is the layer measured
    table.metric.class_distance.layer = "output"
    latents.add_class_distances(table, cells)
    assert cells[0].summary["final"]["latent/inter"] != pytest.approx(want["inter"], rel=1e-3)
