"""Global contrast normalisation and ZCA whitening: the rlra paper's CIFAR-10/ImageNet preprocessing.

rlra appendix: "global contrast normalization was applied, where each color channel's pixel mean
was subtracted from itself. ZCA whitening was then applied, where: 1) the image data was centered
and rotated onto its principle components, 2) the principle components were normalized, and 3)
the image was finally rotated back." (Also Bartunov et al. 2018's CIFAR-10 preprocessing.)

* :func:`gcn` — per image x: subtract each channel's own mean, then rescale the image to L2 norm
  ``scale`` (the paper names only the mean subtraction; the contrast rescaling is the usual GCN,
  Goodfellow et al. 2013 / pylearn2 ``global_contrast_normalize(scale=55)``: at 3×32×32 a norm of
  55 gives pixels of RMS ≈ 1). No statistics are shared between images, so no fitting.
* :class:`ZCA` — fitted on the training split only: μ = mean image, Σ = (1/N) Σ_n (x_n − μ)(x_n − μ)ᵀ
  = U Λ Uᵀ, and x ↦ (x − μ) W with W = U (Λ + ε)^{-1/2} Uᵀ: rotate onto the principal
  components (Uᵀ), normalise them ((Λ + ε)^{-1/2}), rotate back (U). ε (``epsilon``) keeps the
  near-zero-variance components from being blown up into noise (pylearn2's ``filter_bias``); with
  ε → 0 the whitened training data has identity covariance.
* :class:`WhitenedDataModule` — the in-memory data module with ``data.normalize: gcn_zca``: it
  splits as usual (train / validation from the training set, test), applies GCN to every split,
  fits ZCA on the training split once, and transforms all three with it. The fit is cached on disk
  under ``<data.root>/.zca-cache/`` keyed by a hash of the GCN'd training split and ε, so every
  later run (every table row, every DDP rank after the first) reuses it.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from bench.data.base import InMemoryDataModule

GCN_SCALE = 55.0  # pylearn2's CIFAR-10 setting: pixels of RMS ≈ 1 at 3×32×32
ZCA_EPSILON = 0.1  # pylearn2's ZCA filter_bias for GCN(55) CIFAR-10 (Goodfellow et al. 2013, maxout)
MIN_DIVISOR = 1e-8  # a constant image stays zero instead of dividing by zero
CACHE_VERSION = 1


def gcn(x: Tensor, scale: float = GCN_SCALE) -> Tensor:
    """Global contrast normalisation of each image of ``x`` (N, C, H, W) (or (N, D): one channel).

    x ← scale · (x − mean_c(x)) / max(‖x − mean_c(x)‖₂, 1e-8), the mean taken per image and channel.
    """
    flat = x.reshape(x.shape[0], x.shape[1], -1) if x.dim() > 2 else x.reshape(x.shape[0], 1, -1)
    centered = flat - flat.mean(dim=2, keepdim=True)
    norms = centered.flatten(1).norm(dim=1).clamp_min(MIN_DIVISOR)
    return (scale * centered / norms[:, None, None]).reshape(x.shape)


@dataclass
class ZCA:
    """x ↦ (x − mean) @ matrix on flattened samples; ``matrix`` = U (Λ + ε)^{-1/2} Uᵀ is symmetric."""

    mean: Tensor
    matrix: Tensor
    epsilon: float

    @classmethod
    def fit(cls, x: Tensor, epsilon: float = ZCA_EPSILON) -> "ZCA":
        """Fit on samples ``x`` (N, ...) in float64: mean, covariance (1/N), eigendecomposition.

        With fewer samples than dimensions (small training subsets) Σ has rank < N and the thin
        SVD of the centred data gives the same U, Λ on its span in O(N²D) instead of O(D³); the
        rest of the space has λ = 0 and is scaled by ε^{-1/2}. A direction of zero variance
        with ε = 0 is mapped to 0 (the pseudo-inverse convention) rather than to infinity.
        """
        if epsilon < 0:
            raise ValueError(f"ZCA epsilon must be ≥ 0, got {epsilon}")
        flat = x.reshape(x.shape[0], -1).double()
        n, d = flat.shape
        mean = flat.mean(dim=0)
        centered = flat - mean
        if n < d:
            _, singular, vh = torch.linalg.svd(centered, full_matrices=False)
            eigvals, eigvecs = singular.square() / n, vh.T
        else:
            eigvals, eigvecs = torch.linalg.eigh(centered.T @ centered / n)
        # A singular Σ (N ≤ D, or GCN's removed channel means) has eigenvalues that are 0 up to
        # round-off, tiny positive or negative ones; they are 0 (numpy's matrix_rank tolerance).
        tol = eigvals.abs().max() * max(n, d) * torch.finfo(eigvals.dtype).eps
        total = torch.where(eigvals > tol, eigvals, torch.zeros_like(eigvals)) + epsilon
        scales = torch.where(total > 0, total.rsqrt(), torch.zeros_like(total))
        matrix = (eigvecs * scales) @ eigvecs.T
        if n < d and epsilon > 0:  # the complement of the data's span: λ = 0, scale ε^{-1/2}
            matrix += (torch.eye(d, dtype=matrix.dtype) - eigvecs @ eigvecs.T) / epsilon ** 0.5
        return cls(mean.float(), matrix.float(), float(epsilon))

    def __call__(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        return ((flat - self.mean) @ self.matrix).reshape(x.shape)


def fingerprint(x: Tensor, epsilon: float) -> str:
    """Hash of the exact training data and ε: the cache key of a ZCA fit."""
    digest = hashlib.sha1(f"zca-v{CACHE_VERSION}:{tuple(x.shape)}:{epsilon!r}".encode())
    digest.update(x.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:20]


def fit_zca_cached(x: Tensor, epsilon: float, cache_dir: Path | None) -> ZCA:
    """:meth:`ZCA.fit`, read from / written to ``cache_dir`` when given (atomic rename, so
    concurrent DDP ranks or runs never read half a file)."""
    if cache_dir is None:
        return ZCA.fit(x, epsilon)
    path = Path(cache_dir) / f"zca-{fingerprint(x, epsilon)}.pt"
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return ZCA(saved["mean"], saved["matrix"], float(saved["epsilon"]))
    zca = ZCA.fit(x, epsilon)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"mean": zca.mean, "matrix": zca.matrix, "epsilon": zca.epsilon}, tmp)
    os.replace(tmp, path)
    return zca


class WhitenedDataModule(InMemoryDataModule):
    """:class:`InMemoryDataModule` with ``data.normalize: gcn_zca``: GCN per image, then ZCA
    fitted on the training split (cached under ``<data.root>/.zca-cache``).

    The parent splits and converts the pixels with ``normalize: none`` (its own choices are
    none | standard); ``self.preprocessing`` records what was applied.
    """

    def __init__(self, cfg: DictConfig, seed: int, load, scale: float = GCN_SCALE, epsilon: float = ZCA_EPSILON):
        if cfg.normalize != "gcn_zca":
            raise ValueError(f"WhitenedDataModule is for data.normalize=gcn_zca, got {cfg.normalize!r}")
        super().__init__(OmegaConf.merge(cfg, {"normalize": "none"}), seed, load)
        self.preprocessing = "gcn_zca"
        self.scale, self.epsilon = float(scale), float(epsilon)
        self.zca: ZCA | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        super().setup(stage)
        (tx, ty), (vx, vy), (sx, sy) = self.train, self.val, self.test
        tx, vx, sx = gcn(tx, self.scale), gcn(vx, self.scale), gcn(sx, self.scale)
        self.zca = fit_zca_cached(tx, self.epsilon, Path(self.cfg.root) / ".zca-cache")
        self.train, self.val, self.test = (self.zca(tx), ty), (self.zca(vx), vy), (self.zca(sx), sy)


__all__ = ["GCN_SCALE", "ZCA", "ZCA_EPSILON", "WhitenedDataModule", "fit_zca_cached", "gcn"]
