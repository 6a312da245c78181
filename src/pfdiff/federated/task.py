"""Models, client data and local training for federated feature diffusion (Flower layout: ``task.py``).

Everything here is plain PyTorch on one client's tensors; the apps (``client_app``, ``server_app``)
only move arrays. The models are the centralised pipeline's: E + G from
``longtail.common.init_encoder_classifier``, the class-conditional feature denoiser from
``longtail.ldmlr.build_denoiser``, the diffusion loss and sampler from ``pfdiff.diffusion``.

Data: the long-tailed training set of ``longtail.common.make_split`` (balanced test set kept by the
server for evaluation only) is partitioned over clients with flwr-datasets (``IidPartitioner`` or
``DirichletPartitioner`` by label, on an in-memory ``datasets.Dataset``: no download). With
``fed.encoder = "public"`` a declared public part (``privacy.public_fraction`` per class) stays on the
server and only the rest is partitioned.

Device: every process (server, each client) puts its models, data and sampling on ``device_of(cfg)``
(``cfg.device``; ``auto`` = CUDA when the process sees a GPU, else CPU). Flower sends numpy arrays, so what
goes on the wire is moved to the CPU first (``to_wire``) and what arrives is moved to the device
(``load_arrays``, ``array_tensor``). Batch indices are drawn on the CPU as before (identical on any device);
the diffusion loss's own draws come from a generator on the data's device (on the CPU: the same numbers as
ever).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Callable, Mapping

import numpy as np
import torch
import yaml
from flwr.app import ArrayRecord
from torch import nn

from pfdiff.config import DataConfig, RunConfig, dump_config
from pfdiff.diffusion import DiffusionLoss
from pfdiff.longtail.common import LongTailSplit, init_encoder_classifier, make_split, seeded_init
from pfdiff.longtail.ldmlr import build_denoiser, feature_loss
from pfdiff.longtail.private import clip_rows, count_event, public_private_split
from pfdiff.longtail.private import sampling_view as private_sampling_view
from pfdiff.privacy.accounting import GaussianEvent, calibrate_noise, check_delta_for_size
from pfdiff.privacy.dpsgd import DPSGD, clip_factors, per_example_grads, per_sample_norms
from pfdiff.privacy.noise import NoiseSource
from pfdiff.training import derive_seed, generator, resolve_device, run_steps

# ---------------------------------------------------------------- config over the wire


def config_to_text(cfg: RunConfig) -> str:
    return dump_config(cfg)


@lru_cache(maxsize=4)
def config_from_text(text: str) -> RunConfig:
    """The run's ``RunConfig`` as the server sent it (YAML in the message's ConfigRecord)."""
    return RunConfig.model_validate(yaml.safe_load(text))


# ---------------------------------------------------------------- device and wire


def device_of(cfg: RunConfig) -> torch.device:
    """The device of this process's models, data and sampling: ``resolve_device(cfg.device)``. Resolved in
    each process: a simulated client that Ray gave no GPU share sees none and runs ``auto`` on the CPU."""
    return resolve_device(cfg.device)


def to_wire(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """An ``ArrayRecord`` of named tensors (a state dict, features) moved to the CPU: Flower serialises numpy
    arrays, so nothing leaves a process on its device."""
    return ArrayRecord({k: v.detach().cpu() for k, v in tensors.items()})


# ---------------------------------------------------------------- data


@lru_cache(maxsize=2)
def _split(data_json: str) -> LongTailSplit:
    return make_split(RunConfig(data=DataConfig.model_validate_json(data_json)))


def split_of(cfg: RunConfig) -> LongTailSplit:
    """``make_split(cfg)``, cached on the ``data`` section (the only one it reads)."""
    return _split(cfg.data.model_dump_json())


def public_private_indices(cfg: RunConfig) -> tuple[np.ndarray, np.ndarray]:
    """Indices (into the long-tailed training set) of the server's public part and of the clients' part."""
    split = split_of(cfg)
    if cfg.fed.encoder != "public":
        return np.empty(0, dtype=np.int64), np.arange(len(split.train.y))
    return public_private_split(split.train.y, split.num_classes, cfg.privacy.public_fraction, cfg.data.split_seed)


@lru_cache(maxsize=8)
def _partition(labels: tuple[int, ...], num_partitions: int, alpha: float, seed: int, min_size: int
               ) -> tuple[np.ndarray, ...]:
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    y = np.asarray(labels, dtype=np.int64)
    table = Dataset.from_dict({"idx": np.arange(len(y)), "label": y})
    if alpha == 0:
        part = IidPartitioner(num_partitions=num_partitions)
        table = table.shuffle(seed=seed)  # IidPartitioner splits contiguously
    else:
        if len(y) < num_partitions * min_size:
            raise ValueError(f"{len(y)} training examples cannot give {num_partitions} clients "
                             f"≥ {min_size} examples each (fed.min_partition_size)")
        part = DirichletPartitioner(num_partitions=num_partitions, partition_by="label", alpha=alpha,
                                    min_partition_size=min_size, self_balancing=False, shuffle=True, seed=seed)
    part.dataset = table
    import warnings

    try:
        with warnings.catch_warnings():  # one warning per failed Dirichlet draw; the error below says it once
            warnings.filterwarnings("ignore", message="The specified min_partition_size")
            return tuple(np.asarray(part.load_partition(i)["idx"], dtype=np.int64) for i in range(num_partitions))
    except ValueError as e:  # flwr-datasets gives up after 11 Dirichlet draws with a client below min_size
        if "max number of attempts" not in str(e):
            raise
        raise ValueError(f"Dirichlet(α={alpha:g}) over {num_partitions} clients of {len(y)} examples left a client "
                         f"below fed.min_partition_size={min_size} in 11 draws (flwr-datasets' limit): lower "
                         "fed.min_partition_size or fed.num_clients, or raise fed.alpha") from None


def partition_indices(labels: np.ndarray, num_partitions: int, alpha: float, seed: int, min_size: int = 5
                      ) -> tuple[np.ndarray, ...]:
    """Indices into ``labels`` of each client: IID (``alpha`` = 0) or Dirichlet(α) label skew (seeded)."""
    return _partition(tuple(int(v) for v in labels), num_partitions, float(alpha), seed, min_size)


def client_indices(cfg: RunConfig, num_partitions: int) -> tuple[np.ndarray, ...]:
    """Each client's indices into the long-tailed training set."""
    _, private = public_private_indices(cfg)
    y = split_of(cfg).train.y[private]
    parts = partition_indices(y, num_partitions, cfg.fed.alpha, cfg.data.split_seed, cfg.fed.min_partition_size)
    return tuple(private[p] for p in parts)


