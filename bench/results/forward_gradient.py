"""grape-fig2 (GrAPE Figure 2): cosine between the forward gradient and the true gradient of the
first layer, against the batch size, for networks of several depths and several JVPs per batch.

Computed, not trained: each point draws a network at initialisation (the zoo MLP of the table's
config) and a batch of the suite's synthetic class-conditional Gaussians, then compares

  * the true gradient ∂L/∂W¹ of the batch loss (backprop), with
  * its activity-perturbed forward-gradient estimate (bench/feedback/forward_gradient.py): the
    estimate ĝ¹ of ∂L/∂h¹ at the first hidden layer, averaged over the batch's JVPs, mapped to the
    weights by the layer's own local derivative, Σ_b (ĝ¹_b ⊙ φ′(a¹_b)) x_bᵀ.

Rows set ``data.batch_size`` (the x axis); columns set ``algorithm.jvps`` (the paper's
"iterations", one line each); the table's metric fields are the depths (one panel each, value =
the number of hidden layers). Each cell is the mean ± std over the budget's ``seeds`` draws.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from bench.results.computed import COMPUTED, _record


def first_layer_cosine(model, x: torch.Tensor, y: torch.Tensor, jvps: int, seed: int) -> float:
    from bench.feedback.forward_gradient import estimate_activity_gradients
    from bench.feedback.noise import SharedNoise

    names = model.feedback_points("micro")
    first = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][0]
    modules = dict(model.named_modules())
    held = []
    handle = modules[names[0]].register_forward_hook(lambda m, i, o: held.append(o))
    logits = model(x)
    handle.remove()
    true = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), first.weight)[0]
    h1 = held[0].detach()
    (g1, *_) = estimate_activity_gradients(model, names, x, y, lambda z, t: F.cross_entropy(z, t),
                                           SharedNoise(seed), jvps=jvps)
    inputs = x.reshape(x.shape[0], -1)
    estimate = (g1 * (1 - h1 ** 2)).t().mm(inputs)  # tanh′(a¹) = 1 − h¹²
    a, b = estimate.reshape(-1).double(), true.reshape(-1).double()
    return float(a.dot(b) / (a.norm() * b.norm()))


@COMPUTED.register("forward_gradient_cosine")
def forward_gradient_cosine_table(table: DictConfig, budget: str = "full") -> list[dict]:
    from bench.config import compose, table_budget
    from bench.data.synthetic import make_synthetic
    from bench.models import create_model

    records = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for row in table.rows:
            for column in table.columns:
                _, scalars = table_budget(table, budget, table.rows[row])
                for field, depth in table.metric.fields.items():
                    cfg = compose(table.id, row, column, budget, [f"model.depth={int(depth)}"])
                    batch, jvps = int(cfg.data.batch_size), int(cfg.algorithm.jvps)
                    values = []
                    for seed in range(int(scalars.get("seeds", 1))):
                        torch.manual_seed(seed)
                        shape, classes = tuple(cfg.data.shape), int(cfg.data.num_classes)
                        model = create_model(cfg.model, shape, classes)
                        data = make_synthetic(OmegaConf.merge(cfg.data, {"n_train": batch}), seed)
                        values.append(first_layer_cosine(model, data.train_x[:batch], data.train_y[:batch], jvps,
                                                         1000 * seed + 17))
                    paper = OmegaConf.select(OmegaConf.create(table.rows[row].get("paper") or {}), f"{column}.{field}",
                                             default=None)
                    records.append(_record(row, column, str(field), values, paper))
    finally:
        torch.set_num_threads(threads)
    return records
