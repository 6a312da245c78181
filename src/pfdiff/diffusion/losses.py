"""The diffusion training loss: a small callable returning an unreduced per-example vector (EDM style)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pfdiff.diffusion.schedules import NoiseSchedule
from pfdiff.diffusion.denoiser import check_prediction, split_prediction, training_target


def _uniform(schedule: NoiseSchedule, t: torch.Tensor, prediction: str, gamma: float) -> torch.Tensor:
    """λ_t = 1: DDPM's L_simple (Ho et al. 2020, eq. 14)."""
    return torch.ones(t.shape, dtype=torch.float64, device=t.device)


def _inv_sqrt(schedule: NoiseSchedule, t: torch.Tensor, prediction: str, gamma: float) -> torch.Tensor:
    """λ_t = 1/√(1−ᾱ_t)."""
    return 1.0 / (1.0 - schedule.alpha_bar.to(t.device)[t]).sqrt()


def _min_snr(schedule: NoiseSchedule, t: torch.Tensor, prediction: str, gamma: float) -> torch.Tensor:
    """Min-SNR-γ (Hang et al. 2023, eq. 7 and §3.4): min(SNR, γ) in x0 units, divided by the
    SNR (ε-prediction) or SNR + 1 (v-prediction) that converts the x0 loss into those units."""
    snr = schedule.snr(t)
    clipped = snr.clamp(max=gamma)
    return {"eps": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}[check_prediction(prediction)]


WEIGHTINGS = {"uniform": _uniform, "inv_sqrt": _inv_sqrt, "min_snr": _min_snr}


