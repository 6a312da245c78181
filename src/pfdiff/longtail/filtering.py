"""AID/OOD filtering of pseudo-features (after DiffuLT, Shao et al., NeurIPS 2024).

Score: the Mahalanobis distance of a pseudo-feature to its class prototype under a covariance
*tied* across classes (Lee et al. 2018). Why this one: a tail class with 2–5 real examples has no
usable covariance of its own, while the tied one is estimated from every real feature; the
classifier's confidence would reward samples far on the correct side of the boundary (not
in-distribution ones), and a per-class radius needs a per-class spread we cannot estimate on the
tail. Threshold: a sample is *in distribution* (kept) when its score is at most the ``quantile`` of
the same scores of real training features, pooled over classes (comparable across classes because
the covariance is shared) and cross-fitted (each real feature scored by a fit that excluded it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sklearn.covariance import LedoitWolf


@dataclass
class FilterResult:
    keep: torch.Tensor  # bool [N]
    scores: torch.Tensor  # [N]
    threshold: float
    kept_per_class: list[int]
    generated_per_class: list[int]

    @property
    def kept_fraction_per_class(self) -> list[float | None]:
        return [k / g if g else None for k, g in zip(self.kept_per_class, self.generated_per_class)]

    @property
    def no_generation(self) -> bool:
        """Every generated sample was rejected: the filtered branch produced nothing."""
        return sum(self.generated_per_class) > 0 and sum(self.kept_per_class) == 0

    def summary(self) -> dict:
        return {"threshold": self.threshold, "no_generation": self.no_generation, "kept_per_class": self.kept_per_class,
                "generated_per_class": self.generated_per_class,
                "kept_fraction_per_class": self.kept_fraction_per_class}


class MahalanobisScorer:
    """Class means and a tied covariance fitted on real features; ``score`` = Mahalanobis distance."""

    def __init__(self, z: torch.Tensor, y: torch.Tensor, num_classes: int, cross_fit: bool = True):
        z = z.detach().double()
        self.means = torch.stack([z[y == c].mean(0) if (y == c).any() else torch.zeros(z.shape[1], dtype=z.dtype,
                                  device=z.device) for c in range(num_classes)])
        centred = (z - self.means[y]).cpu().numpy()
        # Ledoit–Wolf shrinkage: features of a trained encoder are nearly low-rank, and the plain
        # covariance would give pseudo-features with a little spread off that subspace huge scores.
        cov = LedoitWolf(assume_centered=True).fit(centred).covariance_
        cov = torch.as_tensor(cov, dtype=z.dtype, device=z.device)
        self.precision_chol = torch.linalg.cholesky(torch.linalg.inv(cov))
        self.real_scores = _cross_fitted_scores(z, y, num_classes) if cross_fit else self.score(z, y)

    def score(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d = (z.detach().double() - self.means[y]) @ self.precision_chol
        return d.norm(dim=-1)


CROSS_FIT_FOLDS = 5  # K of the real features' cross-fitted scores (a fit needs at least K rows: checked by prepare)


def _cross_fitted_scores(z: torch.Tensor, y: torch.Tensor, num_classes: int,
                         folds: int = CROSS_FIT_FOLDS) -> torch.Tensor:
    """Scores of real features by a scorer that did not see them (K-fold): in-sample Mahalanobis distances
    of a 64-D fit are biased low, which would make every new sample look out of distribution."""
    from sklearn.model_selection import KFold

    scores = []
    for fit_idx, held_idx in KFold(folds, shuffle=True, random_state=0).split(z.cpu().numpy()):
        fit_idx, held_idx = torch.as_tensor(fit_idx), torch.as_tensor(held_idx)
        scorer = MahalanobisScorer(z[fit_idx], y[fit_idx], num_classes, cross_fit=False)
        seen = torch.isin(y[held_idx], y[fit_idx])  # a held-out tail example whose class is absent has no mean
        scores.append(scorer.score(z[held_idx][seen], y[held_idx][seen]))
    return torch.cat(scores)


def aid_filter(scorer: MahalanobisScorer, z_pseudo: torch.Tensor, y_pseudo: torch.Tensor, num_classes: int,
               quantile: float = 0.95) -> FilterResult:
    """Keep pseudo-features whose score is at most the ``quantile`` of the real features' scores."""
    if not 0 < quantile <= 1:
        raise ValueError(f"filter quantile must lie in (0, 1], got {quantile}")
    threshold = float(torch.quantile(scorer.real_scores, quantile))
    scores = scorer.score(z_pseudo, y_pseudo)
    keep = scores <= threshold
    gen = torch.bincount(y_pseudo, minlength=num_classes).tolist()
    kept = torch.bincount(y_pseudo[keep], minlength=num_classes).tolist()
    return FilterResult(keep, scores.float(), threshold, kept, gen)


@torch.no_grad()
def margins(classifier: torch.nn.Module, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """G's margin of each labelled feature: logit_y − max_{j≠y} logit_j (negative: on the wrong side)."""
    logits = classifier(z.detach())
    own = logits.gather(1, y[:, None])[:, 0]
    others = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return own - others


def boundary_filter(scorer: MahalanobisScorer, classifier: torch.nn.Module, z_pseudo: torch.Tensor,
                    y_pseudo: torch.Tensor, num_classes: int, quantile: float = 0.95,
                    boundary_quantile: float = 0.5) -> FilterResult:
    """In distribution *and* near G's decision boundary: of the AID-kept samples, those whose margin is at most
    the ``boundary_quantile`` of the kept samples' margins (pooled). Why: a pseudo-feature deep inside its
    class's blob is already classified right and barely moves a CE boundary; an in-distribution one with a
    small (or negative) margin is where the class's unseen examples are misclassified."""
    aid = aid_filter(scorer, z_pseudo, y_pseudo, num_classes, quantile)
    keep = aid.keep.clone()
    if keep.any():
        m = margins(classifier, z_pseudo, y_pseudo)
        keep &= m <= torch.quantile(m[keep].float(), boundary_quantile)
    kept = torch.bincount(y_pseudo[keep], minlength=num_classes).tolist()
    return FilterResult(keep, aid.scores, aid.threshold, kept, aid.generated_per_class)