@dataclass
class ClientData:
    x: torch.Tensor
    y: torch.Tensor


def load_client_data(cfg: RunConfig, partition_id: int, num_partitions: int) -> ClientData:
    """This client's examples as tensors on ``device_of(cfg)``."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} outside [0, {num_partitions})")
    split = split_of(cfg)
    idx = client_indices(cfg, num_partitions)[partition_id]
    device = device_of(cfg)
    return ClientData(torch.as_tensor(split.train.x[idx]).to(device), torch.as_tensor(split.train.y[idx]).to(device))


def client_histograms(cfg: RunConfig, num_partitions: int) -> np.ndarray:
    """[clients, classes] label counts (for the report; computed by the simulation runner, not sent)."""
    split = split_of(cfg)
    return np.stack([np.bincount(split.train.y[i], minlength=split.num_classes)
                     for i in client_indices(cfg, num_partitions)])


# ---------------------------------------------------------------- models


def build_encoder_classifier(cfg: RunConfig, device: torch.device | None = None) -> nn.ModuleDict:
    """E and G in one module (state-dict keys ``encoder.*`` / ``classifier.*``), seeded as stage 1, on
    ``device`` (default ``device_of(cfg)``; the weights are drawn on the CPU, so they are the same on any)."""
    split = split_of(cfg)
    seed = cfg.seeds[0]
    enc, clf = init_encoder_classifier(cfg, split.train.input_shape, split.num_classes, seed,
                                       device or device_of(cfg))
    return nn.ModuleDict({"encoder": enc, "classifier": clf})


def build_global_denoiser(cfg: RunConfig, device: torch.device | None = None) -> nn.Module:
    """The seeded initial global denoiser on ``device`` (default ``device_of(cfg)``)."""
    split = split_of(cfg)
    return seeded_init(cfg.seeds[0], "fed-denoiser",
                       lambda: build_denoiser(cfg, cfg.model.feature_dim, split.num_classes), device or device_of(cfg))


def make_loss(cfg: RunConfig, num_classes: int) -> DiffusionLoss:
    return feature_loss(cfg.diffusion, cfg.diffusion.make_schedule(), num_classes)


def load_arrays(module: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """``state`` (received arrays, a checkpoint: on the CPU) loaded into ``module``: ``load_state_dict``
    copies every tensor onto the module's device."""
    module.load_state_dict(state)
    return module


