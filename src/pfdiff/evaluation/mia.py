"""Membership-inference attacks (MIAs) on diffusion models, and a copying check of released samples.

Every attack is a pure function of (denoiser, data): gradients off, batched over the examples,
deterministic (the loss attack draws its noises from a seeded ``torch.Generator``), and shape-agnostic:
``x`` is [N, ...] (feature vectors [N, d] or images [N, C, H, W]); errors reduce over all non-batch dims.
``denoiser(z_t, t, y) -> (ε̂, ẑ0)`` is the preconditioning wrapper (``pfdiff.diffusion.Denoiser``), so
scores are comparable whatever parameterisation the network was trained in; its schedule is used.

Scores follow one convention: HIGHER = more likely a member (training example).

- ``loss_scores``: the loss attack (Matsumoto et al. 2023, "Membership Inference Attacks against
  Diffusion Models", §4; Carlini et al. 2023, "Extracting Training Data from Diffusion Models", §5.1).
- ``secmi_scores``: SecMI's t-error (Duan et al., ICML 2023, eqs. 8–10), at the official code's timesteps.
- ``pia_scores``: PIA, the proximal initialisation attack (Kong et al., ICLR 2024, eqs. 9–10).
- ``lira_scores``: the likelihood-ratio test of Carlini et al. 2022 (S&P), on per-example attack
  scores of shadow models (the shadow models themselves are the caller's business).
- ``nearest_neighbour_check``: do released pseudo-features sit closer to training points than to
  held-out points of the same class?
- ``attack_metrics``, ``plot_roc``, ``run_attacks``: AUC and TPR at low FPR (Carlini et al. 2022, §III.A);
  ``grouped_metrics``: the same per class and per class group (many / medium / few), because a pooled AUC
  over a long-tailed member set is dominated by whichever classes contribute the most pairs.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pfdiff.diffusion.denoiser import Denoiser
from pfdiff.diffusion.samplers import ddim_step
from pfdiff.diffusion.schedules import NoiseSchedule

ATTACKS = ("loss", "secmi", "pia")
LOW_FPRS = (0.01, 0.001)


# ---------------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------------

def _batches(n: int, batch_size: int):
    """Index slices of consecutive batches covering 0..n−1."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    return (slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size))


