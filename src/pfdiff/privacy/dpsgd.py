"""DP-SGD with correct noise multiplicity (DPDM, Dockhorn et al. 2022), on top of Opacus' ``DPOptimizer``.

Noise multiplicity: a diffusion loss draws K pairs (t, ε) per example. The *example* is the unit of
privacy, so its loss is averaged over the K draws **before** its gradient is clipped; K then lowers the
variance of the per-example gradient without changing the sensitivity C (DPDM §3.2). Opacus on its own
sees the B·K rows of the model call as B·K examples and clips each row, which lets one example move the
update by K·C: wrong. Here the engine clips the B per-example gradients of the K-averaged losses to C
(Opacus' machinery with the K draws as an inner dimension, or its own vmap), and Opacus' optimizer adds
N(0, σ²C²) noise, divides by the expected batch size and steps.

Per-example clipping, two engines (``DPSGD(method=…)``; default ``"auto"``: bk for models made of
Linear / LayerNorm / Embedding such as ``FeatureDenoiser``, vmap otherwise, e.g. the conv U-Net):
- ``"bk"``: book-keeping (Bu et al. 2023). The engine hands the loss the model behind a proxy with
  ``inner_multiplicity = True``, so ``DiffusionLoss`` calls it on z_t [B, K, …] with t, y [B, K]: the K
  draws are an *inner* dimension and row b of every layer's input and output gradient belongs to example
  b alone. One backward with the parameters frozen keeps each layer's input and output gradient (forward
  hooks); per-example squared norms come from [B, K, K] Gram matrices — for a Linear layer
  ‖Σ_k g_k a_kᵀ‖²_F = Σ_{k,k'} (g_k·g_k')(a_k·a_k') — and the clipped sum Σ_b c_b g_b with
  c_b = min(1, C/(‖g_b‖ + 1e-6)) (DPOptimizer's factor) is one contraction per layer. No per-example
  gradient is materialised. The per-layer formulas are a registry (``BK_RULES``: Linear, LayerNorm, DiagonalAffine,
  Embedding); a model with any other parameterised layer is refused (use vmap). Opacus'
  ``DPOptimizerFastGradientClipping`` then adds the noise and scales.
- ``"vmap"``: ``torch.func`` — ``vmap`` over examples of ``grad`` of the example's loss (the model through
  ``functional_call``), ``randomness="different"``; any loss and model; ``DPOptimizer`` clips. It is also
  the reference the tests check bk against.
bk trusts, as Opacus' hooks do, that ℓ_b depends on example b's rows alone (the per-example loss
contract); vmap enforces it structurally. bk checks that every layer saw exactly B rows (a loss calling
the model on B·K flat rows is refused rather than mis-clipped).
Cost (DP step / non-private step; FeatureDenoiser hidden 256 / depth 3 = 718k parameters, batch 256,
K = 4, AdamW, 2 threads, benchmarks/bench_dp.py → benchmarks/results/dp.json): **bk 1.47×** (tuned
allocator), vmap 8.7×; the conv U-Net (vmap) 2.6×. Opacus' ghost clipping (2.4×) and grad-sample hooks
(17×) were offered as engines until issue 16 and removed: slower than bk, used by nothing but tests, and
they reset Opacus-private attributes (``_norm_sample``, ``_forward_counter``, ``activations``) between
steps, which breaks across Opacus versions.
The vmap path writes B × 718k floats = 735 MB of per-example gradients per 256 examples and reads them for
the norms and the weighted sum.

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

import contextlib
import ctypes
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.validators import ModuleValidator
from torch import nn
from torch.func import functional_call, grad, vmap

from pfdiff.models.denoisers import DiagonalAffine
from pfdiff.privacy.noise import NoiseSource
from pfdiff.training import EMA

PerExampleLoss = Callable[..., torch.Tensor]  # (model, *batch_tensors) -> Tensor[B]

#: Losses whose value for one example depends on that example alone: clippable per example under DP.
PER_EXAMPLE_LOSSES = {"ldm": "diffusion loss (K-averaged per example)", "proto": "prototype loss L_proto",
                      "rad": "equal-radius shape loss L_rad", "ce": "per-example cross-entropy"}
#: Losses that couple the examples of a batch, with the per-example loss to use instead under DP.
BATCH_COUPLED_LOSSES = {"cov": "rad"}


def k_averaged(loss_fn: Callable[..., object], noise_multiplicity: int) -> PerExampleLoss:
    """The per-example loss DP-SGD clips for a diffusion loss: ``loss_fn(model, *batch,
    noise_multiplicity=K).loss``, the K draws of (t, ε) averaged per example *before* clipping (DPDM §3.2)."""
    return lambda model, *batch: loss_fn(model, *batch, noise_multiplicity=noise_multiplicity).loss


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
    may draw random numbers (independently per example) but must not call ``.item()`` or branch on data;
    and ℓ_b sees example b alone, so no batch statistic can leak into another example's gradient.
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


def clip_factors(norms: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, C / (‖g_b‖ + 1e-6)) per example: Opacus' clipping factor (``DPOptimizer.clip_and_accumulate``)."""
    return (max_norm / (norms + 1e-6)).clamp(max=1.0)


