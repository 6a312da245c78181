"""Image-space reference: DPDM (Dockhorn et al. 2022, "Differentially Private Diffusion Models") on digits.

A small U-Net denoiser (:class:`pfdiff.models.unet.UNet`) is trained on the pixels with DP-SGD and
noise multiplicity K (each example's loss is the mean over K (t, ε) draws *before* its gradient is
clipped; :class:`pfdiff.privacy.dpsgd.DPSGD`), with a noise-level distribution that favours high noise
(:class:`HighNoiseDiffusionLoss`), and sampled with few-step DDIM. Each model is scored by

- **feature FID**: the Fréchet distance (:func:`pfdiff.evaluation.fid.frechet_distance`) between the
  penultimate features of a CNN classifier trained on the real training split, computed on the
  held-out real test split and on the generated images (Inception is meaningless for 8×8 digits);
- **CAS** (classification accuracy score, Ravuri & Vinyals 2019): a classifier of the same recipe is
  trained on the generated, labelled images only and tested on the real test split.

:func:`run_dpdm` trains one model per ε (``None`` = non-private), writes ``dpdm_results.json`` and one
sample grid per model, and returns the results. The non-private model is **plain minibatch training**
(Adam on the batch-mean loss, shuffled batches of the same size, same steps, K, loss, EMA; no clipping,
no noise), not DP-SGD with σ = 0, which would still clip.

Privacy unit: one training image (add/remove-one adjacency); ε from the PLD accountant for the Poisson-
subsampled Gaussian mechanism at δ = 1e-5. The FID/CAS evaluator sees the real training split too; it
is an evaluation instrument, not part of the released model, as in DPDM's own evaluation.
"""

from __future__ import annotations

import inspect
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pfdiff.config import DPDMConfig
from pfdiff.data import balanced_indices, load_dataset, stratified_split
from pfdiff.diffusion import ClassifierFreeGuidance, DiffusionLoss, NoiseSchedule, generate
from pfdiff.evaluation.fid import frechet_distance
from pfdiff.evaluation.mia import attack_settings, balanced_pairs, run_attacks
from pfdiff.models import create_encoder
from pfdiff.models.unet import UNet
from pfdiff.privacy.accounting import GaussianEvent, calibrate_noise, check_delta_for_size, epsilon_all
from pfdiff.privacy.accounting import epsilon as privacy_epsilon
from pfdiff.privacy.dpsgd import DPSGD
from pfdiff.privacy.noise import NoiseSource
from pfdiff.runs import atomic_write_bytes, atomic_write_json
from pfdiff.training import EMA, derive_seed, generator, resolve_device, run_steps, shuffled_batch, train

T_DISTRIBUTIONS = ("lognormal", "uniform")
DPSGD_EVENT = "dpdm denoiser DP-SGD"


# ---------------------------------------------------------------------------------------------- config


# ---------------------------------------------------------------------------------------------- loss


