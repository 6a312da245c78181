"""One typed config (pydantic), loaded from YAML presets or files, overridable with ``--set a.b=value``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

PRESET_DIR = Path(__file__).parent / "presets"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not a silent default


class DiffusionSpec:
    """What a section with ``schedule``, ``T`` and ``prediction`` builds: the schedule, the training loss and
    the denoiser wrapper, so the parameterisation is read here and nowhere above the diffusion core."""

    def make_schedule(self):
        from pfdiff.diffusion import make_schedule
        return make_schedule(self.schedule, self.T)

    def denoiser(self, net, schedule=None):
        """``net`` as ``Denoiser(net, schedule, prediction)``: what samplers, attacks and analyses take."""
        from pfdiff.diffusion import Denoiser
        return Denoiser(net, self.make_schedule() if schedule is None else schedule, self.prediction)

    def loss_options(self) -> dict[str, Any]:
        """The keyword arguments of ``DiffusionLoss`` this section fixes (the loss class may differ: DPDM's)."""
        return {"prediction": self.prediction, "weighting": getattr(self, "weighting", "uniform")}


class DataConfig(Section):
    name: str = "digits"  # digits | mnist1d | mnist | fmnist | cifar10 | cifar100 | npz
    path: str | None = None  # user path for every source except digits and mnist1d
    # mnist1d only: signals generated (N/10 per class, seeded by split_seed). 50 000 leave 4 000 per class in the
    # training pool at test_fraction 0.2, so IF=100 keeps >= 30 in the rarest class even after a validation split
    num_samples: int = Field(50_000, ge=10)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    imbalance_factor: float = Field(50.0, ge=1)  # n_c = n_max · IF^(−c/(C−1))
    split_seed: int = 0  # the split is fixed across training seeds
    # balanced validation set (this many per class) held out of the training pool *before* the long-tailed
    # subsampling, as ImageNet-LT's 20/class; every choice (τ, pseudo weight) is made on it, never on test. 0: none
    val_per_class: int = Field(10, ge=0)


class ModelConfig(Section):
    # auto: identity / cnn1d / cnn by input rank (the names of models.encoders.ENCODERS, checked by a test)
    encoder: Literal["auto", "cnn", "cnn1d", "resnet32", "identity", "mlp"] = "auto"
    feature_dim: int = Field(64, ge=2)
    width: int = Field(32, ge=4)
    classifier: Literal["linear", "cosine"] = "linear"
    denoiser_hidden: int = Field(256, ge=8)
    denoiser_depth: int = Field(3, ge=1)
    # the denoiser's skip from z_t to ε̂: a full dim × dim linear map, or per-dimension (O(dim)); auto: linear
    # up to 512-d features (every preset's 64-d), diagonal above (e.g. 2048-d ResNet-50 features)
    denoiser_skip: Literal["auto", "linear", "diagonal"] = "auto"
    time_dim: int = Field(64, ge=4)


class OptimConfig(Section):
    """Stage 1 (E + G): optimiser, learning-rate schedule, augmentation and the parameters of the stage-1
    losses (the loss itself is chosen per method: ``BASE@LOSS``, see longtail/methods.py and
    docs/longtail_protocol.md)."""

    epochs: int = Field(60, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"  # sgd: the field's CIFAR-LT recipe (lr 0.1, momentum 0.9, wd 2e-4)
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd only
    nesterov: bool = False  # sgd only
    schedule: Literal["constant", "cosine", "step"] = "constant"  # per optimiser step, after the warm-up
    warmup_epochs: float = Field(0.0, ge=0)  # linear warm-up of the lr from lr/W to lr over W steps (LDAM: 5 of 200)
    step_milestones: list[float] = [0.8, 0.9]  # step: fractions of training at which lr ×= step_gamma (LDAM: 160, 180 of 200)
    step_gamma: float = Field(0.1, gt=0, le=1)  # LDAM's code: 0.01
    # none | auto (crop-flip for images with H, W ≥ 16, shift for 1-D signals [N, 1, L], none otherwise) |
    # crop-flip | crop | flip | shift; on-device tensor ops, seeded per step
    augment: Literal["none", "auto", "crop-flip", "crop", "flip", "shift"] = "none"
    augment_pad: int = Field(4, ge=0)  # random-crop padding (images), largest shift (1-D signals)
    shift_mode: Literal["zero", "circular"] = "zero"  # 1-D shift: zero padding or roll
    la_tau: float = Field(1.0, ge=0)  # τ of the logit-adjusted loss `@la-loss` (Menon et al. 2021 use 1 = `@bsce`)
    ldam_max_margin: float = Field(0.5, gt=0)  # `@ldam-drw`: largest margin (of the rarest class), cosine units
    ldam_scale: float = Field(30.0, gt=0)  # `@ldam-drw`: s, the scale of the normalised (cosine) classifier
    drw_start: float = Field(0.8, ge=0, le=1)  # `@ldam-drw`: deferred re-weighting from this fraction of the epochs
    drw_beta: float = Field(0.9999, ge=0, lt=1)  # `@ldam-drw`: effective-number β of the DRW class weights


class DiffusionConfig(Section, DiffusionSpec):
    schedule: Literal["linear", "cosine"] = "linear"
    T: int = Field(1000, ge=2)
    # v, not ε: with ε-prediction ẑ0 amplifies errors by 1/√ᾱ_T at high noise and rare trajectories diverge
    # (see tests/test_samplers.py::test_trained_model_matches_a_known_gaussian_mixture)
    prediction: Literal["eps", "v", "x0"] = "v"
    weighting: Literal["uniform", "inv_sqrt", "min_snr"] = "uniform"
    steps: int = Field(4000, ge=1)  # optimisation steps of the denoiser
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    cond_drop_prob: float = Field(0.1, ge=0, le=1)  # classifier-free guidance: label dropped with this probability
    guidance_scale: float = Field(1.0, ge=0)
    sampler: Literal["ddpm", "ddim", "heun"] = "ddim"
    sample_steps: int = Field(50, ge=1)
    eta: float = Field(0.0, ge=0)
    # pseudo-features per sampler call: memory stays bounded by it however many are requested (the initial
    # noise is drawn for all rows first, so with η = 0 the chunking does not change the samples)
    sample_batch: int = Field(4096, ge=1)


class PseudoConfig(Section):
    """LDMLR stage 3: which pseudo-features to generate and how G is fine-tuned on them."""

    # max: every class up to n_max; fixed: per_class each; ratio: ratio·n_max; proportional (LDMLR's code):
    # max(round(proportion·n_c), min_per_class) per class, so the imbalance is kept
    fill: Literal["max", "fixed", "ratio", "proportional"] = "max"
    per_class: int = Field(100, ge=0)
    ratio: float = Field(1.0, ge=0)
    proportion: float = Field(0.2, ge=0)
    min_per_class: int = Field(5, ge=0)
    finetune_epochs: int = Field(30, ge=1)
    finetune_lr: float = Field(1e-3, gt=0)
    finetune_batch_size: int | None = Field(None, ge=1)  # None: stage1.batch_size (LDMLR's code: 1024)
    finetune_weight_decay: float | None = Field(None, ge=0)  # None: stage1.weight_decay (LDMLR's code: Adam, 0)
    pseudo_weight: float = Field(1.0, ge=0)  # weight of pseudo-feature terms in the CE loss


class E2EConfig(Section):
    """End-to-end E, G, ε_θ training (strategies A/B/C) and its AID filter; see longtail/end_to_end.py."""

    # None: the budget of stage 1 — as many encoder steps (stage1.epochs × ⌈N/B⌉) with its batch size, lr,
    # schedule and augmentation, so E2E and the two-stage methods are compared at equal encoder steps
    steps: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=2)
    lr: float = Field(1e-3, gt=0)  # ε_θ's AdamW lr (E and G use stage1.lr and its schedule)
    weight_decay: float = Field(5e-4, ge=0)  # ε_θ's; E and G use stage1.weight_decay
    lambda_sem: float = Field(1.0, ge=0)  # λ_sem: weight of L_LDM^sem
    eta_proto: float = Field(0.1, ge=0)  # η_p
    eta_cov: float = Field(0.1, ge=0)  # η_c
    eta_rad: float = Field(0.1, ge=0)  # η_r
    gamma_ge: float = Field(0.5, ge=0)  # γ_ge: weight of L_ge (A, B; C uses its pseudo share instead)
    ge_every: int = Field(5, ge=1)  # A: a fast DDIM sample drives L_ge every k steps
    ge_batch: int = Field(64, ge=1)  # pseudo-features per L_ge term (A, B)
    ge_steps: int = Field(5, ge=1)  # DDIM steps of on-the-fly generation
    # gradient routing of the coupled objective (research note 001: L_total minimised over {E, G, θ} together);
    # the method suffix -detached turns all three off (the pre-issue-15 ablation: E trained by CE alone)
    ldm_grad_to_encoder: bool = True  # L_LDM^sem's gradient flows into E (else θ sees z detached)
    ge_grad_to_denoiser: bool = True  # L_ge's gradient flows back through the few-step sampler into θ
    ge_grad_to_encoder: bool = True  # L_ge reaches E through the scaler's statistics of the real batch
    warm_start: Literal["none", "stage1", "stage2"] = "none"  # -ws1 / -ws2: E, G from stage 1 (+ ε_θ, scaler from stage 2)
    warmup_steps: int = Field(300, ge=0)  # semantic-weight warm-up (A, B; at most 20 % of the run); L_ge starts after it
    alternate: tuple[int, int] = (1, 1)  # B: θ-steps : E,G-steps
    progressive_phases: tuple[float, float] = (0.3, 0.5)  # C: L_sem from 30 %, L_ge from 50 % of steps
    pseudo_share: tuple[float, float] = (0.1, 0.3)  # C: pseudo share of G's loss mass (and rows) rises from → to
    tail_power: float = Field(1.0, ge=0)  # classes for L_ge drawn ∝ n_c^(−power)
    wide_temperature: float = Field(1.5, gt=0)  # -wide: the sampler's initial noise × this (a widened class spread)
    proto_momentum: float = Field(0.1, gt=0, le=1)  # λ of the EMA prototypes
    pseudo_proto_weight: float = Field(0.3, ge=0, le=1)  # pseudo-features' weight in the prototype EMA
    radius_scale: float = Field(1.0, gt=0)  # r_y = scale·√tr(Σ_y)
    cov_min_count: int = Field(4, ge=2)  # batch-only L_cov (cov_shrink = 0): classes with fewer rows are skipped
    # L_cov's estimate of Σ̂_y(z̃0) borrows k pseudo-rows of its EMA over earlier steps, and its target is Σ_y
    # shrunk towards the pooled covariance with the same k: every class in the batch, tail included, is matched
    cov_shrink: float = Field(4.0, ge=0)
    aid_quantile: float = Field(0.95, gt=0, le=1)  # AID threshold: quantile of real features' scores
    boundary_quantile: float = Field(0.5, gt=0, le=1)  # -bnd: of the AID-kept, keep margins up to this quantile
    drift_every: int = Field(100, ge=1)  # steps between drift measurements / AID scorer refits (on the current E)
    drift_per_class: int = Field(50, ge=2)  # pseudo-features per class for the drift FD and the coverage metric
    coverage_k: int = Field(3, ge=1)  # k of the k-NN manifolds of the coverage metric (Kynkäänniemi et al. 2019)


class PrivacyConfig(Section):
    """Differential privacy of the feature diffusion (method ``dp-ldmlr``); see docs/privacy.md.

    The long-tailed training set is split per class into a declared *public* part (encoder, scaler,
    stage-1 classifier: no privacy cost) and the *private* rest; every release derived from the
    private part goes through the accountant (``privacy/accounting.py``).
    """

    mechanism: Literal["dpsgd", "dp-promise"] = "dpsgd"  # dp-promise: two DP-SGD phases (t ≥ S, then t < S)
    target_epsilon: float = Field(10.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)  # must also lie below 1/N_private (checked before any work)
    # debugging only: DP noise derived from the run seed (replayable) — the run is then NOT PRIVATE, and
    # ledger, report and CLI say so. Default: every private draw from OS entropy (privacy/noise.py).
    reproducible_noise: bool = False
    secure_mode: bool = False  # Opacus' floating-point-safe Gaussian (Σ of 4 normals / 2): 4× the noise draws
    accountant: Literal["pld", "rdp", "prv"] = "pld"  # calibrates σ and enforces the budget; all three are reported
    public_fraction: float = Field(0.5, gt=0, lt=1)  # per class, of the long-tailed training set
    count_epsilon: float = Field(0.5, ge=0)  # ε spent on the noisy class counts (0: counts declared public)
    max_grad_norm: float = Field(1.0, gt=0)  # C
    noise_multiplier: float | None = Field(None, gt=0)  # σ; None: calibrated to target_epsilon
    noise_multiplicity: int = Field(8, ge=1)  # K draws of (t, ε) per example, averaged before clipping
    expected_batch_size: int = Field(128, ge=1)  # logical batch (Poisson sampling, q = B/N)
    max_physical_batch_size: int = Field(512, ge=1)
    steps: int = Field(1500, ge=1)  # logical DP-SGD steps (Phase II for dp-promise)
    lr: float = Field(1e-4, gt=0)  # small: noise-dominated Adam steps move every weight by ≈ lr (a public warm start survives)
    feature_radius: float = Field(8.0, gt=0)  # R: standardised private features are L2-clipped to R (√64 = 8)
    promise_S: int = Field(900, ge=1)  # dp-promise: Phase I = DP-SGD on t ∈ [S, T) (same σ, calibrated jointly)
    promise_phase1_steps: int = Field(500, ge=0)
    promise_phase1_batch: int = Field(16, ge=1)  # Phase I's expected batch (its own Poisson rate)
    promise_conditional_phase1: bool = False  # Phase I sees labels (covered: Phase I is DP-SGD on (x, y))
    encoder: Literal["public", "dp"] = "public"  # E + stage-1 G: trained on the public part, or DP-SGD on the private part
    encoder_epsilon_share: float = Field(0.5, gt=0, lt=1)  # encoder: dp — share of target ε given to E + G
    encoder_steps: int = Field(300, ge=1)  # encoder: dp — logical DP-SGD steps of E + G
    encoder_batch_size: int = Field(64, ge=1)  # encoder: dp — expected logical batch
    public_pretrain: bool = True  # warm-start ε_θ non-privately on the public features (free), then DP on the private
    aid_filter: bool = True  # AID/OOD-filter DP pseudo-features with a scorer fit on *public* features (free)


class FederatedConfig(Section):
    """Federated feature diffusion on Flower (``pfdiff fed``); see docs/federated.md.

    Clients hold a Dirichlet(α) (α = 0: IID) partition of the long-tailed training set. Phases: E + G by
    FedAvg (or a public encoder on a declared public split), feature statistics, a FedAvg re-weighting
    baseline for G, the warm-up that builds the server's auxiliary pool, then the diffusion rounds of
    each method (``fedavg``, ``fedddpm``, ``fedddpm+``, ``progressive``).
    """

    num_clients: int = Field(10, ge=1)
    clients_per_round: int | None = Field(None, ge=1)  # FedAvg rounds: clients sampled per round (None: all)
    alpha: float = Field(0.5, ge=0)  # Dirichlet label-skew concentration; 0 ⇒ IID
    compare_alphas: list[float] = [0.0, 0.1, 0.5]  # `pfdiff fed`: one run per α, then one report
    min_partition_size: int = Field(5, ge=1)
    methods: list[str] = ["fedavg", "fedddpm", "fedddpm+", "progressive"]
    rounds: int = Field(20, ge=1)  # diffusion rounds per method
    local_steps: int = Field(20, ge=1)
    local_lr: float = Field(1e-3, gt=0)
    local_batch_size: int = Field(64, ge=1)
    encoder: Literal["fedavg", "public"] = "fedavg"  # public: E + G + scaler fitted on a declared public split
    encoder_rounds: int = Field(10, ge=1)
    encoder_local_steps: int = Field(20, ge=1)
    reweight_rounds: int = Field(5, ge=0)  # FedAvg of G with class-weighted CE (the re-weighting baseline)
    warmup_steps: int = Field(1500, ge=1)  # local steps of each client's own denoiser before FL (Peng et al.)
    warmup_upload: Literal["features", "model"] = "features"  # what a client uploads to build the aux pool
    aux_size: int = Field(1000, ge=10)  # generation budget B of auxiliary pseudo-features (all methods)
    aux_val_share: float = Field(0.2, gt=0, lt=1)  # held-out slice of the warm-up pool: QUICK-TEST / score
    server_steps: int = Field(20, ge=0)  # FedDDPM: server Adam steps on the aux pool after each aggregation
    server_lr: float = Field(1e-3, gt=0)
    server_batch_size: int = Field(128, ge=1)
    quick_test_threshold: float = Field(0.01, ge=0)  # FedDDPM+: stop when the relative gain falls below
    quick_test_patience: int = Field(1, ge=1)  # … this many rounds in a row
    plus_steps: int = Field(200, ge=1)  # FedDDPM+: one-shot server fine-tuning steps at the stop
    pool_initial_share: float = Field(0.6, gt=0, le=1)  # progressive: share of B generated at warm-up
    regen_share: float = Field(0.1, gt=0, le=1)  # progressive: share of the pool regenerated per accepted round
    evict: Literal["stalest", "worst"] = "stalest"
    # class-aware pool (issue 19): per-class quotas of B from the released (noisy) counts n_c — histogram ∝ n_c
    # (the global long-tailed profile), balanced B/C, tail ∝ n_c^(−1/2); used by the warm-up and regeneration
    pool_quota: Literal["histogram", "balanced", "tail"] = "histogram"
    correction_weight: Literal["none", "balanced"] = "none"  # balanced: class-balanced batches in the correction
    # the gate's score (FedDDPM+, progressive): the held-out pool slice, the clients' own features (a release:
    # noisy under dp = example, NOT private without DP) or the declared public part (needs encoder = public)
    score_source: Literal["pool", "clients", "public"] = "pool"
    score_clip: float = Field(2.0, gt=0)  # L: dp = example clips each client's per-example score loss to [0, L]
    score_epsilon: float = Field(1.0, gt=0)  # dp = example: ε of all planned client-score releases of one method
    accept_min_gain: float = -0.02  # progressive: accept when the score's relative gain lies in [min, max]
    accept_max_gain: float = 1.0
    repair_per_class: int = Field(100, ge=1)  # long-tail repair: balanced pseudo-features per class
    repair_epochs: int = Field(30, ge=1)
    # federated baselines with rounds of their own (fedavg-ce and fedavg-ce+la always come with E + G):
    # fedavg-reweight (class-weighted CE) and creff (Shang et al. 2022, federated features; docs/federated.md)
    baselines: list[str] = ["fedavg-reweight", "creff"]
    creff_features_per_class: int = Field(100, ge=1)  # CReFF's num_of_feature
    creff_match_steps: int = Field(100, ge=1)  # match_epoch: feature updates per round
    creff_lr_feature: float = Field(0.1, gt=0)  # lr_feature (SGD on the federated features)
    creff_retrain_epochs: int = Field(300, ge=1)  # crt_epoch: classifier re-training epochs per round
    creff_lr_net: float = Field(0.01, gt=0)  # lr_net (SGD of the re-trained classifier)
    creff_batch_size: int = Field(32, ge=1)  # re-training batch (batch_size_local_training)
    # which round's re-trained classifier CReFF keeps: the one with the best validation balanced accuracy (a
    # checkpoint choice on the validation split; the final one without a validation split), or the final one
    creff_round: Literal["validation", "final"] = "validation"
    creff_clip: float = Field(1.0, gt=0)  # dp = example: per-example L2 clip of the classifier gradient
    creff_noise_multiplier: float = Field(0.0, ge=0)  # dp = example: σ of the gradient sums; 0 = calibrate to ε
    dp: Literal["none", "example", "client"] = "none"  # example: DP-SGD on clients; client: clipped updates + server noise
    client_noise_multiplier: float = Field(1.0, gt=0)  # dp = client (Flower's server-side fixed clipping)
    client_clip: float = Field(1.0, gt=0)
    min_replies: int = Field(1, ge=1)  # a round with fewer successful replies keeps the previous model
    round_timeout: float = Field(600.0, gt=0)  # seconds a round waits for replies
    fail_partitions: list[int] = []  # fault injection (tests): these clients raise during training
    num_cpus: int = Field(2, ge=1)  # Ray simulation
    client_gpus: float = Field(0.25, gt=0, le=1)  # Ray simulation on CUDA: share of one GPU per simulated client


class DPDMConfig(Section, DiffusionSpec):
    """Image-space DPDM reference (``pfdiff dpdm``; imagespace/dpdm.py): every knob of ``run_dpdm``; defaults
    fit 3 models on 8×8 digits in ≈ 8 min on 2 CPU cores."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    epsilons: tuple[float | None, ...] = (1.0, 10.0, None)  # target ε per model; null = non-private
    seed: int = 0

    # data: a stratified split of the (balanced) digits; the test part is FID reference and CAS test set
    dataset: str = "digits"
    device: str = "auto"  # auto | cpu | cuda | cuda:N (auto: CUDA when present)
    data_path: str | None = None
    test_fraction: float = 0.25
    split_seed: int = 0
    balanced_train: bool = True
    # diffusion: discrete VP cosine schedule, v-prediction with unit weight (the discrete analogue of the
    # EDM loss DPDM uses), t drawn from a log-normal in σ that favours high noise (HighNoiseDiffusionLoss)
    schedule: str = "cosine"
    T: int = 1000
    prediction: str = "v"
    t_distribution: str = "lognormal"
    p_mean: float = 0.5
    p_std: float = 1.2
    cond_drop_prob: float = 0.1  # DPDM's label_unconditioning_prob (enables CFG at sampling)
    # U-Net (small: DP-SGD's noise grows with the parameter count)
    base_channels: int = 16
    channel_mults: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    # training (the same for the private and the non-private models)
    steps: int = 300
    batch_size: int = 256  # expected (Poisson) logical batch; q = batch_size / N ≈ 0.19 on digits
    noise_multiplicity: int = 4  # K
    lr: float = 2e-3
    ema_decay: float = 0.99
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    noise_multiplier: float | None = None  # None: calibrated (PLD) to each target ε; a number: used as is
    reproducible_noise: bool = False  # debugging only: DP noise from the seed; the results are then NOT PRIVATE
    max_physical_batch_size: int = 256
    num_threads: int | None = None  # torch intra-op threads during run_dpdm (None: leave as is); 1 on a busy CPU
    tune_allocator: bool = True  # DPSGD's glibc tuning (process-wide): ~2× faster vmap DP steps on CPU
    # sampling
    sampler: str = "ddim"
    sampler_steps: int = 20
    spacing: str = "trailing"
    guidance_scale: float = 1.0  # 1 = plain conditional model
    n_per_class: int = 100
    # evaluator / CAS classifier: SmallCNN + linear head, Adam
    clf_feature_dim: int = 64
    clf_width: int = 32
    clf_steps: int = 400
    clf_batch_size: int = 128
    clf_lr: float = 1e-3
    extra: dict[str, Any] = {}  # free-form notes recorded in the results


class RegimesConfig(Section):
    """Sizes of every measurement; defaults run digits features + images in ≈ 5 min on one CPU thread (small
    matrices: one thread is faster than two here)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0
    preset: str = "quickstart"  # run config of the feature pipeline (data, encoder, denoiser, schedule)
    overrides: tuple[str, ...] = ()
    feature_steps: int = 3000  # feature denoiser optimisation steps (ignored with a run directory)
    image_steps: int = 400  # U-Net steps (DPDM recipe, non-private)
    max_train: int | None = None  # subsample large user-supplied image sets (per split)
    grid_points: int = 14  # OU times measured (cloning, collapse)
    t_min: float = 0.05
    t_max: float = 4.5
    starts: int = 200  # cloning: data points noised to each t
    clones: int = 4
    probes: int = 150  # collapse: held-out probes per t
    sampler_steps: int = 40  # backward steps from a time k (η = 1)
    entropy_points: int = 60  # OU grid of f^e(t)
    entropy_queries: int = 400
    few_steps: tuple[int, ...] = (3, 5, 10)
    reference_steps: int = 100
    samples_per_class: int = 100
    sweep_n: tuple[int, ...] = (4, 8, 16, 32)  # collapse vs n: members per class (features)
    sweep_steps: int = 2000
    sweep_grid_points: int = 8
    promise_candidates: tuple[int, ...] = (100, 200, 300, 400, 500, 600, 700, 800, 850, 900, 950, 980)
    promise_eps_share: float = 0.1


class RunConfig(Section):
    name: str = "quickstart"
    methods: list[str] = ["ce", "logit_adjust", "resample", "ldmlr"]
    seeds: list[int] = [0, 1, 2]
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    output_dir: str = "runs"
    threads: int | None = None  # torch CPU threads; None: torch's default capped by the cores this process may use
    # the non-private training loops of `pfdiff run` (stages 1–3, E2E; DP-SGD steps always run in fp32):
    # auto = bf16 autocast + TF32 matmuls on a CUDA device, fp32 on the CPU (CPU numbers unchanged)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False  # torch.compile of every module a training loop updates (in place: same state dicts)
    fused_optimizer: Literal["auto", "on", "off"] = "auto"  # fused Adam/AdamW kernels; auto: on with CUDA
    logit_adjust_tau: float = Field(1.0, ge=0)  # τ of +la when there is no validation split (data.val_per_class = 0)
    # τ of +la is chosen on the validation split from this grid (the smallest τ among equals); [τ] fixes it
    la_tau_grid: list[float] = [0.0, 0.5, 1.0, 1.5, 2.0]
    # LDMLR's pseudo-feature weight chosen on the validation split (stage 3 trained once per value); []: pseudo.pseudo_weight
    pseudo_weight_grid: list[float] = []
    # several long-tailed splits: the run loops over split seeds × seeds, the table is mean ± std over all pairs;
    # None: the one split of data.split_seed (files keep their single-split names)
    split_seeds: list[int] | None = None
    checkpoint_every: int = Field(500, ge=1)  # optimiser steps between in-stage checkpoints
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    stage1: OptimConfig = OptimConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    pseudo: PseudoConfig = PseudoConfig()
    e2e: E2EConfig = E2EConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    fed: FederatedConfig = FederatedConfig()
    dpdm: DPDMConfig = DPDMConfig()
    regimes: RegimesConfig = RegimesConfig()

    @field_validator("seeds")
    @classmethod
    def _seeds_nonempty(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("at least one seed is needed")
        return v

    @field_validator("split_seeds")
    @classmethod
    def _split_seeds_distinct(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError("split_seeds must be a non-empty list of distinct seeds (or null: data.split_seed)")
        return v

    @field_validator("la_tau_grid", "pseudo_weight_grid")
    @classmethod
    def _grid_nonnegative(cls, v: list[float], info) -> list[float]:
        if any(x < 0 for x in v):
            raise ValueError(f"{info.field_name} values must be >= 0, got {v}")
        if info.field_name == "la_tau_grid" and not v:
            raise ValueError("la_tau_grid needs at least one τ (a single value fixes it)")
        return v


class ConfigError(ValueError):
    """A config file, preset or override that cannot be used; the message says which and why."""


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_yaml(source: str | Path) -> dict[str, Any]:
    path = Path(source)
    if not path.suffix and not path.exists():
        path = PRESET_DIR / f"{source}.yaml"
        if not path.exists():
            raise ConfigError(f"no config file or preset named {source!r}; presets: {list_presets()}")
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` in place; the value is parsed as YAML (``3``, ``0.1``, ``[0, 1]``, ``true``)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key=value (e.g. diffusion.steps=2000)")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(raw)


def load_config(source: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """A preset name or YAML path (None → quickstart), then the ``--set`` overrides, validated."""
    data = _read_yaml(source or "quickstart")
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"invalid config ({source or 'quickstart'}): {validation_message(e)}") from e


def validation_message(e: ValidationError) -> str:
    """pydantic's errors on one line: ``key.path: message (got value)``, joined by "; "."""
    parts = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        got = f" (got {err['input']!r})" if err["type"] not in ("missing", "extra_forbidden") else ""
        parts.append(f"{where}: {err['msg']}{got}")
    return "; ".join(parts)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def _source_comments() -> dict[tuple[str, str], str]:
    """(class name, field name) → the comment of that field in this file: its trailing ``# …``, else the comment
    lines right above it (the config's documentation lives there; pydantic descriptions take precedence)."""
    import ast
    import io
    import tokenize

    source = Path(__file__).read_text()
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    out: dict[tuple[str, str], str] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            text = comments.get(stmt.end_lineno, "")
            if not text:  # a block of comment-only lines directly above
                above, i = [], stmt.lineno - 1
                while i >= 1 and lines[i - 1].strip().startswith("#"):
                    above.insert(0, comments.get(i, ""))
                    i -= 1
                text = " ".join(above)
            if text:
                out[(node.name, stmt.target.id)] = text
    return out


def _flow(value: Any) -> str:
    """One YAML value on one line (``[0, 1]``, ``null``, ``'a: b'``)."""
    return yaml.safe_dump([value], default_flow_style=True, allow_unicode=True, width=10_000).strip()[1:-1]


def annotated_config(cfg: RunConfig, source: str = "quickstart") -> str:
    """``cfg`` as YAML with a comment on every key: its description and, where ``cfg`` differs from
    RunConfig's default, ``[set: default …]`` (changed by the preset or an override). Loads back to ``cfg``."""
    notes = _source_comments()
    lines = [f"# resolved config of {source} (pfdiff config); [set] marks values that differ from the default"]

    def emit(model: BaseModel, default: BaseModel, indent: str) -> None:
        values, defaults = model.model_dump(mode="json"), default.model_dump(mode="json")
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            note = field.description or notes.get((type(model).__name__, name), "")
            if isinstance(value, BaseModel):
                doc = " ".join((type(value).__doc__ or "").strip().split("\n\n")[0].split())
                lines.append(f"{indent}{name}:" + (f"  # {doc}" if doc else ""))
                emit(value, getattr(default, name), indent + "  ")
                continue
            changed = values[name] != defaults[name]
            tags = [f"[set: default {_flow(defaults[name])}]"] if changed else []
            comment = "  # " + " ".join([*tags, note]).strip() if tags or note else ""
            lines.append(f"{indent}{name}: {_flow(values[name])}{comment}")

    emit(cfg, RunConfig(), "")
    return "\n".join(lines) + "\n"