# ---------------------------------------------------------------- local training


def _batches(n: int, batch_size: int, seed: int, *tags, device: torch.device | str = "cpu") -> torch.Tensor:
    """Batch indices drawn on the CPU (the same on any device), moved to ``device``."""
    return torch.randint(0, n, (min(batch_size, n),), generator=generator("cpu", seed, *tags)).to(device)


def adam_steps(module: nn.Module, lr: float, steps: int, loss_at: Callable[[int], torch.Tensor],
               weight_decay: float = 0.0, description: str = "federated local steps") -> float:
    """``steps`` AdamW steps (fresh state, as every local round) of ``loss_at(step)`` on ``module``'s
    parameters, through ``training.run_steps`` (no checkpoint, no progress bar: there would be one per
    client per round); the mean loss. ``module`` is in train mode during the steps and in eval mode after."""
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    losses: list[float] = []

    def update(s: int) -> dict[str, float]:
        loss = loss_at(s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        return {"loss": losses[-1]}

    run_steps({"module": module}, opt, update, steps, description=description, progress=False)
    return sum(losses) / max(1, steps)


def train_encoder_local(model: nn.ModuleDict, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float,
                        batch_size: int, seed: int, tag: tuple) -> float:
    """Cross-entropy steps on E + G (weight decay as torch's AdamW default)."""
    def loss_at(s: int) -> torch.Tensor:
        idx = _batches(len(y), batch_size, seed, "fed-enc", *tag, s, device=y.device)
        return nn.functional.cross_entropy(model["classifier"](model["encoder"](x[idx])), y[idx])

    return adam_steps(model, lr, steps, loss_at, weight_decay=0.01, description="federated E + G steps")


def train_classifier_local(classifier: nn.Module, z: torch.Tensor, y: torch.Tensor, class_weights: torch.Tensor,
                           steps: int, lr: float, batch_size: int, seed: int, tag: tuple) -> float:
    """Class-weighted cross-entropy on frozen features (the re-weighting baseline's local step)."""
    def loss_at(s: int) -> torch.Tensor:
        idx = _batches(len(y), batch_size, seed, "fed-rw", *tag, s, device=y.device)
        return nn.functional.cross_entropy(classifier(z[idx]), y[idx], weight=class_weights)

    return adam_steps(classifier, lr, steps, loss_at, weight_decay=0.01, description="federated G steps")


def train_denoiser_local(model: nn.Module, u: torch.Tensor, y: torch.Tensor, loss_fn: DiffusionLoss, steps: int,
                         lr: float, batch_size: int, seed: int, tag: tuple, stream: str = "fed-ldm") -> float:
    """Plain local steps of the diffusion loss (also the server's correction on the pool, ``stream`` naming
    its own random draws). One generator on the data's device draws the batch and then the loss's (t, ε)."""
    def loss_at(s: int) -> torch.Tensor:
        g = generator(u.device, seed, stream, *tag, s)
        idx = torch.randint(0, len(y), (min(batch_size, len(y)),), generator=g, device=u.device)
        return loss_fn(model, u[idx], y[idx], generator=g).loss.mean()

    return adam_steps(model, lr, steps, loss_at, description=f"federated denoiser steps ({stream})")


@dataclass(frozen=True)
class ClientDPPlan:
    """One client's example-level DP plan for one method's run: σ calibrated so that its noisy counts,
    its warm-up steps and every planned round compose to at most the target ε. Under dp-promise every
    local call of k DP-SGD steps (t < S) is preceded by ``phase1_steps_for(k)`` DP-SGD steps on
    t ∈ [S, T) at Phase I's own sampling rate, with the same σ (calibrated over both phases)."""

    sigma: float
    sample_rate: float
    count_sigma: float | None
    warmup_steps: int
    local_steps: int
    rounds: int
    phase1_ratio: float = 0.0  # Phase-I steps per DP-SGD step (privacy.promise_phase1_steps / privacy.steps)
    phase1_rate: float = 0.0
    score_sigma: float | None = None  # fed.score_source = clients: σ / L of each noisy loss-sum release
    score_releases: int = 0  # … planned per method (one per round)

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.rounds * self.local_steps

    def phase1_steps_for(self, steps: int) -> int:
        return int(round(self.phase1_ratio * steps))

    def spent(self, rounds: int, warmup: bool = True) -> tuple[int, int]:
        """(DP-SGD steps, Phase-I steps) after the warm-up (if it ran) and ``rounds`` local rounds; also the
        global indices at which round ``rounds + 1`` starts."""
        calls = ([self.warmup_steps] if warmup else []) + [self.local_steps] * rounds
        return sum(calls), sum(self.phase1_steps_for(k) for k in calls)

    def events(self, steps_done: int, phase1_done: int = 0, counts: bool = True, scores: int = 0
               ) -> list[GaussianEvent]:
        """The Gaussian events of the counts, ``phase1_done`` / ``steps_done`` DP-SGD steps and ``scores`` client
        score releases (each: a sum of per-example losses clipped to [0, L], + N(0, (σ_s·L)²); sensitivity L)."""
        out = [GaussianEvent(self.count_sigma, 1.0, 1, "noisy counts")] if self.count_sigma and counts else []
        if scores:
            if not self.score_sigma:
                raise ValueError("this plan has no client-score releases (fed.score_source is not 'clients')")
            out.append(GaussianEvent(self.score_sigma, 1.0, scores, "client score (noisy clipped loss sum)"))
        if phase1_done:
            out.append(GaussianEvent(self.sigma, self.phase1_rate, phase1_done, "DP-SGD phase I (t ≥ S, local)"))
        if steps_done:
            out.append(GaussianEvent(self.sigma, self.sample_rate, steps_done, "DP-SGD (local)"))
        return out


def client_dp_plan(cfg: RunConfig, n_examples: int) -> ClientDPPlan:
    """Calibrate the local DP-SGD σ of a client holding ``n_examples`` (declared public, as usual in FL);
    refuses δ ≥ 1/n_examples."""
    p, f, d = cfg.privacy, cfg.fed, cfg.diffusion
    check_delta_for_size(p.delta, n_examples, f"a client with {n_examples} examples")
    promise: dict = {}
    if p.mechanism == "dp-promise":
        if not 0 < p.promise_S < d.T:
            raise ValueError(f"privacy.promise_S must lie in (0, T={d.T}), got {p.promise_S}")
        promise = {"phase1_ratio": p.promise_phase1_steps / p.steps,
                   "phase1_rate": min(1.0, p.promise_phase1_batch / n_examples)}
    count_sigma = counts.noise_multiplier if (counts := count_event(p)) else None  # the centralised count event
    scores = score_releases_planned(cfg)
    if scores:  # σ_s so that one method's planned score releases compose to fed.score_epsilon
        promise.update(score_sigma=score_sigma(cfg), score_releases=scores)
    draft = ClientDPPlan(0.0, min(1.0, p.expected_batch_size / n_examples), count_sigma, f.warmup_steps,
                         f.local_steps, f.rounds, **promise)
    fixed = draft.events(0, 0, scores=scores)  # the noisy counts and the planned score releases
    phase1_total = draft.spent(f.rounds)[1]
    shared = [(draft.phase1_rate, phase1_total)] if phase1_total else []
    sigma = p.noise_multiplier or calibrate_noise(p.target_epsilon, p.delta, draft.sample_rate, draft.total_steps,
                                                  p.accountant, fixed_events=fixed, shared=shared)
    return replace(draft, sigma=sigma)


SCORED_METHODS = ("fedddpm+", "progressive")  # the methods whose decisions use the score (fed.score_source)


def score_releases_planned(cfg: RunConfig) -> int:
    """Client-score releases one method's run may make: one per round when the clients score (and a scored
    method runs), else none."""
    f = cfg.fed
    return f.rounds if f.score_source == "clients" and any(m in SCORED_METHODS for m in f.methods) else 0


def _row_key(u_row: torch.Tensor, y_row: torch.Tensor) -> int:
    """A 64-bit key of one example's bytes (feature row and label)."""
    data = u_row.detach().cpu().float().numpy().tobytes() + int(y_row).to_bytes(8, "little", signed=True)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


@torch.no_grad()
def example_score_losses(model: nn.Module, u: torch.Tensor, y: torch.Tensor, loss_fn: DiffusionLoss, seed: int,
                         multiplicity: int = 4, chunk: int = 1024) -> torch.Tensor:
    """Per-example diffusion loss [n] with K fixed (t, ε) draws per example from a generator keyed by the run seed
    and that example's own bytes: the same draws every round (rounds compare) and each loss a function of its
    example alone, so adding or removing one example changes a sum of clipped losses by at most the clip. The
    draws are made per example (``DiffusionLoss.draw``), the forwards batched ``chunk`` examples at a time."""
    model.eval()
    out = []
    for i in range(0, len(y), chunk):
        zc, yc = u[i:i + chunk], y[i:i + chunk]
        draws = [loss_fn.draw(zc[j:j + 1], yc[j:j + 1], multiplicity,
                              generator(u.device, seed, "fed-client-score", _row_key(zc[j], yc[j])))
                 for j in range(len(yc))]
        t, eps, y_rep = (torch.cat(parts) for parts in zip(*draws))
        out.append(loss_fn(model, zc, yc, noise_multiplicity=multiplicity, draws=(t, eps, y_rep)).loss)
    return torch.cat(out) if out else u.new_zeros(0)


def client_score_sum(model: nn.Module, u: torch.Tensor, y: torch.Tensor, cfg: RunConfig, partition_id: int,
                     round_: int, method: str = "") -> float:
    """A client's score release: the sum of its per-example losses (``example_score_losses``). Without DP the
    exact sum (a declared non-private release); under dp = example each loss clipped to [0, L] and the sum
    + N(0, (σ_s·L)²) from the client's private noise source (``ClientDPPlan.score_sigma``)."""
    losses = example_score_losses(model, u, y, make_loss(cfg, split_of(cfg).num_classes), cfg.seeds[0])
    if cfg.fed.dp != "example":
        return float(losses.double().sum())
    if not score_releases_planned(cfg):
        raise ValueError("a DP client score needs fed.score_source = 'clients' in the plan")
    L = cfg.fed.score_clip
    noise = client_noise(cfg, partition_id).gaussian(1, score_sigma(cfg) * L, "fed-score", method, round_)
    return float(losses.double().clamp(0, L).sum() + noise[0])


def client_noise(cfg: RunConfig, partition_id: int) -> NoiseSource:
    """A client's private noise source: OS entropy (each method, round and repeat draws anew), or — with
    ``privacy.reproducible_noise`` — derived from the run seed and the partition (NOT PRIVATE)."""
    return NoiseSource(cfg.privacy.reproducible_noise, derive_seed(cfg.seeds[0], "fed-noise", partition_id))


def train_denoiser_local_dp(model: nn.Module, u: torch.Tensor, y: torch.Tensor, loss_fn: DiffusionLoss,
                            plan: ClientDPPlan, cfg: RunConfig, first_step: int, steps: int, seed: int,
                            partition_id: int, first_phase1_step: int = 0) -> float:
    """DP-SGD steps ``first_step … first_step+steps-1`` of this client's plan (batches and noise from
    ``client_noise``: fresh OS entropy unless the run is marked not private). Under dp-promise the features
    are clipped to R, ``plan.phase1_steps_for(steps)`` DP-SGD steps on t ∈ [S, T) come first (global
    indices from ``first_phase1_step``) and the second phase sees only t < S."""
    p = cfg.privacy
    noise = client_noise(cfg, partition_id)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.fed.local_lr, weight_decay=0.0)

    def engine(rate: float) -> DPSGD:
        return DPSGD(model, opt, noise_multiplier=plan.sigma, max_grad_norm=p.max_grad_norm, dataset_size=len(u),
                     sample_rate=rate, max_physical_batch_size=p.max_physical_batch_size, noise=noise,
                     secure_mode=p.secure_mode, track_norms=False, tune_allocator=True)

    def dp_steps(dp: DPSGD, loss: DiffusionLoss, data: tuple, first: int, count: int, draws: str) -> None:
        # global step indices first … first+count-1; the loss's (t, ε) draws: OS entropy unless reproducible (DPSGD.diffusion_step)
        run_steps({"denoiser": model}, dp.optimizer,
                  lambda i: dp.diffusion_step(loss, p.noise_multiplicity, data, first + i,
                                              derive_seed(seed, draws, partition_id, first + i)),
                  count, description=f"federated DP-SGD steps ({draws})", log_metrics=False, progress=False)

    model.train()  # Opacus validates train mode when an engine is built
    dp_loss = loss_fn
    if p.mechanism == "dp-promise":
        u = clip_rows(u, p.feature_radius)
        S, null = p.promise_S, int(loss_fn.null_label)
        y1 = y if p.promise_conditional_phase1 else torch.full_like(y, null)
        phase1, loss1 = engine(plan.phase1_rate), feature_loss(cfg.diffusion, loss_fn.schedule, null, t_min=S)
        dp_steps(phase1, loss1, (u, y1), first_phase1_step, plan.phase1_steps_for(steps), "fed-p1-draws")
        model.train()  # run_steps left it in eval mode; the phase-2 engine is built next
        dp_loss = feature_loss(cfg.diffusion, loss_fn.schedule, null, t_max=S)
    dp_steps(engine(plan.sample_rate), dp_loss, (u, y), first_step, steps, "fed-dp-draws")
    return float("nan")  # the private loss is not released