class HighNoiseDiffusionLoss(DiffusionLoss):
    """:class:`DiffusionLoss` with t drawn from a distribution that favours high noise.

    ``t_distribution="lognormal"``: ln σ ~ N(p_mean, p_std²), the noise-level distribution of EDM
    (Karras et al. 2022, Table 1) that DPDM trains with (its configs: ``loss.version: edm``), mapped to
    the discrete timestep whose σ_t = √((1−ᾱ_t)/ᾱ_t) is the first ≥ σ (σ_t is EDM's σ of the VP
    process: z_t/√ᾱ_t = x_0 + σ_t ε), clamped to [t_min, t_max). DPDM's argument for DP-SGD (§3–4 of the
    paper) is that a small, noisily trained denoiser should spend its capacity where the samples'
    global content is decided — the high noise levels — rather than on near-identity denoising at low
    noise. DPDM's own p_mean = −1.2 refers to EDM's loss on [-1, 1] data with σ_data = 0.5; on the
    discrete cosine schedule it puts the median t at ≈ 0.19·T. We shift it up (default p_mean = 0.5,
    median σ ≈ 1.65, mean t ≈ 0.59·T) because the few-step sampler (20 trailing DDIM steps) never queries
    the model below t ≈ 0.05·T, so mass there is wasted; ``"uniform"`` is DDPM's t ~ U{t_min..t_max−1}.

    The draws are vmap-safe (``randn``, a comparison against the σ table and a sum: no data-dependent
    control flow), so the loss runs inside DPSGD's per-example ``vmap``.
    """

    def __init__(self, schedule: NoiseSchedule, *, t_distribution: str = "lognormal", p_mean: float = 0.5,
                 p_std: float = 1.2, **kwargs):
        super().__init__(schedule, **kwargs)
        if t_distribution not in T_DISTRIBUTIONS:
            raise ValueError(f"unknown t distribution {t_distribution!r}; choose one of {list(T_DISTRIBUTIONS)}")
        if not (math.isfinite(p_mean) and p_std > 0):
            raise ValueError(f"need a finite p_mean and p_std > 0, got {p_mean}, {p_std}")
        self.t_distribution, self.p_mean, self.p_std = t_distribution, float(p_mean), float(p_std)
        self._log_sigma = schedule.sigma().log().float()  # increasing in t

    def sample_t(self, n: int, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """n timesteps (int64) from the configured distribution."""
        if self.t_distribution == "uniform":
            return torch.randint(self.t_min, self.t_max, (n,), device=device, generator=generator)
        log_sigma = self.p_mean + self.p_std * torch.randn(n, device=device, generator=generator)
        t = (self._log_sigma.to(device)[None, :] < log_sigma[:, None]).sum(-1)  # first t with σ_t ≥ σ
        return t.clamp(self.t_min, self.t_max - 1)

    def t_probabilities(self) -> torch.Tensor:
        """P(t) for t = 0..T−1 (float64), exact for the configured distribution."""
        T = self.schedule.T
        p = torch.zeros(T, dtype=torch.float64)
        if self.t_distribution == "uniform":
            p[self.t_min:self.t_max] = 1.0 / (self.t_max - self.t_min)
            return p
        z = (self._log_sigma.double() - self.p_mean) / self.p_std
        cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))  # P(ln σ ≤ ln σ_t) = P(drawn t ≤ t)
        p = torch.diff(cdf, prepend=torch.zeros(1, dtype=torch.float64))
        p[-1] += 1 - cdf[-1]  # beyond σ_{T−1}: the count reaches T, clamped to T−1
        lo, hi = self.t_min, self.t_max - 1  # clamp the tails
        p[lo] += p[:lo].sum()
        p[hi] += p[hi + 1:].sum()
        p[:lo], p[hi + 1:] = 0, 0
        return p

    def _draw(self, z0_rep: torch.Tensor, y_rep: torch.Tensor, generator: torch.Generator | None):
        n, dev = len(z0_rep), z0_rep.device
        t = self.sample_t(n, dev, generator)
        eps = torch.randn(z0_rep.shape, device=dev, dtype=z0_rep.dtype, generator=generator)
        if self.cond_drop_prob > 0:  # as DiffusionLoss: classifier-free guidance label drop
            drop = torch.rand(n, device=dev, generator=generator) < self.cond_drop_prob
            y_rep = torch.where(drop, torch.full_like(y_rep, self.null_label), y_rep)
        return t, eps, y_rep


def make_loss(cfg: DPDMConfig, schedule: NoiseSchedule, num_classes: int) -> HighNoiseDiffusionLoss:
    return HighNoiseDiffusionLoss(schedule, t_distribution=cfg.t_distribution, p_mean=cfg.p_mean, p_std=cfg.p_std,
                                  **cfg.loss_options(), cond_drop_prob=cfg.cond_drop_prob,
                                  null_label=num_classes if cfg.cond_drop_prob > 0 else None)


# ---------------------------------------------------------------------------------------------- data


