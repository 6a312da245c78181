"""DP-SGD with correct noise multiplicity (DPDM, Dockhorn et al. 2022), on top of Opacus' ``DPOptimizer``.

Noise multiplicity: a diffusion loss draws K pairs (t, ε) per example. The *example* is the unit of
privacy, so its loss is averaged over the K draws **before** its gradient is clipped; K then lowers the
variance of the per-example gradient without changing the sensitivity C (DPDM §3.2). Opacus on its own
sees the B·K rows of the model call as B·K examples and clips each row, which lets one example move the
update by K·C: wrong. Here the engine computes B per-example gradients of the K-averaged losses, puts
them in ``p.grad_sample`` and lets Opacus' ``DPOptimizer`` clip them to C, add N(0, σ²C²) noise, divide
by the expected batch size and step.

Per-example gradients: ``torch.func`` — ``vmap`` over examples of ``grad`` of the example's loss, the
model run through ``functional_call``. Measured on this project's CPU (AMD EPYC, 1 thread, CPU ms, min of
5; FeatureDenoiser hidden 256 / depth 3 = 718k parameters, batch 256, K = 4): per-example gradients +
their norms by vmap 143 ms, by Opacus ``GradSampleModule`` per-row grad samples summed per example
1999 ms (it materialises [B·K, …] grad samples, K times the [B, …] we need, through its hooks); the
non-private step is 54 ms. So vmap. (With glibc's default allocator: 368 vs 4755 ms, see
``tune_cpu_allocator``.) The loss function's random draws (t, ε, CFG coin) run inside
``vmap(randomness="different")``: independent per example, from the generator the caller seeds per step.
The cost floor is memory traffic: B × 718k floats = 735 MB of per-example gradients written, then read
by the norm and the weighted sum, per logical step of 256.

Poisson sampling: every logical step includes each example independently with probability q, exactly
as Opacus' ``UniformWithReplacementSampler`` (``torch.rand(N) < q``), but drawn from a generator seeded
by (seed, step) instead of one running generator: step s's batch depends on nothing else, so a run
resumed from a checkpoint at step s repeats the uninterrupted run exactly, with no sampler state to
save (Opacus' sampler would have to be replayed s times or its state checkpointed).

Physical micro-batches: Opacus' ``BatchMemoryManager`` wraps a ``DataLoader``; we draw index tensors
ourselves, so ``step`` does what it does with the optimizer's own protocol: every micro-batch but the
last is followed by ``signal_skip_step(True)`` + ``step()`` (Opacus clips it and adds it to
``p.summed_grad``) + ``zero_grad()`` (which keeps ``summed_grad``); the last micro-batch's ``step()``
adds the noise once, divides by the expected batch size once and steps the wrapped optimizer once.
Clipping per micro-batch is exact because clipping is per example. An empty logical batch (possible
under Poisson sampling) is a noise-only step, as in Opacus.
"""

from __future__ import annotations

import ctypes
import secrets
import sys
from collections.abc import Callable
from typing import Any

import torch
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn
from torch.func import functional_call, grad, vmap

from pfdiff.training import EMA, derive_seed

PerExampleLoss = Callable[..., torch.Tensor]  # (model, *batch_tensors) -> Tensor[B]

#: Losses whose value for one example depends on that example alone: clippable per example under DP.
PER_EXAMPLE_LOSSES = {"ldm": "diffusion loss (K-averaged per example)", "proto": "prototype loss L_proto",
                      "rad": "equal-radius shape loss L_rad", "ce": "per-example cross-entropy"}
#: Losses that couple the examples of a batch, with the per-example loss to use instead under DP.
BATCH_COUPLED_LOSSES = {"cov": "rad"}


class DPIncompatibleLoss(ValueError):
    """A loss couples the examples of a batch, so its gradient cannot be clipped per example."""