def sampling_view(model: nn.Module, cfg: RunConfig) -> nn.Module:
    """The global denoiser as it must be sampled: as the centralised DP-LDMLR's (``private.sampling_view``)
    when the clients ran example-level DP, else as it is."""
    if cfg.fed.dp == "example":
        return private_sampling_view(model, cfg.privacy, split_of(cfg).num_classes)
    return model


def noisy_label_counts(y: torch.Tensor, num_classes: int, count_sigma: float | None, noise: NoiseSource) -> np.ndarray:
    """This client's class counts; with ``count_sigma``, + N(0, σ²) from its private noise source, rounded and
    clamped ≥ 0 (sensitivity 1)."""
    counts = np.bincount(y.cpu().numpy(), minlength=num_classes).astype(np.float64)
    if count_sigma:
        counts = counts + noise.gaussian(num_classes, count_sigma, "fed-counts").numpy()
    return np.maximum(0, np.round(counts)).astype(np.int64)


def array_tensor(array, device: torch.device | str = "cpu") -> torch.Tensor:
    """A received Flower ``Array`` as a tensor that owns its memory, on ``device``."""
    return torch.from_numpy(array.numpy().copy()).to(device)


# ---------------------------------------------------------------- CReFF (Shang et al. 2022): the client's part


def class_gradient_sums(classifier: nn.Module, z: torch.Tensor, y: torch.Tensor, num_classes: int,
                        clip: float | None = None, chunk: int = 1024) -> dict[str, torch.Tensor]:
    """Per class c, Σ over this client's examples of class c of ∇_φ CE(φ(z_i), c), ``{name: [C, *shape]}``
    (CReFF's real-feature gradient, as sums: the server divides by the class counts). With ``clip`` every
    example's gradient (all of φ's parameters together) is first scaled to L2 norm ≤ ``clip``, so adding or
    removing one example moves the concatenated sums by at most ``clip``."""
    names = [k for k, _ in classifier.named_parameters()]

    def ce(model, zi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(zi), yi, reduction="none")

    sums = {k: torch.zeros(num_classes, *v.shape, device=z.device) for k, v in classifier.named_parameters()}
    for i in range(0, len(y), chunk):  # per-example gradients in chunks: [n, *shape] each
        g = per_example_grads(classifier, ce, z[i:i + chunk], y[i:i + chunk], names=names)
        if clip is not None:
            scale = clip_factors(per_sample_norms(list(g.values())), clip)
            g = {k: v * scale.view(-1, *[1] * (v.dim() - 1)) for k, v in g.items()}
        onehot = nn.functional.one_hot(y[i:i + chunk], num_classes).to(z.dtype)
        for k, v in g.items():
            sums[k] += torch.einsum("nc,nk->ck", onehot, v.flatten(1)).view_as(sums[k])
    return sums