def poisson_batch(num_samples: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of a Poisson-sampled batch: each example in with prob. ``sample_rate`` (as Opacus' sampler)."""
    return (torch.rand(num_samples, generator=generator) < sample_rate).nonzero().reshape(-1)


class _InnerMultiplicity:
    """The model as bk hands it to the loss: it declares that it takes [B, K, …] inputs (``DiffusionLoss``
    then calls it on the K draws as an inner dimension); calls and attributes pass through to ``module``,
    whose layers then see B examples."""

    inner_multiplicity = True

    def __init__(self, module: nn.Module):
        self._module = module

    def __call__(self, *args, **kwargs):
        return self._module(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._module, name)


@contextlib.contextmanager
def _frozen(params: list[nn.Parameter]):
    """requires_grad off for the duration: the backward then computes activation gradients only."""
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


@dataclass(frozen=True)
class LayerRule:
    """Book-keeping for one layer type, on the rows of one call on [B, K, …] inputs: ``keep`` maps the layer's
    input to what its weight gradient needs (the input itself, the normalised input for LayerNorm, the
    indices for Embedding); ``sq_norms(layer, a, g)`` gives the per-example squared norms of its parameters'
    gradients ([B] each) and ``write(layer, a, gc)`` sets ``p.grad`` to the sum over examples and rows with
    the output gradients gc already scaled by each example's clip factor. a: [B, R, in] (indices: [B, R]),
    g: [B, R, out]; with the loss Σ_b ℓ_b, row b of both belongs to example b alone."""

    keep: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    sq_norms: Callable[[nn.Module, torch.Tensor, torch.Tensor], list[torch.Tensor]]
    write: Callable[[nn.Module, torch.Tensor, torch.Tensor], None]
    flat_inputs: bool = False  # the kept input has no feature dimension (Embedding's indices)


def _gram(x: torch.Tensor) -> torch.Tensor:
    return torch.bmm(x, x.transpose(1, 2))


def _bias_sq(layer: nn.Module, g: torch.Tensor) -> list[torch.Tensor]:
    return [] if layer.bias is None else [g.sum(1).pow(2).sum(1)]


def _linear_write(layer: nn.Linear, a: torch.Tensor, gc: torch.Tensor) -> None:
    layer.weight.grad = torch.einsum("bro,bri->oi", gc, a)
    if layer.bias is not None:
        layer.bias.grad = gc.sum((0, 1))


def _layernorm_write(layer: nn.LayerNorm, a: torch.Tensor, gc: torch.Tensor) -> None:
    if layer.weight is not None:
        layer.weight.grad = (gc * a).sum((0, 1))
    if layer.bias is not None:
        layer.bias.grad = gc.sum((0, 1))


def _embedding_write(layer: nn.Embedding, a: torch.Tensor, gc: torch.Tensor) -> None:
    layer.weight.grad = torch.zeros_like(layer.weight).index_add_(0, a.reshape(-1), gc.reshape(-1, gc.shape[-1]))


#: Per-layer book-keeping rules (Linear W: g_b = Σ_r G_br A_brᵀ, ‖g_b‖² = Σ_rr' (G_br·G_br')(A_br·A_br'),
#: bias Σ_r G_br; LayerNorm: weight Σ_r G_br ⊙ x̂_br, bias Σ_r G_br; Embedding: row idx_br += G_br,
#: ‖g_b‖² = Σ_rr' [idx_br = idx_br'] (G_br·G_br')). A layer type not listed here makes "auto" pick vmap.
BK_RULES: dict[type[nn.Module], LayerRule] = {
    nn.Linear: LayerRule(
        keep=lambda layer, x: x,
        sq_norms=lambda layer, a, g: [(_gram(g) * _gram(a)).sum((1, 2)), *_bias_sq(layer, g)],
        write=_linear_write),
    nn.LayerNorm: LayerRule(
        keep=lambda layer, x: nn.functional.layer_norm(x, layer.normalized_shape, None, None, layer.eps),
        sq_norms=lambda layer, a, g: ([] if layer.weight is None else [(g * a).sum(1).pow(2).sum(1)])
        + _bias_sq(layer, g),
        write=_layernorm_write),
    nn.Embedding: LayerRule(
        keep=lambda layer, x: x,
        sq_norms=lambda layer, a, g: [(_gram(g) * (a.unsqueeze(2) == a.unsqueeze(1)).to(g.dtype)).sum((1, 2))],
        write=_embedding_write, flat_inputs=True),
    # w ⊙ x + b: LayerNorm's affine part on the raw input (weight Σ_r G_br ⊙ x_br, bias Σ_r G_br)
    DiagonalAffine: LayerRule(
        keep=lambda layer, x: x,
        sq_norms=lambda layer, a, g: [(g * a).sum(1).pow(2).sum(1), *_bias_sq(layer, g)],
        write=_layernorm_write),
}
#: Layers with a book-keeping rule: a call on [B, K, …] gives per-example quantities summed over K.
INNER_DIM_LAYERS = tuple(BK_RULES)


def _rule(layer: nn.Module) -> LayerRule | None:
    return next((r for cls, r in BK_RULES.items() if isinstance(layer, cls)), None)


def _holds_parameters(m: nn.Module) -> bool:
    return any(True for _ in m.parameters(recurse=False))


class _BookKeeper:
    """Keeps, for each layer with a ``BK_RULES`` entry, what its rule needs of the input and the output
    gradient of one call on [B, K, …] inputs, and applies the rule (norms, clipped sum)."""

    def __init__(self, model: nn.Module):
        holders = [m for m in model.modules() if _holds_parameters(m)]
        others = [type(m).__name__ for m in holders if _rule(m) is None]
        if others:
            raise ValueError(f"method='bk' supports {[c.__name__ for c in BK_RULES]} layers only, found {others}; "
                             "use method='vmap'")
        self.layers = holders
        self.store: dict[nn.Module, dict[str, torch.Tensor]] = {}
        self._handles: list = []

    @contextlib.contextmanager
    def recording(self):
        self.store.clear()
        self._handles = [m.register_forward_hook(self._forward) for m in self.layers]
        try:
            yield
        finally:
            for h in self._handles:
                h.remove()
            self.store.clear()

    def _forward(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if module in self.store:
            raise ValueError(f"method='bk': layer {module} is called twice in one forward; use method='vmap'")
        entry = self.store[module] = {"a": _rule(module).keep(module, inputs[0].detach())}
        out = output if output.requires_grad else output.detach().requires_grad_(True)
        out.register_hook(lambda g: entry.__setitem__("g", g.detach()))
        return out

    def _rows(self, layer: nn.Module, size: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        entry = self.store.get(layer)
        if entry is None or "g" not in entry:
            return None, None
        a, g = entry["a"], entry["g"]
        if len(g) != size:
            raise ValueError(f"method='bk': layer {layer} saw {len(g)} rows but the micro-batch has {size} "
                             "examples; the loss must call the model on [B, K, …] inputs; otherwise use method='vmap'")
        a = a.reshape(size, -1) if _rule(layer).flat_inputs else a.reshape(size, -1, a.shape[-1])
        return a, g.reshape(size, -1, g.shape[-1])

    def per_example_sq_norms(self, layer: nn.Module, size: int) -> list[torch.Tensor]:
        a, g = self._rows(layer, size)
        return [] if g is None else [o.float() for o in _rule(layer).sq_norms(layer, a, g)]

    def write_clipped_sum(self, layer: nn.Module, coef: torch.Tensor) -> None:
        a, g = self._rows(layer, len(coef))
        if g is not None:
            _rule(layer).write(layer, a, g * coef.to(g.dtype)[:, None, None])


#: Per-example clipping engines of ``DPSGD`` (see the module docstring for measurements).
METHODS = ("bk", "vmap")


def resolve_method(model: nn.Module, method: str = "auto") -> str:
    """``"auto"`` → ``"bk"`` if every module holding parameters is one of ``INNER_DIM_LAYERS`` (e.g.
    ``FeatureDenoiser``), else ``"vmap"`` (e.g. a conv U-Net, which cannot take [B, K, C, H, W])."""
    if method == "auto":
        holders = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
        return "bk" if all(isinstance(m, INNER_DIM_LAYERS) for m in holders) else "vmap"
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose 'auto' or one of {METHODS}")
    return method


class DPSGD:
    """DP-SGD steps for ``model`` with Poisson sampling, micro-batching and noise multiplicity done right.

    Args:
        model: an Opacus-valid module (checked with ``ModuleValidator.validate(strict=True)``).
        optimizer: a plain ``torch.optim`` optimizer over (some of) ``model``'s parameters; it is wrapped
            in Opacus' ``DPOptimizer`` (``DPOptimizerFastGradientClipping`` for ``method="bk"``;
            ``self.optimizer``; its ``state_dict`` is the wrapped one's). With ``"bk"`` it must hold exactly
            the parameters that require grad (bk clips all of those).
        noise_multiplier: σ; the noise added to the sum of clipped gradients has std σ·C.
        max_grad_norm: C, the per-example clipping norm.
        dataset_size: N, the number of examples (rows of the data tensors given to ``step``).
        sample_rate / expected_batch_size: q, or q·N; give exactly one. The summed gradient is divided
            by q·N (not by the realised batch size, which would leak it).
        max_physical_batch_size: examples per micro-batch (memory bound).
        noise: where the Poisson batches and the Gaussian noise come from (``privacy/noise.py``): by
            default fresh OS entropy every step (the only setting with a DP guarantee); a reproducible
            ``NoiseSource(True, seed)`` derives them from the seed, for debugging (NOT PRIVATE).
        ema: optional EMA, updated once per logical step.
        secure_mode: Opacus' floating-point-attack-resistant noise (Σ of 4 normals / 2 per coordinate;
            ``privacy/noise.py``), at the cost of four normal draws instead of one.
        method: how per-example gradients are clipped (module docstring): ``"auto"`` (default; see
            ``resolve_method``: ``"bk"`` for Linear/LayerNorm/Embedding models, else ``"vmap"``; the resolved
            one is ``self.method``), ``"bk"`` (book-keeping: needs the loss to call the model on [B, K, …] —
            ``DiffusionLoss`` does so for the model ``step`` hands it — and a model that maps leading dims
            [B, K]) or ``"vmap"`` (``torch.func``, any loss and model).
        chunk_size: ``vmap`` chunk inside a micro-batch (``"vmap"`` only; None = whole micro-batch).
        tune_allocator: on CPU, call ``tune_cpu_allocator()`` (process-wide and irreversible, so opt-in:
            default False). Worth ~2× for ``"vmap"``, whose [B, …] per-example gradients are re-allocated
            every micro-batch; a few per cent for ``"bk"``.
        track_norms: compute the pre-clip norm statistics ``step`` returns (free for ``"bk"``, which
            computes the norms anyway; one extra read of the per-example gradients for ``"vmap"``). They
            describe private data and are not differentially private: for monitoring only.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, noise_multiplier: float,
                 max_grad_norm: float, dataset_size: int, sample_rate: float | None = None,
                 expected_batch_size: float | None = None, max_physical_batch_size: int = 256,
                 noise: NoiseSource | None = None, ema: EMA | None = None, secure_mode: bool = False, method: str = "auto",
                 chunk_size: int | None = None, tune_allocator: bool = False, track_norms: bool = True):
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
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if method == "auto" and trainable != optimized:
            method = "vmap"  # bk clips every trainable parameter's gradient (see below)
        method = resolve_method(model, method)
        self.model, self.ema, self.secure_mode = model, ema, secure_mode
        self.noise = noise if noise is not None else NoiseSource()
        self.dataset_size, self.sample_rate = dataset_size, q
        self.expected_batch_size = q * dataset_size
        self.max_physical_batch_size, self.chunk_size = max_physical_batch_size, chunk_size
        self.method, self.track_norms = method, track_norms
        device = next(model.parameters()).device
        if tune_allocator and device.type == "cpu":
            tune_cpu_allocator()
        self._noise_generator = torch.Generator(device=device)
        opt_cls = DPOptimizerFastGradientClipping if method == "bk" else DPOptimizer
        self.optimizer = opt_cls(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                 expected_batch_size=self.expected_batch_size, loss_reduction="mean",
                                 generator=self._noise_generator, secure_mode=secure_mode)
        by_id = {id(p): n for n, p in model.named_parameters()}
        missing = [p for p in self.optimizer.params if id(p) not in by_id]
        if missing:
            raise ValueError(f"the optimizer holds {len(missing)} parameter(s) that are not parameters of the model")
        self._params = [(by_id[id(p)], p) for p in self.optimizer.params]
        if method == "bk":
            if trainable != optimized:
                raise ValueError("method='bk' clips the gradient of every parameter that requires grad, so the "
                                 "optimizer must hold exactly those (freeze the others) or use method='vmap'")
            self._keeper = _BookKeeper(model)
            self._proxy = _InnerMultiplicity(model)

    noise_multiplier = property(lambda self: self.optimizer.noise_multiplier)
    max_grad_norm = property(lambda self: self.optimizer.max_grad_norm)

    def _seed(self, kind: str, step: int) -> int:
        return self.noise.seed(kind, step)

    def sample(self, step: int) -> torch.Tensor:
        """The Poisson batch of logical step ``step`` (indices into the data tensors, CPU). A new draw on
        every call unless the noise source is reproducible."""
        g = torch.Generator().manual_seed(self._seed("dpsgd-poisson", step))
        return poisson_batch(self.dataset_size, self.sample_rate, g)

    def noise_seed(self, step: int) -> int:
        """Seed of the noise generator at ``step`` (DPOptimizer draws one N(0, σ²C²) tensor per parameter,
        in optimizer order). Only a reproducible (NOT PRIVATE) source has one."""
        if not self.noise.reproducible:
            raise RuntimeError("private noise is drawn from OS entropy; its seeds are not reproducible")
        return self._seed("dpsgd-noise", step)

    def _bk_microbatch(self, per_example_loss_fn: PerExampleLoss, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """p.grad = Σ_b min(1, C/‖g_b‖)·g_b by book-keeping (Bu et al. 2023, "Differentially private
        optimization on large model at small cost"): ONE backward for the layers' output gradients (the
        parameters frozen, so autograd skips their gradients), then per layer the per-example norms from
        Gram matrices and the clipped sum as one contraction. Opacus has no such path (its ghost
        clipping needs a second full backward), hence this code; ``tests/test_dpsgd.py`` checks it
        against the vmap reference. Returns the norms ‖g_b‖ [B]."""
        size = len(batch[0])
        if not all(m.training for m in self.model.modules()):
            raise ValueError("method='bk' needs the model in train mode; call model.train() or use method='vmap'")
        params = [p for _, p in self._params]
        flags = [p.requires_grad for p in params]
        with self._keeper.recording(), _frozen(params):
            loss = per_example_loss_fn(self._proxy, *batch)
            if loss.shape != (size,):
                raise ValueError(f"per_example_loss_fn must return one loss per example, shape [{size}]; got "
                                 f"{tuple(loss.shape)}")
            loss.sum().backward()
            sq = torch.zeros(size, device=loss.device, dtype=torch.float32)
            for layer in self._keeper.layers:
                for rows in self._keeper.per_example_sq_norms(layer, size):
                    sq += rows
            norms = sq.sqrt()
            coef = clip_factors(norms, self.max_grad_norm)
            for layer in self._keeper.layers:
                self._keeper.write_clipped_sum(layer, coef)
        assert flags == [p.requires_grad for p in params]
        for _, p in self._params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return norms

    def diffusion_step(self, loss_fn: Callable[..., object], noise_multiplicity: int,
                       data_tensors: tuple[torch.Tensor, ...], step: int, draw_seed: int) -> dict[str, float]:
        """``step`` of the K-averaged diffusion loss (``k_averaged``): the one DP closure of every DP training
        loop. The loss's own draws (t, ε, label drop, inside vmap) come from the global RNG under ``fork_rng``
        (the caller's RNG is left as it was), seeded from the engine's noise source: OS entropy, so the draws
        are secret and i.i.d. per position in the batch. Why not the caller's public ``draw_seed``: the draws
        are assigned by position in the Poisson batch, and adding or removing one example shifts the positions
        of the examples after it; with draws known to the adversary the other examples' clipped gradients then
        differ between neighbouring datasets, and the sensitivity argument (one clipped term changes) fails.
        With secret i.i.d. draws the others' terms have the same distribution in both, so it holds.
        ``draw_seed`` seeds them only under a reproducible (NOT PRIVATE) noise source."""
        device = next(self.model.parameters()).device
        seed = draw_seed if self.noise.reproducible else self._seed("dpsgd-draws", step)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            return self.step(k_averaged(loss_fn, noise_multiplicity), data_tensors, step)

    def step(self, per_example_loss_fn: PerExampleLoss, data_tensors: tuple[torch.Tensor, ...], step: int
             ) -> dict[str, float]:
        """One logical DP-SGD step: Poisson batch → per-example clipping (micro-batched) → Opacus noise,
        ÷ q·N → optimizer step → EMA. ``per_example_loss_fn(model, *batch) -> Tensor[B]`` (see
        ``per_example_grads``; with bk it is called once per micro-batch with a model that asks
        ``DiffusionLoss`` for the [B, K, …] layout); ``data_tensors`` all have ``dataset_size``
        rows. Returns ``batch_size`` (realised), ``grad_norm`` (mean pre-clip per-example gradient norm)
        and ``clip_frac`` (fraction of examples with norm > C); norms 0 for an empty batch and NaN
        without ``track_norms``."""
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
            if len(chunk) == 0:  # empty logical batch: a noise-only step
                for _, p in self._params:
                    if self.method == "bk":
                        p.grad = torch.zeros_like(p)
                    else:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            elif self.method == "bk":
                norms.append(self._bk_microbatch(per_example_loss_fn, batch))
            else:
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
                opt.zero_grad(set_to_none=True)  # clears grad / grad_sample, keeps summed_grad
        opt.zero_grad(set_to_none=True)  # frees the last grad samples (p.grad was consumed by the step)
        if self.ema is not None:
            self.ema.update()
        stats = {"batch_size": float(len(idx)), "grad_norm": 0.0, "clip_frac": 0.0}
        if len(idx) and self.track_norms:
            norms_t = torch.cat(norms)
            # tensors: read (with the rest of the step's metrics) every log_every steps, not per step
            stats.update(grad_norm=norms_t.mean().detach(), clip_frac=(norms_t > self.max_grad_norm).float().mean())
        elif len(idx):
            stats.update(grad_norm=float("nan"), clip_frac=float("nan"))
        return stats


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the process (glibc ``mallopt``) instead of returning it to the OS.

    Per-example gradients (``method="vmap"``) are large (B × #params floats, 735 MB for the
    FeatureDenoiser at B = 256) and freshly allocated every micro-batch; with glibc's defaults each
    allocation is a new ``mmap`` whose pages are faulted in again, which more than doubled those DP steps
    on CPU. Book-keeping allocates nothing that large and gains a few per cent (dp.json). Process-wide and
    irreversible, so opt-in: ``DPSGD(tune_allocator=True)`` or a direct call by the application
    (preloading jemalloc/tcmalloc is the alternative). The cost: the process keeps its peak heap instead of returning
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