@dataclass
class ImageSplits:
    """Images in [-1, 1] (float32 [N, C, H, W]) and labels (int64)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    name: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def to(self, device: torch.device) -> "ImageSplits":
        return ImageSplits(self.x_train.to(device), self.y_train.to(device), self.x_test.to(device),
                           self.y_test.to(device), self.num_classes, self.name)


def load_image_splits(dataset: str = "digits", path: str | None = None, test_fraction: float = 0.25,
                      split_seed: int = 0, balanced_train: bool = True) -> ImageSplits:
    """Stratified train/test split of an image source, scaled from [0, 1] to [-1, 1]; with
    ``balanced_train`` the training split keeps min_c n_c examples of every class (not long-tailed)."""
    data = load_dataset(dataset, path)
    if data.is_features:
        raise ValueError(f"dataset {dataset!r} holds feature vectors; the image-space reference needs images")
    train_idx, test_idx = stratified_split(data.y, test_fraction, split_seed)
    train_set, test_set = data.subset(train_idx), data.subset(test_idx)
    if balanced_train:
        train_set = train_set.subset(balanced_indices(train_set.y, split_seed, data.num_classes))

    def tensors(ds):
        return torch.as_tensor(ds.x) * 2 - 1, torch.as_tensor(ds.y)

    return ImageSplits(*tensors(train_set), *tensors(test_set), data.num_classes, data.name)


# ---------------------------------------------------------------------------------------------- denoiser


def make_unet(cfg: DPDMConfig, shape: tuple[int, ...], num_classes: int, seed: int) -> UNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "dpdm-unet-init"))
        return UNet(shape[0], num_classes, base_channels=cfg.base_channels, channel_mults=cfg.channel_mults,
                    num_res_blocks=cfg.num_res_blocks)


def dp_plan(cfg: DPDMConfig, target_epsilon: float | None, dataset_size: int) -> dict[str, Any]:
    """σ, q and the PLD ε actually spent by ``cfg.steps`` Poisson-subsampled Gaussian steps (σ calibrated
    to ``target_epsilon`` unless ``cfg.noise_multiplier`` fixes it; the spent ε is reported either way)."""
    q = min(1.0, cfg.batch_size / dataset_size)
    if target_epsilon is None:
        return {"private": False, "sigma": 0.0, "sample_rate": q, "epsilon": None, "target_epsilon": None}
    check_delta_for_size(cfg.delta, dataset_size, "the DPDM training images")
    sigma = cfg.noise_multiplier or calibrate_noise(target_epsilon, cfg.delta, q, cfg.steps)
    spent = privacy_epsilon([GaussianEvent(sigma, q, cfg.steps, DPSGD_EVENT)], cfg.delta)
    return {"private": True, "sigma": sigma, "sample_rate": q, "epsilon": spent, "target_epsilon": target_epsilon}


def make_engine(model: nn.Module, opt: torch.optim.Optimizer, sigma: float, dataset_size: int, sample_rate: float,
                cfg: DPDMConfig, noise: NoiseSource, ema: EMA | None = None) -> DPSGD:
    """``DPSGD`` on the ``torch.func.vmap`` per-example path. A conv U-Net cannot take the engine's
    [B, K, C, H, W] layout of the Opacus-hook paths (``Conv2d``/``GroupNorm`` want [N, C, H, W] and
    the hooks must see the B examples, not B·K rows), so ``method="vmap"`` is asked for where the
    engine has a ``method`` argument; the K draws then stay inside the per-example loss."""
    kw: dict[str, Any] = {}
    params = inspect.signature(DPSGD).parameters
    if "method" in params:
        kw["method"] = "vmap"
    if "tune_allocator" in params:
        kw["tune_allocator"] = cfg.tune_allocator
    return DPSGD(model, opt, noise_multiplier=sigma, max_grad_norm=cfg.max_grad_norm, dataset_size=dataset_size,
                 sample_rate=sample_rate, max_physical_batch_size=cfg.max_physical_batch_size, noise=noise, ema=ema,
                 track_norms=False, **kw)


def train_denoiser(x: torch.Tensor, y: torch.Tensor, num_classes: int, target_epsilon: float | None,
                   cfg: DPDMConfig = DPDMConfig(), seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """Train a U-Net on images ``x`` ([-1, 1]) with labels ``y``; returns (EMA model in eval mode, info).

    ``target_epsilon`` set: DP-SGD (Poisson rate q = batch/N, σ calibrated by PLD to the target at
    ``cfg.delta`` for ``cfg.steps`` steps, clipping C, noise multiplicity K). ``None``: plain minibatch
    Adam on the same loss, batch size, steps and EMA (no clipping, no noise).
    """
    t0 = time.perf_counter()
    schedule = cfg.make_schedule()
    loss_fn = make_loss(cfg, schedule, num_classes)
    model = make_unet(cfg, tuple(x.shape[1:]), num_classes, seed).to(x.device).train()  # the data's device
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    ema = EMA(model, cfg.ema_decay)
    plan = dp_plan(cfg, target_epsilon, len(x))
    K = cfg.noise_multiplicity
    stats: list[dict[str, float]] = []
    with torch.random.fork_rng(devices=[]):  # nothing below moves the caller's RNG
        if plan["private"]:
            # OS entropy (each target ε is an independent release); the debug switch derives it per target
            noise = NoiseSource(cfg.reproducible_noise, derive_seed(seed, "dpdm-dpsgd", target_epsilon))
            engine = make_engine(model, opt, plan["sigma"], len(x), plan["sample_rate"], cfg, noise, ema)

            def update(step: int) -> dict[str, float]:
                return engine.diffusion_step(loss_fn, K, (x, y), step, derive_seed(seed, "dpdm-draws", step))

            # the private steps' statistics describe private batches: neither logged nor shown (log_metrics)
            run_steps({"unet": model}, engine.optimizer, update, cfg.steps, ema=ema, log_metrics=False,
                      description=f"DPDM U-Net (ε = {target_epsilon:g}, σ = {plan['sigma']:.3f})")
        else:
            def step_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
                idx = shuffled_batch(len(x), min(cfg.batch_size, len(x)), step, derive_seed(seed, "dpdm-batches"),
                                     x.device)
                g = generator(x.device, seed, "dpdm-draws", step)
                return (loss_fn(model, x[idx], y[idx], noise_multiplicity=K, generator=g).loss.mean(),
                        {"batch_size": float(len(idx))})

            train({"unet": model}, opt, step_fn, cfg.steps, description="DPDM U-Net (non-private)", ema=ema,
                  log=stats.append, log_every=1)  # every step's loss: the info's last-10 % mean
    tail = stats[-max(1, len(stats) // 10):]  # last 10 % of the steps
    info = {**plan, "delta": cfg.delta if plan["private"] else None, "steps": cfg.steps,
            "expected_batch_size": cfg.batch_size, "noise_multiplicity": K, "max_grad_norm": cfg.max_grad_norm,
            "parameters": sum(p.numel() for p in model.parameters()),
            # the realised private batch sizes are not released (they describe the private set)
            "train_seconds": time.perf_counter() - t0}
    for key in ("loss",):  # non-private models only (the DP steps' statistics are not released)
        if stats and key in stats[0]:
            info[f"{key}_last10pct"] = float(np.nanmean([s[key] for s in tail]))
    return ema.module.eval(), info


@torch.no_grad()
def sample_balanced(model: nn.Module, num_classes: int, n_per_class: int, shape: tuple[int, ...],
                    cfg: DPDMConfig = DPDMConfig(), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_per_class`` images of every class with the few-step sampler; (x in [-1, 1], y)."""
    device = next(model.parameters()).device
    y = torch.arange(num_classes, device=device).repeat_interleave(n_per_class)
    net = model if cfg.guidance_scale == 1.0 else ClassifierFreeGuidance(model, num_classes, cfg.guidance_scale)
    x = generate(cfg.sampler, cfg.denoiser(net), (len(y), *shape), y, cfg.sampler_steps,
                 generator=generator(device, seed, "dpdm-sample"), spacing=cfg.spacing)
    return x.clamp(-1, 1), y


