"""DP-SGD engine: per-example clipping with noise multiplicity K, Opacus clipping/noise, Poisson batches,
micro-batching, exact resume, DP-incompatible losses."""

from types import SimpleNamespace

import pytest
import torch
from opacus.validators import ModuleValidator
from opacus.validators.errors import UnsupportedModuleError

from pfdiff.diffusion import DiffusionLoss, make_schedule
from pfdiff.models import FeatureDenoiser
from pfdiff.models.denoisers import timestep_embedding
from pfdiff.privacy.noise import NoiseSource
from pfdiff.privacy.dpsgd import (DPSGD, METHODS, DPIncompatibleLoss, per_example_grads, per_sample_norms,
                                  require_per_example)
from pfdiff.runs import load_state, save_state
from pfdiff.training import EMA, generator

D, CLASSES = 4, 3
SCHEDULE = make_schedule("linear", 1000)


def _model(seed=0, skip="linear"):
    torch.manual_seed(seed)
    model = FeatureDenoiser(D, CLASSES, hidden=16, depth=1, time_dim=8, skip=skip)
    for p in model.parameters():  # fc2 starts at zero; make every parameter matter for the gradients
        torch.nn.init.normal_(p, std=0.3)
    return model


def _data(n, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, D, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    t = torch.randint(0, 1000, (n, K), generator=g)  # fixed draws: example b's K (t, ε) pairs
    eps = torch.randn(n, K, D, generator=g)
    return z, y, t, eps


class _FixedDraws(DiffusionLoss):
    """The project's DiffusionLoss with its (t, ε) draws given instead of drawn."""

    def _draw(self, z0_rep, y_rep, generator):
        return self.t, self.eps, y_rep


def _fixed_loss(scale=1.0, prediction="v"):
    lf = _FixedDraws(SCHEDULE, prediction=prediction)

    def loss(model, z, y, t, eps):
        lf.t, lf.eps = t.reshape(-1), eps.reshape(-1, D)  # example-major rows, as DiffusionLoss draws them
        return scale * lf(model, z, y, noise_multiplicity=t.shape[1]).loss

    return loss


def _autograd_example_grads(model, loss_fn, z, y, t, eps, one_row_at_a_time=False):
    """Per-example gradients with plain autograd, one example (or one row) at a time."""
    out = []
    for b in range(len(z)):
        rows = [slice(k, k + 1) for k in range(t.shape[1])] if one_row_at_a_time else [slice(None)]
        acc = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        for r in rows:
            model.zero_grad()
            loss_fn(model, z[b:b + 1], y[b:b + 1], t[b:b + 1, r], eps[b:b + 1, r]).sum().backward()
            for n, p in model.named_parameters():
                acc[n] += p.grad / len(rows)
        out.append(acc)
    return {n: torch.stack([o[n] for o in out]) for n in out[0]}


def _engine(model, opt, **kw):
    args = dict(noise_multiplier=0.0, max_grad_norm=1.0, dataset_size=8, sample_rate=1.0,
                max_physical_batch_size=256, seed=0)
    args.update(kw)
    seed = args.pop("seed")  # tests replay the draws: a reproducible (NOT PRIVATE) source unless asked otherwise
    args.setdefault("noise", NoiseSource(reproducible=True, seed=seed))
    return DPSGD(model, opt, **args)


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_models_are_opacus_valid_and_batchnorm_is_refused():
    ModuleValidator.validate(_model(), strict=True)
    bad = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    with pytest.raises(UnsupportedModuleError):
        DPSGD(bad, torch.optim.SGD(bad.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
              dataset_size=10, sample_rate=0.5)


# (a) B per-example gradient units reach DPOptimizer, not B·K, and each is clipped to ≤ C
def _spy_units(engine):
    """Per micro-batch: (number of clipping units, their pre-clip norms, norm of what was added to
    summed_grad). Book-keeping has no grad samples: its units are the norms it clips by."""
    seen, units = [], []
    if engine.method == "bk":
        name = f"_{engine.method}_microbatch"
        clip = getattr(engine, name)
        setattr(engine, name, lambda *a: (units.append(clip(*a).clone()), units[-1])[1])
    original = engine.optimizer.pre_step

    def spy(*args):
        if engine.method != "bk":
            units.append(per_sample_norms(engine.optimizer.grad_samples))
        before = [None if p.summed_grad is None else p.summed_grad.clone() for p in engine.optimizer.params]
        out = original(*args)
        added = [p.summed_grad - (0 if b is None else b) for p, b in zip(engine.optimizer.params, before)]
        seen.append((len(units[-1]), units[-1], torch.cat([a.flatten() for a in added]).norm()))
        return out

    engine.optimizer.pre_step = spy
    return seen


@pytest.mark.parametrize("method", METHODS)
def test_dpoptimizer_clips_B_units_not_B_times_K(method):
    B, K, C = 8, 4, 0.5
    model = _model()
    engine = _engine(model, torch.optim.SGD(model.parameters(), lr=0.1), max_grad_norm=C, dataset_size=B,
                     max_physical_batch_size=1, method=method)  # one example per micro-batch: each clip is observable
    seen = _spy_units(engine)
    stats = engine.step(_fixed_loss(scale=100.0), _data(B, K), step=0)
    assert stats["batch_size"] == B
    assert len(seen) == B  # B clipping units over the logical batch, one per example
    for units, pre_norm, clipped in seen:
        assert units == 1
        assert pre_norm.item() > C  # scaled up: every example is clipped
        assert clipped.item() <= C * (1 + 1e-5)
        assert clipped.item() == pytest.approx(C, rel=1e-4)
    assert stats["clip_frac"] == 1.0

    # one physical batch: B clipping units (the K draws were summed per example before clipping)
    model = _model()
    engine = _engine(model, torch.optim.SGD(model.parameters(), lr=0.1), max_grad_norm=C, dataset_size=B,
                     method=method)
    seen = _spy_units(engine)
    shapes = []
    if method != "bk":
        original2 = engine.optimizer.clip_and_accumulate
        engine.optimizer.clip_and_accumulate = lambda: (
            shapes.append([g.shape for g in engine.optimizer.grad_samples]), original2())
    engine.step(_fixed_loss(), _data(B, K), step=0)
    assert len(seen) == 1 and seen[0][0] == B
    if method != "bk":  # p.grad_sample has B rows
        assert all(s[0] == B for s in shapes[0])
        assert [s[1:] for s in shapes[0]] == [p.shape for p in engine.optimizer.params]
    else:  # book-keeping never materialises per-example gradients
        assert all(getattr(p, "grad_sample", None) is None for p in engine.optimizer.params)


# book-keeping against the vmap reference: same per-example norms and clipped sum
@pytest.mark.parametrize("prediction,skip", [("eps", "linear"), ("v", "linear"), ("v", "diagonal")])
def test_bk_matches_vmap_reference(prediction, skip):
    B, K = 7, 3
    data, loss_fn = _data(B, K), _fixed_loss(prediction=prediction)
    ref = per_example_grads(_model(skip=skip), loss_fn, *data)
    ref_norms = per_sample_norms(list(ref.values()))
    C = ref_norms.median().item()  # about half the examples clipped
    assert (ref_norms > C).any() and (ref_norms < C).any()

    model = _model(skip=skip)
    engine = _engine(model, torch.optim.SGD(model.parameters(), lr=0.1), max_grad_norm=C, method="bk")
    norms = engine._bk_microbatch(loss_fn, data)
    torch.testing.assert_close(norms, ref_norms, atol=1e-5, rtol=1e-5)
    factor = (C / (ref_norms + 1e-6)).clamp(max=1.0)
    for n, p in engine._params:  # p.grad = Σ_b min(1, C/‖g_b‖)·g_b
        expected = (factor.view(-1, *[1] * p.dim()) * ref[n]).sum(0)
        torch.testing.assert_close(p.grad, expected, atol=1e-5, rtol=1e-5)
        assert p.requires_grad


def test_bk_rules_cover_exactly_the_layers_auto_sends_to_bk():
    from pfdiff.privacy.dpsgd import BK_RULES, INNER_DIM_LAYERS

    from pfdiff.models import DiagonalAffine

    assert set(INNER_DIM_LAYERS) == set(BK_RULES) == {torch.nn.Linear, torch.nn.LayerNorm, torch.nn.Embedding,
                                                      DiagonalAffine}
    conv = torch.nn.Sequential(torch.nn.Conv1d(1, 2, 3))
    with pytest.raises(ValueError, match="Conv1d"):
        _engine(conv, torch.optim.SGD(conv.parameters(), lr=0.1), method="bk")


@pytest.mark.parametrize("method", ["bk"])
def test_bk_refuses_a_model_call_that_is_not_per_example(method):
    """A loss that calls the model on B·K flat rows, or a model in eval mode, would clip the wrong units:
    refused, not silently mis-clipped."""
    B, K = 4, 3
    model = _model()
    engine = _engine(model, torch.optim.SGD(model.parameters(), lr=0.1), dataset_size=B, method=method)
    lf = DiffusionLoss(SCHEDULE, prediction="v")
    flat = lambda m, z, y: lf(m, z, y, noise_multiplicity=K, inner_multiplicity=False).loss  # noqa: E731
    with pytest.raises(ValueError, match="method='vmap'"):
        engine.step(flat, _data(B, K)[:2], step=0)
    model.eval()
    with pytest.raises(ValueError, match="method='vmap'"):
        engine.step(lambda m, z, y: lf(m, z, y, noise_multiplicity=K).loss, _data(B, K)[:2], step=0)
    model.train()  # and the engine recovers: the hooks kept no stale state
    stats = engine.step(lambda m, z, y: lf(m, z, y, noise_multiplicity=K).loss, _data(B, K)[:2], step=1)
    assert stats["batch_size"] == B and stats["grad_norm"] > 0
    with pytest.raises(ValueError, match="exactly those"):  # a frozen-by-optimizer parameter
        DPSGD(model, torch.optim.SGD(list(model.parameters())[1:], lr=0.1), noise_multiplier=1.0,
              max_grad_norm=1.0, dataset_size=10, sample_rate=0.1, method=method)


def test_auto_method_picks_bk_for_the_feature_denoiser_and_vmap_otherwise():
    model = _model()
    assert _engine(model, torch.optim.SGD(model.parameters(), lr=0.1)).method == "bk"
    assert DPSGD.__init__.__kwdefaults__["method"] == "auto"
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4))
    assert _engine(conv, torch.optim.SGD(conv.parameters(), lr=0.1)).method == "vmap"
    model = _model()  # the optimizer holds a subset of the trainable parameters: vmap clips exactly those
    assert _engine(model, torch.optim.SGD(list(model.parameters())[1:], lr=0.1)).method == "vmap"