def loss_weight(schedule: NoiseSchedule, t: torch.Tensor, weighting: str, prediction: str = "eps",
                gamma: float = 5.0) -> torch.Tensor:
    """Per-timestep weight λ_t of the regression loss, float32 [len(t)]."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {sorted(WEIGHTINGS)}")
    return WEIGHTINGS[weighting](schedule, t, prediction, gamma).float()


@dataclass
class DiffusionOutput:
    loss: torch.Tensor  # [B] per-example loss, averaged over the K noise draws
    z0_hat: torch.Tensor  # [B, K, ...] the model's estimate of z0 for every draw (differentiable)
    t: torch.Tensor  # [B, K] the sampled timesteps
    y_used: torch.Tensor  # [B, K] labels fed to the model (null label where dropped for CFG)


class DiffusionLoss:
    """λ_t·‖target − model(z_t, t, y)‖² per example, with noise multiplicity and CFG label drop.

    Random draws, in this order from ``generator``: t [B·K], ε [B·K, …], then (if cond_drop_prob > 0)
    the drop coins [B·K]; rows are example-major (row b·K + k is draw k of example b).

    ``inner_multiplicity``: call the model on z_t [B, K, …] with t, y [B, K] (the K draws as an inner
    dimension) instead of on B·K rows; same draws, same loss. Per-example-gradient hooks (Opacus) then
    see B examples whose gradients sum over K: the DP-SGD engine's clipping unit. The model must map
    leading dimensions [B, K] (``FeatureDenoiser`` does). ``None`` (default): use it iff the model has a
    true ``inner_multiplicity`` attribute (``pfdiff.privacy.dpsgd.DPSGD`` hands the loss such a model).
    """

    def __init__(self, schedule: NoiseSchedule, prediction: str = "eps", weighting: str = "uniform",
                 min_snr_gamma: float = 5.0, cond_drop_prob: float = 0.0, null_label: int | None = None,
                 t_min: int = 0, t_max: int | None = None):
        check_prediction(prediction)
        loss_weight(schedule, torch.zeros(1, dtype=torch.long), weighting, prediction)  # validates the name
        if not 0.0 <= cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must lie in [0, 1], got {cond_drop_prob}")
        if cond_drop_prob > 0 and null_label is None:
            raise ValueError("cond_drop_prob > 0 needs a null_label (the unconditional class index)")
        t_max = schedule.T if t_max is None else t_max
        if not 0 <= t_min < t_max <= schedule.T:
            raise ValueError(f"need 0 ≤ t_min < t_max ≤ T={schedule.T}, got t_min={t_min}, t_max={t_max}")
        self.schedule, self.prediction, self.weighting = schedule, prediction, weighting
        self.gamma, self.cond_drop_prob, self.null_label = min_snr_gamma, cond_drop_prob, null_label
        self.t_min, self.t_max = t_min, t_max

    def target(self, z0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """What the network regresses onto at z_t = a·z0 + b·ε (ε, v or z0)."""
        return training_target(self.prediction, z0, eps, a, b)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """λ_t, float32 [len(t)]."""
        return loss_weight(self.schedule, t, self.weighting, self.prediction, self.gamma)

    def _draw(self, z0_rep: torch.Tensor, y_rep: torch.Tensor, generator: torch.Generator | None):
        n, dev = len(z0_rep), z0_rep.device
        t = torch.randint(self.t_min, self.t_max, (n,), device=dev, generator=generator)
        eps = torch.randn(z0_rep.shape, device=dev, dtype=z0_rep.dtype, generator=generator)
        if self.cond_drop_prob > 0:
            # classifier-free guidance training (Ho & Salimans 2022, Alg. 1): drop y with prob. p
            drop = torch.rand(n, device=dev, generator=generator) < self.cond_drop_prob
            y_rep = torch.where(drop, torch.full_like(y_rep, self.null_label), y_rep)
        return t, eps, y_rep

    def _shard_draw(self, z0_rep: torch.Tensor, y_rep: torch.Tensor, generator: torch.Generator | None,
                    offset: int, total: int):
        """The draws of rows ``offset`` … ``offset + len(z0_rep)`` of a batch of ``total`` rows: drawn for the
        whole batch (as ``_draw`` would for it), then these rows' kept."""
        n = len(z0_rep)
        if not 0 <= offset <= offset + n <= total:
            raise ValueError(f"rows {offset}…{offset + n} do not lie in a batch of {total}")
        y_all = torch.zeros(total, dtype=y_rep.dtype, device=y_rep.device)
        y_all[offset:offset + n] = y_rep
        t, eps, y_all = self._draw(z0_rep.new_empty((total, *z0_rep.shape[1:])), y_all, generator)
        return t[offset:offset + n], eps[offset:offset + n], y_all[offset:offset + n]

    def draw(self, z0: torch.Tensor, y: torch.Tensor, noise_multiplicity: int = 1,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The (t, ε, label) draws of the B·K rows that ``self(model, z0, y, noise_multiplicity, generator)`` would
        make: drawn here, they can be concatenated over examples and passed back as ``draws=`` (one forward)."""
        K = noise_multiplicity
        return self._draw(z0.repeat_interleave(K, dim=0), y.repeat_interleave(K, dim=0), generator)

    def __call__(self, model, z0: torch.Tensor, y: torch.Tensor, noise_multiplicity: int = 1,
                 generator: torch.Generator | None = None, inner_multiplicity: bool | None = None,
                 shard: tuple[int, int] | None = None,
                 draws: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> DiffusionOutput:
        """``shard=(offset, total)``: ``z0``, ``y`` are rows ``offset`` … of a batch of ``total`` examples split
        across processes (``pfdiff.distributed``); every draw is then the one the whole batch would get from
        ``generator``, so the processes' rows together see exactly the draws of the unsplit batch. ``draws``:
        the rows' (t, ε, label) from :meth:`draw` (``generator`` and ``shard`` are then not used)."""
        B, K = len(z0), noise_multiplicity
        if K < 1:
            raise ValueError(f"noise_multiplicity must be ≥ 1, got {K}")
        # DPDM (Dockhorn et al. 2022, §3.2): K draws of (t, ε) per example in one batched call, averaged
        # per example *before* any clipping, so K does not change the per-example sensitivity.
        z0_rep, y_rep = z0.repeat_interleave(K, dim=0), y.repeat_interleave(K, dim=0)
        if draws is not None:
            t, eps, y_rep = draws
            if len(t) != B * K:
                raise ValueError(f"draws for {len(t)} rows, the batch has {B}×{K}")
        elif shard is None:
            t, eps, y_rep = self._draw(z0_rep, y_rep, generator)
        else:
            t, eps, y_rep = self._shard_draw(z0_rep, y_rep, generator, shard[0] * K, shard[1] * K)
        a = self.schedule.sqrt_alpha_bar(t, z0.ndim, z0.dtype)
        b = self.schedule.sqrt_one_minus_alpha_bar(t, z0.ndim, z0.dtype)
        z_t = a * z0_rep + b * eps  # q(z_t | z_0), DDPM eq. 4
        if inner_multiplicity is None:
            inner_multiplicity = bool(getattr(model, "inner_multiplicity", False))
        if inner_multiplicity:  # [B, K, …] in, back to example-major rows [B·K, …] out
            output = model(z_t.view(B, K, *z0.shape[1:]), t.view(B, K), y_rep.view(B, K)).reshape(z_t.shape)
        else:
            output = model(z_t, t, y_rep)
        # λ_t · mean over non-batch dims of (output − target)²  (DDPM eq. 14, generalised to ε / v / x0)
        per_row = ((output - self.target(z0_rep, eps, a, b)) ** 2).flatten(1).mean(1)
        per_row = per_row * self.weight(t).to(per_row.dtype)
        _, z0_hat = split_prediction(output, z_t, a, b, self.prediction)
        return DiffusionOutput(per_row.view(B, K).mean(1), z0_hat.view(B, K, *z0.shape[1:]),
                               t.view(B, K), y_rep.view(B, K))
