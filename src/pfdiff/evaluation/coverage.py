"""Coverage of held-out features by generated ones: improved precision and recall (Kynkäänniemi et al.,
NeurIPS 2019, "Improved precision and recall metric for assessing generative models").

Each set spans a manifold estimate: the union of balls around its points, each ball's radius the distance to
the point's k-th nearest neighbour in its own set. *Precision* = the fraction of generated points inside the
held-out manifold (are the samples plausible?); *recall* = the fraction of held-out points inside the
generated manifold (do the samples reach where the class's unseen examples lie?). Per class, against the
validation features: a generator that only re-describes the training points has the recall of the training
points themselves (``recall_train``, reported beside it), and only a higher recall is new coverage.

Written here rather than taken from a library: the reference implementation is TensorFlow code for image
embeddings; the formula is ten lines of pairwise distances (torch.cdist) on a few hundred points per class.
"""

from __future__ import annotations

import numpy as np
import torch


def knn_radii(points: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each point to its k-th nearest neighbour in the same set (itself excluded); with
    fewer than k + 1 points, to its farthest neighbour (a set of one point has radius 0)."""
    n = len(points)
    if n < 2:
        return points.new_zeros(n)
    d = torch.cdist(points, points)
    kk = min(k, n - 1)
    return d.kthvalue(kk + 1, dim=1).values  # kthvalue 1 is the point itself (distance 0)


def inside(query: torch.Tensor, support: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """bool [Q]: query points within radius of at least one support point."""
    if len(support) == 0 or len(query) == 0:
        return torch.zeros(len(query), dtype=torch.bool, device=query.device)
    return (torch.cdist(query, support) <= radii[None, :]).any(1)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float | None, float | None]:
    """(precision, recall) of ``fake`` against ``real`` (None where a side is empty)."""
    real, fake = real.detach().double(), fake.detach().double()
    if len(real) == 0 or len(fake) == 0:
        return None, None
    precision = inside(fake, real, knn_radii(real, k)).double().mean().item()
    recall = inside(real, fake, knn_radii(fake, k)).double().mean().item()
    return precision, recall


def class_coverage(z_val: torch.Tensor, y_val, z_fake: torch.Tensor, y_fake: torch.Tensor,
                   z_train: torch.Tensor, y_train: torch.Tensor, num_classes: int, k: int = 3) -> dict[str, list]:
    """Per class: precision and recall of the generated features against the held-out (validation) features
    of that class, and ``recall_train`` — the recall of the class's *training* features, the coverage a
    generator gets for free by copying them. Lists of length ``num_classes`` (None: a side is empty)."""
    y_val = torch.as_tensor(np.asarray(y_val), device=z_val.device)
    out: dict[str, list] = {"precision": [], "recall": [], "recall_train": [], "generated": []}
    for c in range(num_classes):
        real = z_val[y_val == c]
        p, r = precision_recall(real, z_fake[y_fake == c], k)
        out["precision"].append(p)
        out["recall"].append(r)
        out["recall_train"].append(precision_recall(real, z_train[y_train == c], k)[1])
        out["generated"].append(int((y_fake == c).sum()))
    return out
