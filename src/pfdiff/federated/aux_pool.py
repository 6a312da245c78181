"""The server's auxiliary pool of labelled pseudo-features: what FedDDPM corrects on, with age and score.

Every sample records the round that generated it (``age``: 0 = warm-up) and its AID score (the
Mahalanobis distance to its class under the scorer the server fitted on the warm-up pool; lower is
more in-distribution, see ``longtail.filtering``). The progressive pool (ours) replaces part of the
pool after an accepted correction; replacement is *per class*, so the pool keeps the class histogram
the clients' warm-up gave it.

That histogram is set by ``fed.pool_quota`` (:func:`pool_quotas`): per-class quotas of the generation
budget B computed from the class counts the clients already released (noisy under example-level DP),
so the quotas are post-processing. :func:`stratified_split` holds out a per-class slice for the score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# rule → class weight w(n_c) for a class with n_c > 0 released examples (a class nobody holds gets nothing)
QUOTA_RULES = {
    "histogram": lambda n: n,  # the global long-tailed profile (Peng et al.'s "global data distribution")
    "balanced": lambda n: np.ones_like(n),  # B / C per class
    "tail": lambda n: n ** -0.5,  # favours the tail: a class with 4× fewer examples gets 2× more samples
}


def pool_quotas(counts: np.ndarray, budget: int, rule: str) -> np.ndarray:
    """Per-class integer quotas summing to ``budget``: weights ``QUOTA_RULES[rule](n_c)`` over the classes with
    n_c > 0, rounded by largest remainder (Hamilton), ties to the smaller class index."""
    if rule not in QUOTA_RULES:
        raise ValueError(f"unknown pool quota rule {rule!r}; choose from {sorted(QUOTA_RULES)}")
    n = np.asarray(counts, dtype=np.float64)
    held = n > 0
    if not held.any():
        raise ValueError("no class has a positive count: the pool has nothing to follow")
    w = np.zeros_like(n)
    w[held] = QUOTA_RULES[rule](n[held])
    exact = budget * w / w.sum()
    q = np.floor(exact).astype(np.int64)
    rest = budget - int(q.sum())
    order = np.lexsort((np.arange(len(n)), -(exact - q)))  # largest remainder first
    q[order[:rest]] += 1
    return q


def client_share(quotas: np.ndarray, global_counts: np.ndarray, own_counts: np.ndarray) -> np.ndarray:
    """What one client generates per class: quota_c · n_c^k / n_c (its part of the released counts), rounded;
    a class the client does not hold costs it nothing. Summed over clients ≈ the quotas (per-client rounding)."""
    g = np.asarray(global_counts, dtype=np.float64)
    share = np.where(g > 0, np.asarray(own_counts, dtype=np.float64) / np.maximum(g, 1), 0.0)
    return np.round(np.asarray(quotas) * share).astype(np.int64)


def stratified_split(y: torch.Tensor, share: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out, rest) index tensors: per class round(share · m_c) samples held out, at least 1 and at most
    m_c − 1 where the pool has m_c ≥ 2 of it (a class with one sample stays in the rest); both in a seeded
    random order."""
    perm = torch.randperm(len(y), generator=generator).to(y.device)
    held, rest = [], []
    for c in torch.unique(y).tolist():
        idx = perm[y[perm] == c]
        m = len(idx)
        k = 0 if m < 2 else min(m - 1, max(1, int(round(share * m))))
        held.append(idx[:k])
        rest.append(idx[k:])
    held_idx, rest_idx = torch.cat(held), torch.cat(rest)
    # back to the random order of ``perm`` (classes interleaved)
    rank = torch.empty_like(perm)
    rank[perm] = torch.arange(len(perm), device=perm.device)
    return held_idx[torch.argsort(rank[held_idx])], rest_idx[torch.argsort(rank[rest_idx])]


@dataclass
class AuxPool:
    u: torch.Tensor  # [N, d] standardised pseudo-features
    y: torch.Tensor  # [N] labels
    age: torch.Tensor  # [N] round of generation (0: warm-up)
    score: torch.Tensor  # [N] AID score (lower: more in-distribution)

    def __post_init__(self) -> None:
        n = len(self.y)
        if not (len(self.u) == len(self.age) == len(self.score) == n):
            raise ValueError("pool tensors disagree on the number of samples")
        if self.u.ndim != 2 or not torch.isfinite(self.u).all():
            raise ValueError("pool features must be a finite [N, d] tensor")

    def __len__(self) -> int:
        return len(self.y)

    def class_counts(self, num_classes: int) -> torch.Tensor:
        return torch.bincount(self.y, minlength=num_classes)

    def replace(self, u_new: torch.Tensor, y_new: torch.Tensor, score_new: torch.Tensor, round_: int,
                evict: str = "stalest") -> dict[str, float]:
        """Put the new samples in place of as many old ones *of the same class*, chosen as the stalest
        (smallest age, ties: worst score) or the worst-scored (ties: oldest). Returns what was evicted."""
        if evict not in ("stalest", "worst"):
            raise ValueError(f"evict must be 'stalest' or 'worst', got {evict!r}")
        evicted_age, evicted_score, replaced, per_class = [], [], 0, {}
        for c in y_new.unique().tolist():
            new_idx = (y_new == c).nonzero().flatten()
            old_idx = (self.y == c).nonzero().flatten()
            k = min(len(new_idx), len(old_idx))
            if k == 0:
                continue
            # lexicographic order: primary key first (age or −score), the other breaks ties
            a, s = self.age[old_idx].double(), self.score[old_idx].double()
            key = (a * 1e6 - s) if evict == "stalest" else (-s * 1e6 + a)
            victims = old_idx[torch.argsort(key)[:k]]
            best_new = new_idx[torch.argsort(score_new[new_idx])[:k]]
            evicted_age.append(self.age[victims].float())
            evicted_score.append(self.score[victims].float())
            self.u[victims] = u_new[best_new]
            self.score[victims] = score_new[best_new].to(self.score.dtype)
            self.age[victims] = round_
            replaced += k
            per_class[int(c)] = int(k)
        cat = (lambda xs: torch.cat(xs) if xs else torch.zeros(0))
        ea, es = cat(evicted_age), cat(evicted_score)
        return {"replaced": replaced, "replaced_per_class": per_class,
                "evicted_mean_age": float(ea.mean()) if replaced else float("nan"),
                "evicted_mean_score": float(es.mean()) if replaced else float("nan")}

    def summary(self) -> dict[str, float]:
        return {"size": len(self), "mean_age": float(self.age.float().mean()),
                "mean_score": float(self.score.float().mean()),
                "share_from_warmup": float((self.age == 0).float().mean())}

    def state(self) -> dict[str, torch.Tensor]:
        return {"u": self.u, "y": self.y, "age": self.age, "score": self.score}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "AuxPool":
        return cls(state["u"].clone(), state["y"].clone(), state["age"].clone(), state["score"].clone())