# ---------------------------------------------------------------------------------------------- evaluation


class ImageClassifier(nn.Module):
    """SmallCNN encoder (GroupNorm) + linear head; ``features`` are the FID features."""

    def __init__(self, shape: tuple[int, ...], num_classes: int, feature_dim: int = 64, width: int = 32):
        super().__init__()
        self.encoder = create_encoder("cnn", tuple(shape), feature_dim, width)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.silu(self.encoder(x)))


def train_image_classifier(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, steps: int = 400,
                           batch_size: int = 128, lr: float = 1e-3, feature_dim: int = 64, width: int = 32,
                           seed: int = 0, tag: str = "clf") -> ImageClassifier:
    """Cross-entropy training with Adam on shuffled batches; returned in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, tag, "init"))
        clf = ImageClassifier(tuple(x.shape[1:]), num_classes, feature_dim, width).to(x.device)

    def step_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        idx = shuffled_batch(len(x), min(batch_size, len(x)), step, derive_seed(seed, tag, "batches"), x.device)
        return F.cross_entropy(clf(x[idx]), y[idx]), {}

    train({"classifier": clf}, torch.optim.Adam(clf.parameters(), lr=lr), step_fn, steps,
          description=f"image classifier ({tag})")
    return clf.eval()


@torch.no_grad()
def _batched(fn, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def accuracy(clf: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((_batched(clf, x).argmax(1) == y).float().mean())


@torch.no_grad()
def feature_fid(extractor: ImageClassifier, real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between the extractor's features of two image sets (project's ``frechet_distance``)."""
    f_real = _batched(extractor.features, real).double().cpu().numpy()
    f_fake = _batched(extractor.features, fake).double().cpu().numpy()
    return frechet_distance(f_real, f_fake)