def creff_events(cfg: RunConfig, rounds: int, stats_sends: int = 1) -> list[GaussianEvent]:
    """A client's example-level events for CReFF under ``fed.dp = example``: its noisy counts (``stats_sends``
    times, once per execution of the statistics phase; 0: without them) and ``rounds`` Gaussian releases of its
    per-class gradient sums (sensitivity ``fed.creff_clip``, every example in every round: sample rate 1)."""
    counts = count_events(cfg) * stats_sends
    return counts + ([GaussianEvent(creff_sigma(cfg), 1.0, rounds, "CReFF per-class gradient sums")] if rounds else [])


def count_events(cfg: RunConfig) -> list[GaussianEvent]:
    """The noisy-count release of the statistics phase (none when ``privacy.count_epsilon`` = 0: counts public):
    the centralised pipeline's ``count_event``, named as the federated ledger names it."""
    e = count_event(cfg.privacy)
    return [replace(e, name="noisy counts")] if e else []


@lru_cache(maxsize=8)
def _creff_sigma(target: float, delta: float, rounds: int, accountant: str, fixed: tuple[GaussianEvent, ...]
                 ) -> float:
    return calibrate_noise(target, delta, 1.0, rounds, accountant, fixed_events=list(fixed))


@lru_cache(maxsize=8)
def _score_sigma(target: float, delta: float, releases: int, accountant: str) -> float:
    return calibrate_noise(target, delta, 1.0, releases, accountant)


