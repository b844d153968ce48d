"""Penultimate-feature geometry: template projection (kl-vs-mse Fig. 5, after Müller et al. 2019) and t-SNE.

Template projection: the *template* of a class is the mean penultimate vector of its samples. For three chosen
classes, an orthonormal basis of the plane through their three templates is found, and the penultimate vectors of
those classes' samples are projected onto that plane. Coordinates are measured from the centroid of the templates
along the basis vectors ``e1 ∝ t2 − t1`` and ``e2`` (Gram–Schmidt of ``t3 − t1`` against ``e1``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kdlab.errors import KdlabError


def class_templates(features: torch.Tensor, labels: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Mean penultimate vector of each class in ``classes`` (len(classes)×D, float64)."""
    feats = torch.flatten(features.double(), 1)
    rows = []
    for c in classes:
        mask = labels == c
        if not bool(mask.any()):
            raise KdlabError(f"class {c} has no samples in this split; choose other classes")
        rows.append(feats[mask].mean(dim=0))
    return torch.stack(rows)


@dataclass
class TemplatePlane:
    """The plane through three class templates: ``origin`` (D), orthonormal ``basis`` (D×2), ``templates`` (3×D)."""

    origin: torch.Tensor
    basis: torch.Tensor
    templates: torch.Tensor

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Plane coordinates (N×2) of penultimate vectors: ``(r − origin) · basis``."""
        return (torch.flatten(features.double(), 1) - self.origin) @ self.basis


def template_plane(templates: torch.Tensor, rtol: float = 1e-9) -> TemplatePlane:
    """Orthonormal basis of the plane through three templates (3×D); an error if they are (nearly) collinear."""
    if templates.dim() != 2 or templates.shape[0] != 3:
        raise KdlabError(f"template projection needs exactly 3 class templates, got shape {list(templates.shape)}")
    if templates.shape[1] < 2:
        raise KdlabError("template projection needs penultimate features of dimension ≥ 2")
    t = templates.double()
    a, b = t[1] - t[0], t[2] - t[0]
    scale = max(float(a.norm()), float(b.norm()), 1e-300)
    e1 = a / a.norm().clamp_min(1e-300)
    b_perp = b - (b @ e1) * e1
    if float(a.norm()) <= rtol * scale or float(b_perp.norm()) <= rtol * scale:
        raise KdlabError("the three class templates are collinear: no plane through them; choose other classes")
    e2 = b_perp / b_perp.norm()
    return TemplatePlane(origin=t.mean(dim=0), basis=torch.stack([e1, e2], dim=1), templates=t)


@dataclass
class Projection:
    """Plane coordinates of the selected samples and of the templates."""

    classes: list[int]
    coords: np.ndarray  # N×2
    labels: np.ndarray  # N
    template_coords: np.ndarray  # 3×2


def project_classes(features: torch.Tensor, labels: torch.Tensor, classes: Sequence[int]) -> Projection:
    """Project the samples of three classes onto the plane through their templates (kl-vs-mse Fig. 5)."""
    classes = [int(c) for c in classes]
    if len(classes) != 3 or len(set(classes)) != 3:
        raise KdlabError(f"template projection needs 3 distinct classes, got {classes}")
    plane = template_plane(class_templates(features, labels, classes))
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in classes:
        mask |= labels == c
    coords = plane.project(features[mask])
    return Projection(classes, coords.numpy(), labels[mask].numpy(), plane.project(plane.templates).numpy())


def tsne(features: torch.Tensor, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """2-D t-SNE embedding (scikit-learn, PCA initialisation) of penultimate vectors; N×2."""
    from sklearn.manifold import TSNE

    x = torch.flatten(features.double(), 1).numpy()
    n = len(x)
    if n < 5:
        raise KdlabError(f"t-SNE needs at least 5 samples, got {n}")
    spread = float(np.abs(x - x.mean(axis=0)).max())
    if not np.isfinite(x).all() or spread <= 1e-12 * max(1.0, float(np.abs(x).max())):
        # scikit-learn's t-SNE crashes the process (segmentation fault) on constant inputs: refuse them here
        raise KdlabError("penultimate features are constant over the samples (dead units?): t-SNE is undefined")
    perp = min(perplexity, (n - 1) / 3)
    tsne_ = TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed)
    try:  # torch's and scikit-learn's OpenMP pools can starve each other: give t-SNE torch's thread budget
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return tsne_.fit_transform(x)
    with threadpool_limits(limits=max(1, torch.get_num_threads() // 2) if n > 2000 else 1):
        return tsne_.fit_transform(x)
