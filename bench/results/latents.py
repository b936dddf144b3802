"""The latent layers of trained runs: their t-SNE maps (rlra Figure 7, al Figures 5 and 6) and
their inter-/intra-class distances (al Table 7).

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

A figure or table may name other layers (:func:`layer_latents`): ``input`` (the raw input),
``output`` (what the rule predicts with), ``top`` (the default above) or a dotted module path of
the model, whose output is taken (``f.1``, ``b.-1``: negative indices count from the end, so
``b.-1`` is the top bridge of an AL model and of its BP twin alike). A table whose ``metric`` has
a ``class_distance:`` block (``layer``, ``samples``) gets, for every finished run, the inter- and
intra-class distances of that layer on the test samples (bench/metrics/class_distance.py) as the
summary fields ``latent/inter``, ``latent/intra`` and ``latent/ratio`` (:func:`add_class_distances`).
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


def resolve_layer(model: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted ``path``; integer parts index containers, negative ones from the end."""
    m = model
    for part in path.split("."):
        if part.lstrip("-").isdigit():
            children = list(m.children())
            index = int(part)
            if not -len(children) <= index < len(children):
                raise ValueError(f"layer {path!r}: {type(m).__name__} has {len(children)} children, no index {index}")
            m = children[index]
        elif hasattr(m, part) and isinstance(getattr(m, part), nn.Module):
            m = getattr(m, part)
        else:
            names = ", ".join(n for n, _ in m.named_children())
            raise ValueError(f"layer {path!r}: {type(m).__name__} has no submodule {part!r} (children: {names})")
    return m


@torch.no_grad()
def layer_latents(module, loader, max_samples: int, layer: str = "top") -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of ``layer`` (see the module docstring) for the first ``max_samples``
    samples of ``loader``, in eval mode, each sample's features flattened."""
    captured: list[torch.Tensor] = []
    handle = None
    if layer == "top":
        handle = top_layer(module.model).register_forward_hook(lambda m, inp, out: captured.append(inp[0].detach()))
    elif layer not in ("input", "output"):
        handle = resolve_layer(module.model, layer).register_forward_hook(lambda m, inp, out: captured.append(out.detach()))
    feats, labels, seen = [], [], 0
    was_training = module.training
    module.eval()
    try:
        for x, y in loader:
            captured.clear()
            out = module.predict(x)
            z = {"input": x, "output": out}.get(layer, captured[-1] if captured else None)
            z = z.reshape(x.shape[0], -1) if z.shape[0] == x.shape[0] else z
            feats.append(z.float().cpu())
            labels.append(y.reshape(-1).cpu())
            seen += x.shape[0]
            if seen >= max_samples:
                break
    finally:
        if handle is not None:
            handle.remove()
        module.train(was_training)
    return torch.cat(feats)[:max_samples].numpy(), torch.cat(labels)[:max_samples].numpy()


def top_latents(module, loader, max_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(latents, labels) of the top latent layer (the input of the last ``nn.Linear``)."""
    return layer_latents(module, loader, max_samples, "top")


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
    """One t-SNE panel per finished cell (rows × columns, first seed) and layer, coloured by true
    class: the figure's ``layers`` (default ``[top]``) run left to right, one line per cell when
    there are several. Returns the PNG path, one record per (cell, layer, score) and the number
    of classes drawn per panel."""
    from bench.results import plots

    plt = plots.pyplot()
    spec = table.figure
    n = int(spec.get("samples", 2000))
    perplexity, iterations = float(spec.get("perplexity", 30)), int(spec.get("iterations", 250))
    layers = [str(v) for v in (spec.get("layers") or ["top"])]
    named = spec.get("layers") is not None
    done = [c for c in cells if c.status == "finished" and c.seed == min(x.seed for x in cells)]
    if named:  # one line of panels per cell, one panel per layer
        shape = (max(1, len(done)), len(layers))
        slots = [(cell, layer, (i, j)) for i, cell in enumerate(done) for j, layer in enumerate(layers)]
    else:
        shape = (1, max(1, len(done)))
        slots = [(cell, layers[0], (0, j)) for j, cell in enumerate(done)]
    fig, axes = plt.subplots(*shape, figsize=(4.2 * shape[1], 4.0 * shape[0]), squeeze=False)
    records, classes_drawn, loaded = [], [], {}
    for cell, layer, (i, j) in slots:
        ax = axes[i][j]
        if id(cell) not in loaded:
            loaded[id(cell)] = load_trained(Path(cell.cfg.output.root) / run_name(cell.cfg))
        module, dm = loaded[id(cell)]
        latents, labels = layer_latents(module, dm.test_dataloader(), n, layer)
        scores = separation_scores(latents, labels)
        xy = tsne(latents, perplexity, iterations, seed=int(cell.seed))
        drawn = sorted(set(labels.tolist()))
        for cls in drawn:
            sel = labels == cls
            ax.scatter(xy[sel, 0], xy[sel, 1], s=3, label=str(cls))
        classes_drawn.append(len(drawn))
        where = f"{cell.row} / {cell.column}" + (f" / {layer}" if named else "")
        ax.set_title(f"{where}\nsilhouette {scores['silhouette']:.3f}, "
                     f"5-NN {scores['knn_acc']:.1f}%", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        records.append({"row": cell.row, "column": cell.column, **({"layer": layer} if named else {}),
                        "seed": cell.seed, "samples": len(labels), **scores})
    if done:
        axes[0][-1].legend(markerscale=4, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), title="class")
    what = f"the layers {', '.join(layers)}" if named else "the top latent layer"
    fig.suptitle(f"{table.id}: t-SNE of {what} (perplexity {perplexity:g}, {iterations} iterations)",
                 fontsize=10)
    plots.annotate(fig, plots.cells_provenance(table, cells))
    return plots.save(fig, path, dpi=110), records, classes_drawn


CLASS_DISTANCE_FIELDS = ("inter", "intra", "ratio")


def add_class_distances(table: DictConfig, cells: list) -> None:
    """For a table whose ``metric`` has a ``class_distance:`` block (``layer``, default ``top``; ``samples``,
    default 10000), put the inter- and intra-class distances of that layer over the first
    ``samples`` test samples of every finished cell into its summary's ``final`` values as
    ``latent/inter``, ``latent/intra`` and ``latent/ratio`` (in memory; nothing is written to the
    run folder), so the table's ``metric.fields`` can name them."""
    from bench.metrics.class_distance import class_distances

    spec = OmegaConf.select(table, "metric.class_distance")
    if spec is None:
        return
    layer, n = str(spec.get("layer", "top")), int(spec.get("samples", 10000))
    for cell in cells:
        if cell.status != "finished" or cell.cfg is None:
            continue
        module, dm = load_trained(Path(cell.cfg.output.root) / run_name(cell.cfg))
        feats, labels = layer_latents(module, dm.test_dataloader(), n, layer)
        d = class_distances(torch.from_numpy(feats), torch.from_numpy(labels))
        final = cell.summary.setdefault("final", {})
        final.update({f"latent/{k}": d[k] for k in CLASS_DISTANCE_FIELDS})