def score_sigma(cfg: RunConfig) -> float:
    """σ_s (noise std / ``fed.score_clip``) of a client's score release, so that one method's planned releases
    (``score_releases_planned``) compose to ``fed.score_epsilon``; the same for every client (cached: every
    client's every score query asks for it)."""
    p = cfg.privacy
    return _score_sigma(cfg.fed.score_epsilon, p.delta, score_releases_planned(cfg), p.accountant)


def creff_sigma(cfg: RunConfig) -> float:
    """σ (noise std / ``fed.creff_clip``) of CReFF's gradient sums: ``fed.creff_noise_multiplier``, or calibrated so
    that the noisy counts and ``fed.rounds`` releases compose to ``privacy.target_epsilon`` (the same for every
    client: the sample rate is 1, so it does not depend on the client's size)."""
    f, p = cfg.fed, cfg.privacy
    return f.creff_noise_multiplier or _creff_sigma(p.target_epsilon, p.delta, f.rounds, p.accountant,
                                                   tuple(count_events(cfg)))


def noisy_gradient_sums(sums: dict[str, torch.Tensor], std: float, noise: NoiseSource, *tag) -> dict[str, torch.Tensor]:
    """``sums`` + N(0, std²) on every entry (every class, present or not), drawn from the client's private
    ``noise`` source (OS entropy unless the run is marked not private)."""
    return {k: v + noise.gaussian(tuple(v.shape), std, "fed-creff", *tag, k).to(v) for k, v in sums.items()}