def test_inner_multiplicity_layout_gives_the_same_loss():
    B, K = 5, 3
    model = _model()
    z, y, _, _ = _data(B, K)
    lf = DiffusionLoss(SCHEDULE, prediction="v", cond_drop_prob=0.3, null_label=CLASSES)
    outs = [lf(model, z, y, noise_multiplicity=K, generator=generator("cpu", 1, "ldm", 0), inner_multiplicity=inner)
            for inner in (False, True)]
    torch.testing.assert_close(outs[0].loss, outs[1].loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(outs[0].z0_hat, outs[1].z0_hat, atol=1e-6, rtol=1e-6)
    assert torch.equal(outs[0].t, outs[1].t) and torch.equal(outs[0].y_used, outs[1].y_used)
    t = torch.randint(0, 1000, (B, K))
    for dim in (8, 9):
        torch.testing.assert_close(timestep_embedding(t, dim), timestep_embedding(t.reshape(-1), dim).view(B, K, dim))


# (b) per-example gradient of the K-mean = mean of the K per-row gradients (plain autograd, row by row)
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_per_example_gradient_of_K_mean_equals_mean_of_row_gradients(prediction):
    B, K = 5, 4
    model, data, loss_fn = _model(), _data(B, K), _fixed_loss(prediction=prediction)
    grads = per_example_grads(model, loss_fn, *data)
    rows = _autograd_example_grads(model, loss_fn, *data, one_row_at_a_time=True)
    assert set(grads) == {n for n, _ in model.named_parameters()}
    for n, p in model.named_parameters():
        assert grads[n].shape == (B, *p.shape)
        torch.testing.assert_close(grads[n], rows[n], atol=1e-5, rtol=1e-5)


def test_per_example_grads_with_random_draws_sum_to_the_batch_gradient_scale():
    """With the real (randomly drawing) DiffusionLoss: B gradients, finite, and examples differ."""
    B, K = 6, 3
    model = _model()
    lf = DiffusionLoss(SCHEDULE, prediction="v", cond_drop_prob=0.2, null_label=CLASSES)
    z, y, _, _ = _data(B, K)
    g = generator("cpu", 0, "ldm", 0)
    grads = per_example_grads(model, lambda m, z, y: lf(m, z, y, noise_multiplicity=K, generator=g).loss, z, y)
    norms = per_sample_norms(list(grads.values()))
    assert norms.shape == (B,) and torch.isfinite(norms).all() and (norms > 0).all()
    # identical examples still get independent draws (randomness="different")
    grads_same = per_example_grads(model, lambda m, z, y: lf(m, z, y, noise_multiplicity=K, generator=g).loss,
                                   z[:1].repeat(2, 1), y[:1].repeat(2))
    assert not torch.allclose(grads_same["out.weight"][0], grads_same["out.weight"][1])


# (c) one step = SGD(lr) on (Σ_b clip(g_b, C) + σC·N(0, I)) / (q·N), the noise from the same seed
@pytest.mark.parametrize("method", METHODS)
def test_one_step_matches_hand_computed_dp_sgd_update(method):
    N, K, C, sigma, lr, q = 12, 3, 0.3, 0.7, 0.5, 0.5
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = _engine(model, torch.optim.SGD(model.parameters(), lr=lr), noise_multiplier=sigma, max_grad_norm=C,
                     dataset_size=N, sample_rate=q, seed=5, method=method)
    data, loss_fn, step = _data(N, K), _fixed_loss(), 3
    idx = engine.sample(step)
    assert 0 < len(idx) < N
    stats = engine.step(loss_fn, data, step)
    assert stats["batch_size"] == len(idx)

    g = _autograd_example_grads(_model(), loss_fn, *(t[idx] for t in data))
    norms = torch.cat([g[n].flatten(1) for n in g], 1).norm(dim=1)
    factor = (C / norms).clamp(max=1.0)
    noise_gen = torch.Generator().manual_seed(engine.noise_seed(step))
    for n, p in model.named_parameters():  # DPOptimizer draws one noise tensor per parameter, in order
        noise = torch.normal(0.0, sigma * C, size=p.shape, generator=noise_gen)
        expected = before[n] - lr * ((factor.view(-1, *[1] * p.dim()) * g[n]).sum(0) + noise) / (q * N)
        torch.testing.assert_close(p.detach(), expected, atol=1e-5, rtol=1e-5)
    assert stats["grad_norm"] == pytest.approx(norms.mean().item(), rel=1e-4)
    assert stats["clip_frac"] == pytest.approx((norms > C).float().mean().item())


# (d) K does not change the sensitivity: ‖update‖ ≤ lr·C·B/(q·N) for every K
@pytest.mark.parametrize("K", [1, 4, 16])
def test_noise_multiplicity_does_not_change_sensitivity(K):
    B, C, lr = 6, 0.1, 1.0
    model = _model()
    before = _flat(model)
    engine = _engine(model, torch.optim.SGD(model.parameters(), lr=lr), max_grad_norm=C, dataset_size=B)
    z, y, t, eps = _data(1, K)
    data = (z.repeat(B, 1), y.repeat(B), t.repeat(B, 1), eps.repeat(B, 1, 1))  # identical examples: aligned
    stats = engine.step(_fixed_loss(scale=1e6), data, step=0)
    assert stats["clip_frac"] == 1.0
    bound = lr * C * B / engine.expected_batch_size
    update = (_flat(model) - before).norm().item()
    assert update <= bound * (1 + 1e-4)
    assert update == pytest.approx(bound, rel=1e-3)  # the bound is attained: rows clipped one by one would give K×


# (e) micro-batches of 3 give the same update as one physical batch
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_micro_batching_equals_one_physical_batch(sigma, method):
    N, K = 11, 2
    data, params = _data(N, K), []
    for physical in (3, 256):
        model = _model()
        engine = _engine(model, torch.optim.AdamW(model.parameters(), lr=1e-2), noise_multiplier=sigma,
                         dataset_size=N, sample_rate=0.9, max_physical_batch_size=physical, method=method)
        for step in range(2):
            engine.step(_fixed_loss(), data, step)
        params.append(_flat(model))
    torch.testing.assert_close(params[0], params[1], atol=1e-6, rtol=1e-5)


def test_empty_logical_batch_is_a_noise_only_step():
    model = _model()
    before = _flat(model)
    engine = _engine(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.0, dataset_size=8,
                     sample_rate=1e-9)
    ema = EMA(model, 0.9)
    engine.ema = ema
    stats = engine.step(_fixed_loss(), _data(8, 2), step=0)
    assert stats == {"batch_size": 0.0, "grad_norm": 0.0, "clip_frac": 0.0}
    assert not torch.equal(_flat(model), before)  # the noise still moved the weights
    assert ema.num_updates == 1


def test_poisson_batches_are_reproducible_per_step_only_in_debug_mode():
    model = _model()
    engine = _engine(model, torch.optim.SGD(model.parameters(), lr=0.1), dataset_size=1000, sample_rate=0.1)
    model2 = _model()
    other = _engine(model2, torch.optim.SGD(model2.parameters(), lr=0.1), dataset_size=1000, sample_rate=0.1)
    assert torch.equal(engine.sample(7), other.sample(7))
    assert not torch.equal(engine.sample(7), engine.sample(8))
    sizes = torch.tensor([len(engine.sample(s)) for s in range(200)], dtype=torch.float)
    assert abs(sizes.mean().item() - 100) < 5 and sizes.std().item() > 3  # Poisson: the size varies
    model3 = _model()
    private = _engine(model3, torch.optim.SGD(model3.parameters(), lr=0.1), dataset_size=1000, sample_rate=0.1,
                      noise=NoiseSource())
    assert not torch.equal(private.sample(7), private.sample(7))  # secure: a new draw every time


# (f) same seed → same weights; resume from a checkpoint mid-way → same as uninterrupted
def test_seeded_and_resumed_runs_are_identical(tmp_path):
    N, K, steps = 16, 2, 4
    lf = DiffusionLoss(SCHEDULE, prediction="v", cond_drop_prob=0.2, null_label=CLASSES)
    z, y, _, _ = _data(N, K)

    def build():
        model = _model()
        ema = EMA(model, 0.9)
        engine = _engine(model, torch.optim.AdamW(model.parameters(), lr=1e-2), noise_multiplier=1.0,
                         dataset_size=N, sample_rate=0.5, max_physical_batch_size=3, seed=11, ema=ema)
        return model, ema, engine

    def run(engine, start, stop):
        for step in range(start, stop):
            g = generator("cpu", 11, "ldm", step)
            engine.step(lambda m, z, y: lf(m, z, y, noise_multiplicity=K, generator=g).loss, (z, y), step)

    results = []
    for _ in range(2):
        model, ema, engine = build()
        run(engine, 0, steps)
        assert ema.num_updates == steps  # once per logical step, not per micro-batch of 3
        results.append((_flat(model), _flat(ema.module)))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])

    model, ema, engine = build()
    run(engine, 0, 2)
    ck = tmp_path / "dp.safetensors"
    save_state(ck, {"step": 2, "model": model.state_dict(), "optimizer": engine.optimizer.state_dict(),
                    "ema": ema.state_dict()})
    model, ema, engine = build()  # a fresh process
    state = load_state(ck)
    model.load_state_dict(state["model"])
    engine.optimizer.load_state_dict(state["optimizer"])
    ema.load_state_dict(state["ema"])
    run(engine, int(state["step"]), steps)
    assert torch.equal(_flat(model), results[0][0])
    assert torch.equal(_flat(ema.module), results[0][1])