def require_per_example(loss_name: str) -> None:
    """Raise ``DPIncompatibleLoss`` unless ``loss_name`` is a per-example loss usable under DP-SGD."""
    if loss_name in BATCH_COUPLED_LOSSES:
        alt = BATCH_COUPLED_LOSSES[loss_name]
        raise DPIncompatibleLoss(
            f"loss {loss_name!r} couples the examples of a batch (a batch statistic), so its gradient has no "
            f"per-example decomposition to clip and DP-SGD's sensitivity bound does not hold; under DP use the "
            f"per-example alternative {alt!r} ({PER_EXAMPLE_LOSSES[alt]}) instead")
    if loss_name not in PER_EXAMPLE_LOSSES:
        raise ValueError(f"unknown loss {loss_name!r} for DP-SGD: per-example losses are "
                         f"{sorted(PER_EXAMPLE_LOSSES)}, batch-coupled ones {sorted(BATCH_COUPLED_LOSSES)}")


class _Stateless:
    """Calls ``module`` with the given parameters (``functional_call``); other attributes pass through."""

    def __init__(self, module: nn.Module, params: dict[str, torch.Tensor]):
        self._module, self._params = module, params

    def __call__(self, *args, **kwargs):
        return functional_call(self._module, self._params, args, kwargs)

    def __getattr__(self, name: str):
        return getattr(self._module, name)


def per_example_grads(model: nn.Module, per_example_loss_fn: PerExampleLoss, *batch: torch.Tensor,
                      names: list[str] | None = None, chunk_size: int | None = None) -> dict[str, torch.Tensor]:
    """∇_θ ℓ_b for every example b: ``{name: Tensor[B, *param.shape]}`` (pure; ``model`` is not touched).

    ``per_example_loss_fn(model, *batch)`` must return the per-example losses ``[B]`` (for a diffusion
    loss: already averaged over the K noise draws). It is run under ``vmap`` with a batch of one, so it
    may draw random numbers (independently per example) but must not call ``.item()`` or branch on data.
    ``names``: the parameters to differentiate (default: those requiring grad); the rest stay fixed.
    ``chunk_size``: examples per vectorised chunk (``vmap``'s; None = all at once, the fastest on CPU).
    """
    named = dict(model.named_parameters())
    names = [n for n, p in named.items() if p.requires_grad] if names is None else list(names)
    trainable = {n: named[n].detach() for n in names}
    frozen = {n: p.detach() for n, p in named.items() if n not in trainable}
    if not batch:
        raise ValueError("per_example_grads needs at least one batch tensor")
    size = len(batch[0])
    if any(len(b) != size for b in batch):
        raise ValueError(f"batch tensors differ in length: {[len(b) for b in batch]}")
    if size == 0:
        return {n: torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device) for n, p in trainable.items()}

    def example_loss(params: dict[str, torch.Tensor], *example: torch.Tensor) -> torch.Tensor:
        loss = per_example_loss_fn(_Stateless(model, {**frozen, **params}), *(e.unsqueeze(0) for e in example))
        if loss.shape != (1,):
            raise ValueError(f"per_example_loss_fn must return one loss per example, shape [B]; got "
                             f"{tuple(loss.shape)} for a batch of one")
        return loss[0]

    return vmap(grad(example_loss), in_dims=(None, *[0] * len(batch)), randomness="different",
                chunk_size=chunk_size)(trainable, *batch)


def per_sample_norms(grads: list[torch.Tensor]) -> torch.Tensor:
    """‖g_b‖₂ over all parameters, as ``DPOptimizer.clip_and_accumulate`` computes it ([B])."""
    if len(grads[0]) == 0:
        return torch.zeros(0, device=grads[0].device)
    return torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in grads], dim=1).norm(2, dim=1)


