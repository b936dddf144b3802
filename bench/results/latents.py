"""The top latent layer of trained runs, and its t-SNE map (rlra Figure 7).

rlra Figure 7 shows t-SNE embeddings (perplexity 30) of "the top-most latent representations"
of the CIFAR-10 ResNets trained by backprop and by rec-LRA. Here the top latent layer of any zoo
model is the input of its last ``nn.Linear`` (the classifier), captured with a forward hook, so the
same code serves MLPs, CNNs, ResNets and the transformer. Each finished run is rebuilt from its
own ``config.yaml`` and ``last.ckpt``; nothing is retrained.

Besides the picture, the figure table reports two numbers per run that say how well the latent
space separates classes, so a reproduction can be checked without looking at the picture:
the silhouette score of the latents by true class (in the latent space itself, not in the t-SNE
map, whose distances are not meaningful) and the accuracy of a 5-nearest-neighbour classifier
in the latent space (half the samples predict the other half).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from bench.config import run_name
from bench.metrics.separation import separation_scores


def top_layer(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier; its top latent layer is undefined")
    return linears[-1]


@torch.no_grad()
def top_latents(module, loader, max_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(latents, labels) for the first ``max_samples`` samples of ``loader``, in eval mode."""
    captured: list[torch.Tensor] = []
    handle = top_layer(module.model).register_forward_hook(lambda m, inp, out: captured.append(inp[0].detach()))
    feats, labels, seen = [], [], 0
    was_training = module.training
    module.eval()
    try:
        for x, y in loader:
            captured.clear()
            module.predict(x)
            z = captured[-1].reshape(x.shape[0], -1) if captured[-1].shape[0] == x.shape[0] else captured[-1]
            feats.append(z.float().cpu())
            labels.append(y.reshape(-1).cpu())
            seen += x.shape[0]
            if seen >= max_samples:
                break
    finally:
        handle.remove()
        module.train(was_training)
    return torch.cat(feats)[:max_samples].numpy(), torch.cat(labels)[:max_samples].numpy()


def load_trained(run_dir: Path):
    """Rebuild a finished run's rule module and datamodule from its folder."""
    from bench.algorithms import RULES
    from bench.data import create_datamodule
    from bench.models import create_model

    cfg = OmegaConf.load(run_dir / "config.yaml")
    dm = create_datamodule(cfg.data, seed=int(cfg.seed))
    dm.prepare_data()
    dm.setup("test")
    model = create_model(cfg.model, dm.input_shape, dm.num_classes)
    module = RULES.get(str(cfg.algorithm.name))(cfg, model, dm.num_classes, dm.input_shape)
    from bench.checkpoint import load_checkpoint

    state = load_checkpoint(run_dir / "last.ckpt")["state_dict"]  # weights_only: a checkpoint never runs code
    module.load_state_dict(state, strict=False)
    return module, dm


def tsne(latents: np.ndarray, perplexity: float, iterations: int, seed: int) -> np.ndarray:
    from sklearn.manifold import TSNE

    return TSNE(n_components=2, perplexity=min(perplexity, (len(latents) - 1) / 3), max_iter=iterations,
                init="pca", random_state=seed).fit_transform(latents)


def tsne_figure(table: DictConfig, cells: list, path: Path) -> tuple[Path, list[dict], list[int]]:
    """One t-SNE panel per finished cell (rows × columns, first seed), coloured by true class.
    Returns the PNG path, one record per (cell, score) and the number of classes drawn per panel."""
    from bench.results import plots

    plt = plots.pyplot()
    spec = table.figure
    n = int(spec.get("samples", 2000))
    perplexity, iterations = float(spec.get("perplexity", 30)), int(spec.get("iterations", 250))
    done = [c for c in cells if c.status == "finished" and c.seed == min(x.seed for x in cells)]
    fig, axes = plt.subplots(1, max(1, len(done)), figsize=(4.2 * max(1, len(done)), 4.0), squeeze=False)
    records, classes_drawn = [], []
    for ax, cell in zip(axes[0], done):
        run_dir = Path(cell.cfg.output.root) / run_name(cell.cfg)
        module, dm = load_trained(run_dir)
        latents, labels = top_latents(module, dm.test_dataloader(), n)
        scores = separation_scores(latents, labels)
        xy = tsne(latents, perplexity, iterations, seed=int(cell.seed))
        drawn = sorted(set(labels.tolist()))
        for cls in drawn:
            sel = labels == cls
            ax.scatter(xy[sel, 0], xy[sel, 1], s=3, label=str(cls))
        classes_drawn.append(len(drawn))
        ax.set_title(f"{cell.row} / {cell.column}\nsilhouette {scores['silhouette']:.3f}, "
                     f"5-NN {scores['knn_acc']:.1f}%", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        records.append({"row": cell.row, "column": cell.column, "seed": cell.seed, "samples": len(labels), **scores})
    if done:
        axes[0][-1].legend(markerscale=4, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), title="class")
    fig.suptitle(f"{table.id}: t-SNE of the top latent layer (perplexity {perplexity:g}, {iterations} iterations)",
                 fontsize=10)
    plots.annotate(fig, plots.cells_provenance(table, cells))
    return plots.save(fig, path, dpi=110), records, classes_drawn
