"""Inter- and intra-class distances of learned features (Kao & Chen, Associated Learning, Neural
Computation 2021, arXiv:1906.05560, §5.4 and Table 7).

* intra-class distance: for each class k, the mean Euclidean distance over all pairs of distinct
  points of class k; averaged over the classes (classes with fewer than two points are left out);
* inter-class distance: the mean Euclidean distance over all pairs of distinct class centroids;
* ratio: inter / intra (larger is better separated).
"""
from __future__ import annotations

import torch


def class_distances(features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    z = features.reshape(len(features), -1).double()
    classes = [int(c) for c in torch.unique(labels)]
    intra, centroids = [], []
    for c in classes:
        zc = z[labels == c]
        centroids.append(zc.mean(0))
        n = len(zc)
        if n >= 2:
            d = torch.cdist(zc, zc)
            intra.append(float(d.sum() / (n * (n - 1))))
    cent = torch.stack(centroids)
    m = len(cent)
    inter = float(torch.cdist(cent, cent).sum() / (m * (m - 1))) if m >= 2 else float("nan")
    intra_mean = sum(intra) / len(intra) if intra else float("nan")
    return {"inter": inter, "intra": intra_mean, "ratio": inter / intra_mean if intra_mean else float("nan")}