def poisson_batch(num_samples: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of a Poisson-sampled batch: each example in with prob. ``sample_rate`` (as Opacus' sampler)."""
    return (torch.rand(num_samples, generator=generator) < sample_rate).nonzero().reshape(-1)


class DPSGD:
    """DP-SGD steps for ``model`` with Poisson sampling, micro-batching and noise multiplicity done right.

    Args:
        model: an Opacus-valid module (checked with ``ModuleValidator.validate(strict=True)``).
        optimizer: a plain ``torch.optim`` optimizer over (some of) ``model``'s parameters; it is wrapped
            in Opacus' ``DPOptimizer`` (``self.optimizer``; its ``state_dict`` is the wrapped one's).
        noise_multiplier: σ; the noise added to the sum of clipped gradients has std σ·C.
        max_grad_norm: C, the per-example clipping norm.
        dataset_size: N, the number of examples (rows of the data tensors given to ``step``).
        sample_rate / expected_batch_size: q, or q·N; give exactly one. The summed gradient is divided
            by q·N (not by the realised batch size, which would leak it).
        max_physical_batch_size: examples per vectorised micro-batch (memory bound).
        seed: seeds the Poisson batches and the noise, per step: ``derive_seed(seed, "dpsgd-…", step)``.
        ema: optional EMA, updated once per logical step.
        secure_mode: Opacus' floating-point-attack-resistant noise; batches and noise are then seeded
            from the OS CSPRNG every step (not reproducible, by design) instead of from ``seed``.
        chunk_size: ``vmap`` chunk inside a micro-batch (None = whole micro-batch, the fastest).
        tune_allocator: on CPU, call ``tune_cpu_allocator()`` (process-wide; see there): ~2× faster
            DP steps on CPU by not re-faulting the per-example gradients' pages every micro-batch.
        track_norms: compute the pre-clip norm statistics ``step`` returns (one extra read of the
            per-example gradients, ~10 % of a step; DPOptimizer computes the same norms but keeps them).
            They describe private data and are not differentially private: for monitoring only.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, noise_multiplier: float,
                 max_grad_norm: float, dataset_size: int, sample_rate: float | None = None,
                 expected_batch_size: float | None = None, max_physical_batch_size: int = 256, seed: int = 0,
                 ema: EMA | None = None, secure_mode: bool = False, chunk_size: int | None = None,
                 tune_allocator: bool = True, track_norms: bool = True):
        ModuleValidator.validate(model, strict=True)
        if (sample_rate is None) == (expected_batch_size is None):
            raise ValueError("give exactly one of sample_rate and expected_batch_size")
        if dataset_size < 1:
            raise ValueError(f"dataset_size must be ≥ 1, got {dataset_size}")
        q = sample_rate if sample_rate is not None else expected_batch_size / dataset_size
        if not 0 < q <= 1:
            raise ValueError(f"sample rate must lie in (0, 1], got {q}")
        if noise_multiplier < 0 or max_grad_norm <= 0 or max_physical_batch_size < 1:
            raise ValueError("need noise_multiplier ≥ 0, max_grad_norm > 0 and max_physical_batch_size ≥ 1")
        self.model, self.ema, self.seed, self.secure_mode = model, ema, seed, secure_mode
        self.dataset_size, self.sample_rate = dataset_size, q
        self.expected_batch_size = q * dataset_size
        self.max_physical_batch_size, self.chunk_size = max_physical_batch_size, chunk_size
        self.track_norms = track_norms
        device = next(model.parameters()).device
        if tune_allocator and device.type == "cpu":
            tune_cpu_allocator()
        self._noise_generator = torch.Generator(device=device)
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                     expected_batch_size=self.expected_batch_size, loss_reduction="mean",
                                     generator=self._noise_generator, secure_mode=secure_mode)
        by_id = {id(p): n for n, p in model.named_parameters()}
        missing = [p for p in self.optimizer.params if id(p) not in by_id]
        if missing:
            raise ValueError(f"the optimizer holds {len(missing)} parameter(s) that are not parameters of the model")
        self._params = [(by_id[id(p)], p) for p in self.optimizer.params]

    noise_multiplier = property(lambda self: self.optimizer.noise_multiplier)
    max_grad_norm = property(lambda self: self.optimizer.max_grad_norm)

    def _seed(self, kind: str, step: int) -> int:
        return secrets.randbits(63) if self.secure_mode else derive_seed(self.seed, kind, step)

    def sample(self, step: int) -> torch.Tensor:
        """The Poisson batch of logical step ``step`` (indices into the data tensors, CPU)."""
        g = torch.Generator().manual_seed(self._seed("dpsgd-poisson", step))
        return poisson_batch(self.dataset_size, self.sample_rate, g)

    def noise_seed(self, step: int) -> int:
        """Seed of the noise generator at ``step`` (DPOptimizer draws one N(0, σ²C²) tensor per parameter,
        in optimizer order). Not available in secure mode."""
        if self.secure_mode:
            raise RuntimeError("secure_mode draws noise seeds from the OS CSPRNG; they are not reproducible")
        return derive_seed(self.seed, "dpsgd-noise", step)

    def step(self, per_example_loss_fn: PerExampleLoss, data_tensors: tuple[torch.Tensor, ...], step: int
             ) -> dict[str, float]:
        """One logical DP-SGD step: Poisson batch → per-example gradients (micro-batched) → Opacus clip,
        noise, ÷ q·N → optimizer step → EMA. ``per_example_loss_fn(model, *batch) -> Tensor[B]`` (see
        ``per_example_grads``); ``data_tensors`` all have ``dataset_size`` rows. Returns ``batch_size``
        (realised), ``grad_norm`` (mean pre-clip per-example gradient norm) and ``clip_frac`` (fraction of
        examples with norm > C); norms 0 for an empty batch and NaN without ``track_norms``."""
        if any(len(t) != self.dataset_size for t in data_tensors):
            raise ValueError(f"data tensors must have dataset_size={self.dataset_size} rows, got "
                             f"{[len(t) for t in data_tensors]}")
        idx = self.sample(step)
        self._noise_generator.manual_seed(self._seed("dpsgd-noise", step))
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        for _, p in self._params:  # a step interrupted by an exception must not leak into this one
            p.summed_grad = None
        names = [n for n, _ in self._params]
        chunks = list(idx.split(self.max_physical_batch_size)) if len(idx) else [idx]
        norms = []
        for i, chunk in enumerate(chunks):
            batch = tuple(t[chunk.to(t.device)] for t in data_tensors)
            grads = per_example_grads(self.model, per_example_loss_fn, *batch, names=names,
                                      chunk_size=self.chunk_size)
            for name, p in self._params:
                p.grad_sample = grads[name]
            if self.track_norms:
                norms.append(per_sample_norms([grads[n] for n in names]))
            del grads
            last = i == len(chunks) - 1
            if not last:  # BatchMemoryManager's protocol: clip and accumulate only
                opt.signal_skip_step(do_skip=True)
            opt.step()
            if not last:
                opt.zero_grad(set_to_none=True)  # clears grad_sample, keeps summed_grad
        opt.zero_grad(set_to_none=True)  # frees the last grad samples (p.grad was consumed by the step)
        if self.ema is not None:
            self.ema.update()
        stats = {"batch_size": float(len(idx)), "grad_norm": 0.0, "clip_frac": 0.0}
        if len(idx) and self.track_norms:
            norms_t = torch.cat(norms)
            stats.update(grad_norm=norms_t.mean().item(),
                         clip_frac=(norms_t > self.max_grad_norm).float().mean().item())
        elif len(idx):
            stats.update(grad_norm=float("nan"), clip_frac=float("nan"))
        return stats


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the process (glibc ``mallopt``) instead of returning it to the OS.

    Per-example gradients are large (B × #params floats, 735 MB for the FeatureDenoiser at B = 256) and
    freshly allocated every micro-batch; with glibc's defaults each allocation is a new ``mmap`` whose
    pages are faulted in again, which more than doubled the DP step on CPU (417 → 181 ms, 1 thread).
    Process-wide and irreversible: ``DPSGD`` calls it on CPU unless ``tune_allocator=False`` (preloading
    jemalloc/tcmalloc is the alternative). The cost: the process keeps its peak heap instead of returning
    freed memory to the OS. Returns whether the settings were applied (glibc only).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, (1 << 31) - 1))
