"""The server's auxiliary pool of labelled pseudo-features: what FedDDPM corrects on, with age and score.

Every sample records the round that generated it (``age``: 0 = warm-up) and its AID score (the
Mahalanobis distance to its class under the scorer the server fitted on the warm-up pool; lower is
more in-distribution, see ``longtail.filtering``). The progressive pool (ours) replaces part of the
pool after an accepted correction; replacement is *per class*, so the pool keeps the class histogram
the clients' warm-up gave it (the estimate of the global label distribution).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
        evicted_age, evicted_score, replaced = [], [], 0
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
        cat = (lambda xs: torch.cat(xs) if xs else torch.zeros(0))
        ea, es = cat(evicted_age), cat(evicted_score)
        return {"replaced": replaced, "evicted_mean_age": float(ea.mean()) if replaced else float("nan"),
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