# (g) batch-coupled losses are refused under DP, pointing to the per-example alternative
def test_require_per_example():
    with pytest.raises(DPIncompatibleLoss, match="rad"):
        require_per_example("cov")
    assert issubclass(DPIncompatibleLoss, ValueError)
    for name in ("ldm", "proto", "rad"):
        require_per_example(name)
    with pytest.raises(ValueError, match="unknown"):
        require_per_example("mystery")


def test_constructor_checks():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="exactly one"):
        DPSGD(model, opt, noise_multiplier=1.0, max_grad_norm=1.0, dataset_size=10)
    engine = DPSGD(model, opt, noise_multiplier=1.0, max_grad_norm=1.0, dataset_size=10, expected_batch_size=4)
    assert engine.sample_rate == pytest.approx(0.4) and engine.expected_batch_size == pytest.approx(4)
    with pytest.raises(ValueError, match="not parameters of the model"):
        DPSGD(model, torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1), noise_multiplier=1.0,
              max_grad_norm=1.0, dataset_size=10, sample_rate=0.1)


@pytest.mark.parametrize("secure_mode", [False, True])
def test_default_noise_is_not_reproducible_from_any_seed(secure_mode):
    """Two engines built alike (same seed, same model, same step) release different weights: the noise
    comes from OS entropy, so re-running the code on the published seed cannot re-draw it."""
    params = []
    for _ in range(2):
        model = _model()
        engine = DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                       dataset_size=8, sample_rate=1.0, secure_mode=secure_mode)
        engine.step(_fixed_loss(), _data(8, 2), step=0)
        params.append(_flat(model))
    assert not torch.equal(params[0], params[1])
    with pytest.raises(RuntimeError, match="OS entropy"):
        engine.noise_seed(0)