def cas_accuracy(x_gen: torch.Tensor, y_gen: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                 num_classes: int, *, steps: int = 400, batch_size: int = 128, lr: float = 1e-3,
                 feature_dim: int = 64, width: int = 32, seed: int = 0) -> float:
    """Classification accuracy score: train on generated labelled images, test on real ones (in [0, 1])."""
    clf = train_image_classifier(x_gen, y_gen, num_classes, steps=steps, batch_size=batch_size, lr=lr,
                                 feature_dim=feature_dim, width=width, seed=seed, tag="cas")
    return accuracy(clf, x_test, y_test)


def save_grid(path: Path, x: torch.Tensor, y: torch.Tensor, num_classes: int, per_class: int = 10,
              title: str = "") -> Path:
    """PNG grid (matplotlib, no pyplot state): one row per class, ``per_class`` samples each; x in [-1, 1]."""
    from matplotlib.figure import Figure

    x = ((x.detach().cpu().float() + 1) / 2).clamp(0, 1)
    fig = Figure(figsize=(per_class * 0.6, num_classes * 0.6 + (0.4 if title else 0)))
    axes = fig.subplots(num_classes, per_class, squeeze=False)
    for c in range(num_classes):
        idx = torch.nonzero(y == c).flatten()[:per_class]
        for j in range(per_class):
            ax = axes[c][j]
            ax.set_axis_off()
            if j < len(idx):
                img = x[idx[j]]
                if img.shape[0] == 1:
                    ax.imshow(img[0].numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
                else:
                    ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(wspace=0.05, hspace=0.05, left=0.01, right=0.99, bottom=0.01, top=0.93 if title else 0.99)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


# ---------------------------------------------------------------------------------------------- entry point


def attack_images(model: nn.Module, data: ImageSplits, cfg: DPDMConfig, seed: int) -> dict[str, Any]:
    """Membership inference on the image denoiser: training images (members) against the test split (never
    trained on, same distribution), balanced per class; loss, SecMI and PIA (``evaluation.mia``)."""
    mem, non = balanced_pairs(data.y_train.numpy(), data.y_test.numpy(), data.num_classes, seed)
    metrics, _ = run_attacks(cfg.denoiser(model.eval()), data.x_train[mem], data.y_train[mem], data.x_test[non], data.y_test[non],
                             seed=seed, attack_kwargs=attack_settings(cfg.T))
    return metrics


def composed_epsilon(models: list[dict[str, Any]], delta: float) -> dict[str, float] | None:
    """ε of releasing every private model together: they are trained on the same images with independent
    noise, so their DP-SGD runs compose (None when no model is private)."""
    events = [GaussianEvent(m["sigma"], m["sample_rate"], m["steps"], m["tag"]) for m in models if m["private"]]
    return epsilon_all(events, delta) if events else None


def _tag(eps: float | None) -> str:
    return "nonprivate" if eps is None else f"eps{eps:g}"


def run_dpdm(out_dir: Path, epsilons: tuple[float | None, ...] = (1.0, 10.0, None), seed: int = 0,
             steps: int | None = None, config: DPDMConfig | None = None, **overrides: Any) -> dict[str, Any]:
    """Train, sample and score one DPDM per ε (``None`` = non-private); write ``out_dir/dpdm_results.json``
    (atomically, after every model) and ``out_dir/dpdm_samples_<tag>.png``; return the results dict.

    ``steps`` and any ``DPDMConfig`` field given as keyword override ``config`` (default ``DPDMConfig()``).
    """
    update = {**overrides, **({} if steps is None else {"steps": steps})}
    cfg = DPDMConfig.model_validate({**(config or DPDMConfig()).model_dump(), **update})
    if cfg.t_distribution not in T_DISTRIBUTIONS:
        raise ValueError(f"unknown t distribution {cfg.t_distribution!r}")
    out_dir = Path(out_dir)
    threads = torch.get_num_threads()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _run(out_dir, epsilons, seed, cfg)
    finally:
        torch.set_num_threads(threads)


def _run(out_dir: Path, epsilons: tuple[float | None, ...], seed: int, cfg: DPDMConfig) -> dict[str, Any]:
    t_start = time.perf_counter()
    data = load_image_splits(cfg.dataset, cfg.data_path, cfg.test_fraction, cfg.split_seed, cfg.balanced_train)
    data = data.to(resolve_device(cfg.device))  # every model below is built on its data's device
    C = data.num_classes
    clf_kw = dict(steps=cfg.clf_steps, batch_size=cfg.clf_batch_size, lr=cfg.clf_lr,
                  feature_dim=cfg.clf_feature_dim, width=cfg.clf_width)
    t0 = time.perf_counter()
    # Utility is measured on held-out data only: the test split is halved (stratified) into the evaluator's
    # training half and the reference half (FID reference, CAS test set); the private training images feed
    # nothing but the denoisers (a classifier fitted on them would be an unaccounted release).
    fit_idx, ref_idx = stratified_split(data.y_test.numpy(), 0.5, cfg.split_seed)
    x_fit, y_fit = data.x_test[fit_idx], data.y_test[fit_idx]
    x_ref, y_ref = data.x_test[ref_idx], data.y_test[ref_idx]
    evaluator = train_image_classifier(x_fit, y_fit, C, seed=seed, tag="fid-evaluator", **clf_kw)
    results: dict[str, Any] = {
        "method": "DPDM (Dockhorn et al. 2022): U-Net, DP-SGD with noise multiplicity, high-noise t distribution",
        "seed": seed,
        "config": cfg.model_dump(mode="json"),
        "data": {"name": data.name, "shape": list(data.shape), "num_classes": C, "n_train": len(data.x_train),
                 "n_test": len(data.x_test), "n_evaluator_fit": len(fit_idx), "n_reference": len(ref_idx)},
        "noise": NoiseSource(cfg.reproducible_noise).label,
        "neighbouring_relation": "add/remove one training image (Poisson subsampling)",
        "evaluator": {
            "features": f"penultimate {cfg.clf_feature_dim}-d features of a SmallCNN classifier trained on the held-out "
                        "half of the test split; FID = pfdiff.evaluation.fid.frechet_distance(reference-half features, "
                        "sample features)",
            "reference_accuracy": accuracy(evaluator, x_ref, y_ref),
            "fid_heldout_fit_vs_reference": feature_fid(evaluator, x_ref, x_fit),
            "cas_real_heldout": cas_accuracy(x_fit, y_fit, x_ref, y_ref, C, seed=seed, **clf_kw),
            "seconds": time.perf_counter() - t0},
        "models": [],
    }
    for eps in epsilons:
        t0 = time.perf_counter()
        model, info = train_denoiser(data.x_train, data.y_train, C, eps, cfg, seed)
        x_gen, y_gen = sample_balanced(model, C, cfg.n_per_class, data.shape, cfg, seed)
        fid = feature_fid(evaluator, x_ref, x_gen)
        cas = cas_accuracy(x_gen, y_gen, x_ref, y_ref, C, seed=seed, **clf_kw)
        label = "non-private" if eps is None else f"ε = {info['epsilon']:.3g} (target {eps:g}), σ = {info['sigma']:.3g}"
        grid = save_grid(out_dir / f"dpdm_samples_{_tag(eps)}.png", x_gen, y_gen, C, title=f"DPDM {data.name}, {label}")
        attacks = attack_images(model, data, cfg, seed)
        results["models"].append({"tag": _tag(eps), **info, "sampler": cfg.sampler, "sampler_steps": cfg.sampler_steps,
                                  "n_generated": len(x_gen), "fid": fid, "cas": cas, "grid": grid.name,
                                  "attacks": attacks, "wall_seconds": time.perf_counter() - t0})
        results["composed_epsilon"] = composed_epsilon(results["models"], cfg.delta)
        results["wall_seconds"] = time.perf_counter() - t_start
        atomic_write_json(out_dir / "dpdm_results.json", results)
    results["wall_seconds"] = time.perf_counter() - t_start
    atomic_write_json(out_dir / "dpdm_results.json", results)
    return results
