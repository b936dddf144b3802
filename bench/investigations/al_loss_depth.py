"""Why al-5's associated losses rise with the component index here, where the paper's fall.

Kao & Chen, "Associated Learning: Decomposing End-to-end Backpropagation Based on Autoencoders and
Target Propagation" (Neural Computation 2021, arXiv:1906.05560), Table 5: after 200 MNIST epochs
the associated loss ‖b_i(s_i) − t_i‖² of a 3-component MLP is 1.2e-5, 3.8e-7 and 6.7e-10 for
i = 1, 2, 3. At al-5's short budget (3 epochs of 20,000 Fashion-MNIST images) ours is 4.5e-3,
5.1e-3 and 6.9e-3.

An associated loss is small either because the bridge fits the target well or because the target
hardly varies: t_i = g_i(t_{i−1}) is a stack of sigmoid encoders of the one-hot label, and a
deeper code can shrink towards a constant. This trains al-5's 3-component net longer and records,
per epoch and per component, the associated loss next to the target's own variance Var(t_i) (the
MSE of the best constant guess, over a fixed batch of training images) and their ratio, the
fraction of the target's variance the bridge leaves unexplained.

    python -m bench.investigations.al_loss_depth [--epochs 12] [--subset 20000]
"""
from __future__ import annotations

import argparse
import time

import torch

from bench.algorithms import RULES
from bench.algorithms.associated import make_optimizer
from bench.config import compose
from bench.data import create_datamodule
from bench.investigations.common import validation_error, write_report
from bench.models import create_model

PROTOCOL = ["model.name=al_mlp", "model.width=1024", "model.bridge=5120", "model.components=3",
            "algorithm.name=al", "algorithm.optimizer=adam", "algorithm.lr=1e-4", "data.name=fmnist",
            "data.batch_size=32", "data.val_size=2000", "data.normalize=none", "seed=0"]


def target_statistics(module, x: torch.Tensor, y: torch.Tensor) -> list[dict]:
    """Per component on a fixed batch: associated loss, Var(t_i) (mean over units of the variance
    over samples) and the mean distance between class centroids of t_i."""
    net, out = module.model, []
    with torch.no_grad():
        s, t = x, module.onehot(y).to(x.dtype)
        for i in range(net.K):
            s, t, assoc, _ = net.component_losses(i, s, t)
            centroids = torch.stack([t[y == c].mean(0) for c in y.unique()])
            out.append({"assoc": float(assoc), "var": float(t.var(0, unbiased=False).mean()),
                        "centroid_distance": float(torch.pdist(centroids).mean())})
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--subset", type=int, default=20000)
    p.add_argument("--out", default="results/investigations/al-loss-depth.md")
    a = p.parse_args(argv)
    began = time.time()
    cfg = compose(overrides=[*PROTOCOL, f"data.train_subset={a.subset}"])
    torch.manual_seed(int(cfg.seed))
    data = create_datamodule(cfg.data, int(cfg.seed))
    data.setup("fit")
    shape = tuple(data.input_shape)
    module = RULES.get("al")(cfg, create_model(cfg.model, shape, data.num_classes), data.num_classes, shape)
    net = module.model
    optimizer = make_optimizer(net, module.opts)  # the rule's own groups: g, h at 2x the forward lr
    probe_x, probe_y = [], []
    for xb, yb in data.train_dataloader():  # a fixed 2,048-image batch of training images
        probe_x.append(xb)
        probe_y.append(yb)
        if sum(len(b) for b in probe_y) >= 2048:
            break
    probe_x, probe_y = torch.cat(probe_x), torch.cat(probe_y)
    rows = [("init", target_statistics(module, probe_x, probe_y), float("nan"))]
    for epoch in range(1, a.epochs + 1):
        for x, y in data.train_dataloader():
            optimizer.zero_grad(set_to_none=True)
            surrogate, _, _ = module.objective(x, y)
            surrogate.backward()
            optimizer.step()
        err = validation_error(module, data.val_dataloader())
        rows.append((str(epoch), target_statistics(module, probe_x, probe_y), err))
        print(f"epoch {epoch}: val err {err:.2f} %  " + "  ".join(
            f"A{i + 1} {c['assoc']:.2e} var {c['var']:.2e}" for i, c in enumerate(rows[-1][1])), flush=True)
    K = net.K
    head = ("| epoch | val err % | " + " | ".join(f"assoc {i}" for i in range(1, K + 1)) + " | "
            + " | ".join(f"Var(t_{i})" for i in range(1, K + 1)) + " | "
            + " | ".join(f"assoc {i} / Var(t_{i})" for i in range(1, K + 1)) + " | "
            + " | ".join(f"centroid dist t_{i}" for i in range(1, K + 1)) + " |")
    lines = ["# Associated Learning: the associated loss against the component index, and the targets' own spread", "",
             f"`python -m bench.investigations.al_loss_depth --epochs {a.epochs} --subset {a.subset}` (al-5's "
             f"3-component MLP: s_i, t_i of 1024 units, bridges 5120; Adam 1e-4, g/h at 2x; batch 32; Fashion-MNIST, "
             f"{a.subset} training images, seed 0; {time.time() - began:.0f} s on {torch.get_num_threads()} threads). "
             "Statistics on a fixed batch of 2,048 training images after each epoch.", "",
             head, "|---|---|" + "---|" * (4 * K)]
    for label, stats, err in rows:
        lines.append(f"| {label} | {'–' if err != err else f'{err:.2f}'} | "
                     + " | ".join(f"{c['assoc']:.2e}" for c in stats) + " | "
                     + " | ".join(f"{c['var']:.2e}" for c in stats) + " | "
                     + " | ".join(f"{c['assoc'] / c['var']:.3f}" for c in stats) + " | "
                     + " | ".join(f"{c['centroid_distance']:.3g}" for c in stats) + " |")
    write_report(a.out, lines)


if __name__ == "__main__":
    main()