@pytest.mark.parametrize("method", METHODS)
def test_diffusion_step_is_the_k_averaged_step_and_leaves_the_rng_alone(method):
    """The one DP closure: diffusion_step = step(k_averaged(loss, K)) with the loss's draws seeded, and the
    caller's global RNG is where it was."""
    from pfdiff.privacy.dpsgd import k_averaged

    B, K = 6, 3
    z, y = _data(B, K)[:2]
    lf = DiffusionLoss(SCHEDULE, prediction="v")
    out = []
    for use_helper in (True, False):
        model = _model()
        engine = _engine(model, torch.optim.SGD(model.parameters(), lr=0.1), dataset_size=B, method=method,
                         noise_multiplier=0.5)
        torch.manual_seed(123)
        before = torch.random.get_rng_state()
        if use_helper:
            engine.diffusion_step(lf, K, (z, y), 0, draw_seed=7)
            assert torch.equal(torch.random.get_rng_state(), before)
        else:
            torch.manual_seed(7)
            engine.step(k_averaged(lf, K), (z, y), 0)
        out.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(out[0], out[1])


@pytest.mark.parametrize("reproducible", [True, False])
def test_the_losss_draws_follow_draw_seed_only_under_reproducible_noise(reproducible):
    """Private mode: the (t, ε) draws come from OS entropy (secret, i.i.d. per batch position: adding one
    example shifts the others' positions, which public draws would turn into a change of their gradients),
    so the same draw_seed gives different draws; the NOT PRIVATE debug mode replays them from draw_seed."""
    seen = []

    def loss_fn(model, x, noise_multiplicity=1):
        draw = torch.rand(len(x), noise_multiplicity)
        seen.append(draw)
        return SimpleNamespace(loss=(model(x).squeeze(-1) * draw.mean(1)) ** 2)

    model = torch.nn.Linear(3, 1)
    engine = _engine(model, torch.optim.SGD(model.parameters(), lr=0.0),
                     **({} if reproducible else {"noise": NoiseSource()}))
    x = torch.randn(8, 3)
    for _ in range(2):
        engine.diffusion_step(loss_fn, 2, (x,), step=0, draw_seed=123)
    assert torch.equal(seen[0], seen[1]) == reproducible