def _per_example(sq_err: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dims: [B, ...] → [B]."""
    return sq_err.flatten(1).mean(1)


def _check_timestep(schedule: NoiseSchedule, *ts: int) -> None:
    for t in ts:
        if not 0 <= int(t) < schedule.T:
            raise ValueError(f"timestep {t} outside [0, T={schedule.T})")


def ddim_inversion_step(denoiser: Denoiser, z_t: torch.Tensor, t: int, t_next: int, y: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM inversion z_t → z_{t_next}, t_next > t (Song et al. 2021, eq. 12 run forwards;
    SecMI's φ_θ, Duan et al. 2023, eq. 9): with ε̂ and ẑ0 from the model output *at the current point*,
    z_{t_next} = √ᾱ_{t_next}·ẑ0 + √(1−ᾱ_{t_next})·ε̂.

    ``ddim_step`` cannot be reused here: its σ_t(η) takes √(1 − ᾱ_t/ᾱ_prev), which is NaN when the
    "previous" timestep is the noisier one, even at η = 0.
    """
    eps, x0 = denoiser(z_t, t, y)
    a, b = denoiser.coefficients(torch.full((len(z_t),), int(t_next), dtype=torch.long, device=z_t.device), z_t)
    return a * x0 + b * eps


def _scores_by_batch(fn, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Concatenate fn(x[b], y[b]) → [B] over batches; float32 on CPU."""
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples but y has {len(y)} labels")
    parts = [fn(x[s], y[s]).float().cpu() for s in _batches(len(x), batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0)


# ---------------------------------------------------------------------------------------------------
# attacks
# ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def loss_scores(denoiser: Denoiser, x: torch.Tensor, y: torch.Tensor, timesteps: Sequence[int] = (50, 100, 200, 300), draws: int = 2, seed: int = 0,
                batch_size: int = 512) -> torch.Tensor:
    """Loss attack: −(1/|S|·K) Σ_{t∈S} Σ_k ‖ε̂(√ᾱ_t x0 + √(1−ᾱ_t) ε_{t,k}, t, y) − ε_{t,k}‖² per example.

    Matsumoto et al. 2023 (§4, threshold on the DDPM loss, eq. 14 of Ho et al. 2020) and Carlini et al.
    2023 (§5.1, loss threshold at fixed t). The error is in ε̂ whatever the network was trained to
    predict, so scores are comparable across parameterisations. The noises ε_{t,k} are drawn once,
    from ``seed``, with shape [1, ...] and shared by *every* example: members and non-members see
    identical draws, and the scores do not depend on N, ``batch_size`` or the device. Error = mean of
    squares over the non-batch dims. Returns float32 [N] on the CPU; higher = more likely member.
    """
    schedule = denoiser.schedule
    _check_timestep(schedule, *timesteps)
    if draws < 1 or not timesteps:
        raise ValueError("need draws ≥ 1 and at least one timestep")
    gen = torch.Generator().manual_seed(seed)
    noises = [[torch.randn((1, *x.shape[1:]), generator=gen, dtype=x.dtype).to(x.device) for _ in range(draws)]
              for _ in timesteps]

    def batch(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        err = torch.zeros(len(xb), dtype=torch.float64, device=xb.device)
        for t, eps_t in zip(timesteps, noises):
            tt = torch.full((len(xb),), int(t), dtype=torch.long, device=xb.device)
            for eps in eps_t:
                eps = eps.expand_as(xb)
                eps_hat = denoiser(schedule.q_sample(xb, tt, eps), tt, yb)[0]
                err += _per_example((eps_hat - eps) ** 2).double()
        return -err / (len(timesteps) * draws)

    return _scores_by_batch(batch, x, y, batch_size)


def secmi_timesteps(t_sec: int, k: int) -> tuple[list[int], int, int]:
    """SecMI's timesteps as the authors' code uses them (jinhaoduan/SecMI, ``mia_evals/secmia.py``,
    ``get_intermediate_results``: ``target_steps = list(range(0, t_sec, k))[1:]``, then one DDIM
    inversion step ``target_steps[-1] → target_steps[-1] + k`` and one DDIM step back): returns
    (inversion grid 0, k, 2k, …, t_a; t_a; t_b = t_a + k). With the paper's t_sec = 100, k = 10 the
    t-error is measured at t_a = 90 = t_sec − k, not at t_sec (the step up reaches t_sec)."""
    if not (k >= 1 and t_sec > k):
        raise ValueError(f"SecMI needs k ≥ 1 and t_sec > k (the official grid range(0, t_sec, k)[1:] is "
                         f"otherwise empty), got t_sec={t_sec}, k={k}")
    grid = list(range(0, int(t_sec), int(k)))
    return grid, grid[-1], grid[-1] + int(k)


@torch.no_grad()
def secmi_scores(denoiser: Denoiser, x: torch.Tensor, y: torch.Tensor, t_sec: int = 100, k: int = 10, batch_size: int = 512) -> torch.Tensor:
    """SecMI's t-error (Duan et al., ICML 2023, "Are Diffusion Models Vulnerable to Membership Inference
    Attacks?", eqs. 8–10; SecMI_stat), negated so that higher = more likely member.

    Timesteps as in the official code (``secmi_timesteps``; defaults t_sec = 100, k = 10 are the paper's
    and the code's, for T = 1000):
    1. x̃_{t_a} = Φ_θ(x0, 0 → t_a): deterministic DDIM inversion in steps of k, 0 → k → … → t_a
       (t_a = t_sec − k when k divides t_sec), starting from the data at t = 0 as the authors do;
    2. x̃_{t_b} = φ_θ(x̃_{t_a}, t_a → t_b = t_a + k), one more inversion step (to t_sec);
    3. x̂_{t_a} = ψ_θ(x̃_{t_b}, t_b → t_a), one deterministic DDIM step back (η = 0);
    score = −‖x̃_{t_a} − x̂_{t_a}‖² (mean of squares over non-batch dims; the code sums, the same ranking).
    1 + t_a/k + 1 model calls per example. Returns float32 [N] on the CPU.
    """
    grid, t_a, t_b = secmi_timesteps(t_sec, k)
    _check_timestep(denoiser.schedule, t_a, t_b)

    def batch(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        z = xb
        for t, t_next in zip(grid, grid[1:]):
            z = ddim_inversion_step(denoiser, z, t, t_next, yb)
        z_up = ddim_inversion_step(denoiser, z, t_a, t_b, yb)
        z_back = ddim_step(*denoiser(z_up, t_b, yb), t_b, t_a, z_up, denoiser.schedule)
        return -_per_example((z - z_back) ** 2)

    return _scores_by_batch(batch, x, y, batch_size)


@torch.no_grad()
def pia_scores(denoiser: Denoiser, x: torch.Tensor, y: torch.Tensor, t: int = 200, p: float = 4.0, batch_size: int = 512) -> torch.Tensor:
    """PIA (Kong et al., ICLR 2024, "An Efficient Membership Inference Attack for the Diffusion Model by
    Proximal Initialization", eqs. 9–10), negated so that higher = more likely member.

    ε0 = ε̂(x0, 0, y) (the model's own noise at t = 0, the "proximal initialisation");
    x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε0;  score = −‖ε̂(x_t, t, y) − ε0‖_p over all non-batch dims,
    p = 4 by default (the paper's best choice); any p ≥ 1 works. Two model calls per example.
    Returns float32 [N] on the CPU.
    """
    schedule = denoiser.schedule
    _check_timestep(schedule, t)
    if p < 1:
        raise ValueError(f"p must be ≥ 1, got {p}")

    def batch(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        eps0 = denoiser(xb, 0, yb)[0]
        tt = torch.full((len(xb),), int(t), dtype=torch.long, device=xb.device)
        eps_t = denoiser(schedule.q_sample(xb, tt, eps0), tt, yb)[0]
        return -(eps_t - eps0).flatten(1).double().norm(p=p, dim=1)

    return _scores_by_batch(batch, x, y, batch_size)


def lira_scores(target_scores, shadow_out, shadow_in=None, eps: float = 1e-12) -> np.ndarray:
    """LiRA (Carlini et al. 2022, "Membership Inference Attacks From First Principles", Alg. 1, §IV.C–D).

    ``target_scores`` [N]: a per-example attack statistic of the *target* model (e.g. ``loss_scores``,
    higher = member); ``shadow_out`` / ``shadow_in`` [S, N]: the same statistic from S shadow models
    trained without / with each example (NaN where a shadow model is not in that group for an example).
    Per example Gaussians are fitted across shadow models, with one global variance per group (the
    paper's choice for few shadows). Online (``shadow_in`` given): log N(s; μ_in, σ_in²) − log N(s; μ_out,
    σ_out²). Offline: the one-sided test log P_out(S ≤ s). Higher = more likely member. Training the
    shadow models is the caller's business; this only turns their scores into the test statistic.
    """
    from scipy.stats import norm

    def fit(a):
        a = np.atleast_2d(np.asarray(a, dtype=np.float64))
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: handled below
            mu = np.nanmean(a, 0)
        # an example no shadow model saw in (or out of) this group: the group's mean over all examples
        mu = np.where(np.isnan(mu), np.nanmean(a), mu)
        return mu, np.sqrt(np.nanvar(a - mu) + eps)

    s = np.asarray(target_scores, dtype=np.float64).reshape(-1)
    mu_out, sd_out = fit(shadow_out)
    if shadow_in is None:
        return norm.logcdf(s, mu_out, sd_out)
    mu_in, sd_in = fit(shadow_in)
    return norm.logpdf(s, mu_in, sd_in) - norm.logpdf(s, mu_out, sd_out)


# ---------------------------------------------------------------------------------------------------
# copying check of released pseudo-features
# ---------------------------------------------------------------------------------------------------

def _as_tensor(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).detach().cpu()


def _nearest(query: torch.Tensor, ref: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Euclidean distance from every query row to its nearest reference row (float64, chunked)."""
    return torch.cat([torch.cdist(query[s], ref).min(1).values for s in _batches(len(query), chunk)])


def nearest_neighbour_check(pseudo, pseudo_y, members, members_y, heldout, heldout_y, seed: int = 0,
                            copy_ratio: float = 0.5) -> dict[str, Any]:
    """Memorisation check of released samples: per pseudo-feature, r = d_member / d_heldout, the Euclidean
    distances to its nearest member and nearest held-out example *of the same class*.

    Per class both reference sets are subsampled (seeded) to the smaller of the two sizes, so neither
    side wins by being denser; classes lacking members, held-out examples or pseudo-features are skipped
    and listed. r ≈ 1: no preference for training points; r < ``copy_ratio`` (0.5) counts as a copy
    (cf. the distance-ratio test of Carlini et al. 2023, §4.1, and Somepalli et al. 2023). Inputs are
    [N, ...] arrays/tensors, flattened per example.
    """
    P, M, H = (_as_tensor(a).flatten(1).double() for a in (pseudo, members, heldout))
    py, my, hy = (_as_tensor(a).long().reshape(-1) for a in (pseudo_y, members_y, heldout_y))
    gen = torch.Generator().manual_seed(seed)
    ratios, d_mem, d_held, per_class, ref_sizes, skipped = [], [], [], {}, {}, []
    for c in sorted(set(py.tolist()) | set(my.tolist()) | set(hy.tolist())):
        q, m, h = P[py == c], M[my == c], H[hy == c]
        if not (len(q) and len(m) and len(h)):
            skipped.append(int(c))
            continue
        n = min(len(m), len(h))
        m, h = m[torch.randperm(len(m), generator=gen)[:n]], h[torch.randperm(len(h), generator=gen)[:n]]
        dm, dh = _nearest(q, m), _nearest(q, h)
        r = dm / dh.clamp_min(1e-12)
        ratios.append(r), d_mem.append(dm), d_held.append(dh)
        per_class[int(c)], ref_sizes[int(c)] = float(r.mean()), n
    if not ratios:
        raise ValueError("no class has pseudo-features, members and held-out examples")
    r, dm, dh = torch.cat(ratios), torch.cat(d_mem), torch.cat(d_held)
    return {"mean_ratio": float(r.mean()), "median_ratio": float(r.median()),
            "copy_fraction": float((r < copy_ratio).double().mean()), "copy_ratio": copy_ratio,
            "mean_d_member": float(dm.mean()), "mean_d_heldout": float(dh.mean()),
            "per_class_mean_ratio": per_class, "reference_size_per_class": ref_sizes,
            "n_pseudo": len(r), "n_pseudo_total": len(P), "skipped_classes": skipped}


# ---------------------------------------------------------------------------------------------------
# metrics, plots, driver
# ---------------------------------------------------------------------------------------------------

def _roc(member_scores, nonmember_scores):
    """(fpr, tpr, auc, n_members, n_nonmembers) of scores where higher = member; refuses non-finite scores.

    The ROC has one point per distinct score (sklearn's ``roc_curve(drop_intermediate=False)``) and the AUC
    is the Mann–Whitney statistic with ties counted ½ (= ``roc_auc_score``), in plain numpy: per-class and
    per-group metrics call this hundreds of times, where sklearn's argument validation dominated."""
    from scipy.stats import rankdata

    m, n = (np.asarray(_as_tensor(s), dtype=np.float64).reshape(-1) for s in (member_scores, nonmember_scores))
    if not (len(m) and len(n)):
        raise ValueError("need at least one member and one non-member score")
    scores = np.concatenate([m, n])
    if not np.isfinite(scores).all():
        raise ValueError("attack scores contain NaN or inf")
    labels = np.concatenate([np.ones(len(m)), np.zeros(len(n))])
    order = np.argsort(-scores, kind="mergesort")
    s_sorted, l_sorted = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), len(scores) - 1]  # last index of each distinct score
    tps = np.cumsum(l_sorted)[last]
    fps = last + 1 - tps
    tpr, fpr = np.r_[0.0, tps / len(m)], np.r_[0.0, fps / len(n)]
    auc = (rankdata(scores)[: len(m)].sum() - len(m) * (len(m) + 1) / 2) / (len(m) * len(n))
    return fpr, tpr, float(auc), len(m), len(n)


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """The highest TPR among ROC thresholds with FPR ≤ target, i.e. the TPR at the lowest threshold that
    still keeps FPR ≤ target. No interpolation between ROC points (Carlini et al. 2022 report the same
    way); with n non-members the smallest non-zero FPR is 1/n, so for target < 1/n this is the TPR at
    zero false positives."""
    ok = fpr <= target
    return float(tpr[ok].max()) if ok.any() else 0.0


def attack_metrics(member_scores, nonmember_scores) -> dict[str, float | int]:
    """AUC (sklearn ``roc_auc_score``; ties count ½) and TPR at 1 % and 0.1 % FPR (``tpr_at_fpr``)."""
    fpr, tpr, auc, nm, nn_ = _roc(member_scores, nonmember_scores)
    return {"auc": auc, "tpr_at_1pct_fpr": tpr_at_fpr(fpr, tpr, 0.01),
            "tpr_at_0.1pct_fpr": tpr_at_fpr(fpr, tpr, 0.001), "n_members": nm, "n_nonmembers": nn_}


def _labels_of(a) -> np.ndarray:
    return np.asarray(_as_tensor(a), dtype=np.int64).reshape(-1)


def _metrics_or_empty(m: np.ndarray, n: np.ndarray) -> dict[str, Any]:
    """``attack_metrics`` when both sides are present, else the counts with AUC None (nothing to rank)."""
    if len(m) and len(n):
        return attack_metrics(m, n)
    return {"auc": None, "tpr_at_1pct_fpr": None, "tpr_at_0.1pct_fpr": None, "n_members": len(m),
            "n_nonmembers": len(n)}


def grouped_metrics(member_scores, nonmember_scores, member_y, nonmember_y,
                    groups: Mapping[str, Sequence[int]] | None = None) -> dict[str, Any]:
    """``attack_metrics`` per class and per group of classes (e.g. many / medium / few), beside the pooled one.

    Why: on a long-tailed member set the pooled AUC mixes classes with very different leaks (a tail class
    with 2 training points can be perfectly separable while the head is not) and weights them by how many
    member/non-member pairs each contributes. Within a class the members and non-members are balanced
    (``balanced_pairs``), so a per-class AUC is label-free. A class or group lacking either side gets AUC
    None. ``class_mean_auc`` is the unweighted mean over classes with both sides. With n non-members in a
    class, TPR@1%FPR is the TPR at zero false positives whenever n < 100: read it with ``n_nonmembers``.
    Returns {"per_class": {c: metrics}, "per_group": {name: metrics}, "class_mean_auc": float | None}.
    """
    m, n = (np.asarray(_as_tensor(s), dtype=np.float64).reshape(-1) for s in (member_scores, nonmember_scores))
    my, ny = _labels_of(member_y), _labels_of(nonmember_y)
    if len(my) != len(m) or len(ny) != len(n):
        raise ValueError(f"{len(m)} member scores but {len(my)} labels, or {len(n)} non-member scores but "
                         f"{len(ny)} labels")
    per_class = {int(c): _metrics_or_empty(m[my == c], n[ny == c]) for c in sorted(set(my) | set(ny))}
    per_group = {}
    for name, classes in (groups or {}).items():
        cls = np.asarray(list(classes), dtype=np.int64)
        per_group[name] = {**_metrics_or_empty(m[np.isin(my, cls)], n[np.isin(ny, cls)]),
                           "classes": [int(c) for c in cls]}
    aucs = [v["auc"] for v in per_class.values() if v["auc"] is not None]
    return {"per_class": per_class, "per_group": per_group, "class_mean_auc": float(np.mean(aucs)) if aucs else None}


def plot_roc(curves: dict[str, tuple[Any, Any]], path: Path | str, title: str = "Membership inference") -> Path:
    """ROC curves (log-log, as Carlini et al. 2022 recommend) of {name: (member_scores, nonmember_scores)}
    with the chance diagonal and AUCs in the legend; saved atomically as PNG (``report.save_fig``)."""
    from pfdiff.report import plt, save_fig  # lazy: pfdiff.report imports pfdiff.evaluation

    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    lo = 1.0
    for name, (m, n) in curves.items():
        fpr, tpr, auc, _, nn_ = _roc(m, n)
        lo = min(lo, 0.5 / nn_)
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
    lo = min(lo, 1e-3)
    ax.plot([lo, 1], [lo, 1], "k--", lw=0.8, label="chance")
    ax.set(xscale="log", yscale="log", xlim=(lo, 1), ylim=(lo, 1.05), xlabel="false positive rate",
           ylabel="true positive rate", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    return save_fig(fig, Path(path))


ATTACK_FNS = {"loss": loss_scores, "secmi": secmi_scores, "secmi-long": secmi_scores, "pia": pia_scores}


def run_attacks(denoiser: Denoiser, members: torch.Tensor, members_y: torch.Tensor,
                nonmembers: torch.Tensor, nonmembers_y: torch.Tensor, attacks: Sequence[str] = ATTACKS,
                seed: int = 0, batch_size: int = 512, attack_kwargs: dict[str, dict] | None = None,
                groups: Mapping[str, Sequence[int]] | None = None,
                ) -> tuple[dict[str, dict], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Run the named attacks on members vs non-members and time each (members + non-members together).

    Returns ``(metrics, scores)``: metrics[name] = ``attack_metrics`` + {"seconds"} (JSON-ready) and
    scores[name] = (member_scores, nonmember_scores) as numpy arrays, ready for ``plot_roc(scores, …)``.
    ``attack_kwargs[name]`` overrides that attack's settings (e.g. {"secmi": {"t_sec": 50}}); only the
    loss attack takes ``seed``. With ``groups`` ({name: classes}; {} for per-class only) every metrics
    entry also carries ``grouped_metrics``' per-class and per-group figures.
    """
    unknown = set(attacks) - set(ATTACK_FNS)
    if unknown:
        raise ValueError(f"unknown attacks {sorted(unknown)}; choose from {list(ATTACK_FNS)}")
    metrics, scores = {}, {}
    for name in attacks:
        kw = {"batch_size": batch_size, **({"seed": seed} if name == "loss" else {}),
              **(attack_kwargs or {}).get(name, {})}
        t0 = time.perf_counter()
        m = ATTACK_FNS[name](denoiser, members, members_y, **kw).numpy()
        n = ATTACK_FNS[name](denoiser, nonmembers, nonmembers_y, **kw).numpy()
        seconds = time.perf_counter() - t0
        metrics[name] = {**attack_metrics(m, n), "seconds": seconds}
        if groups is not None:
            metrics[name].update(grouped_metrics(m, n, members_y, nonmembers_y, groups))
        scores[name] = (m, n)
    return metrics, scores


def balanced_pairs(y_members: np.ndarray, y_nonmembers: np.ndarray, num_classes: int, seed: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Indices of k_c = min(members_c, non-members_c) examples of every class from each side (seeded)."""
    rng = np.random.default_rng(seed)
    mem, non = [], []
    for c in range(num_classes):
        a, b = np.flatnonzero(y_members == c), np.flatnonzero(y_nonmembers == c)
        k = min(len(a), len(b))
        mem.append(rng.choice(a, k, replace=False))
        non.append(rng.choice(b, k, replace=False))
    return np.sort(np.concatenate(mem)), np.sort(np.concatenate(non))


def attack_settings(T: int) -> dict[str, dict]:
    """The attacks' timesteps as fractions of T (stated for T = 1000).

    SecMI: t_sec = 100, k = 10, the paper's (Duan et al. 2023, §5.1) and the official code's defaults
    (jinhaoduan/SecMI, ``mia_evals/secmia.py``: ``--t_sec 100 --k 10``), with the code's convention that
    the t-error is measured at t_sec − k = 90 (``secmi_timesteps``). On small feature denoisers this short
    step is unreliable (AUC 0.40–0.70 over 4 training seeds of a model the loss attack separates at
    0.99+, tests/test_mia.py); ``secmi-long`` (t_sec = 200, k = 100: error at 100 after a step to 200)
    separates better there (0.74–0.88) and is offered as a separate, non-default attack — it is not SecMI
    as published."""
    at = lambda t: max(1, min(T - 1, round(t * T / 1000)))  # noqa: E731
    return {"loss": {"timesteps": tuple(at(t) for t in (50, 100, 200, 300))},
            "secmi": {"t_sec": max(at(100), at(10) + 1), "k": at(10)},
            "secmi-long": {"t_sec": max(at(200), at(100) + 1), "k": at(100)},
            "pia": {"t": at(200)}}
