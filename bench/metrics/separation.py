"""How well a latent space separates classes (rlra Figure 7's t-SNE panels, as two numbers)."""
from __future__ import annotations

import numpy as np


def separation_scores(latents: np.ndarray, labels: np.ndarray, k: int = 5) -> dict[str, float]:
    """Silhouette (by true class, Euclidean, in [−1, 1]) and k-NN accuracy (%) in the latent space.

    The silhouette is taken in the latent space itself (a t-SNE map's distances are not
    meaningful); the k-NN classifier is fitted on the first half of the samples and scored on the
    second half."""
    from sklearn.metrics import silhouette_score
    from sklearn.neighbors import KNeighborsClassifier

    half = len(labels) // 2
    knn = KNeighborsClassifier(n_neighbors=k).fit(latents[:half], labels[:half])
    scores = {"knn_acc": 100.0 * float(knn.score(latents[half:], labels[half:]))}
    scores["silhouette"] = float(silhouette_score(latents, labels)) if len(set(labels.tolist())) > 1 else float("nan")
    return scores
