"""Diffusion core: schedules, ε/v/x0 parameterisations, the training loss and classifier-free guidance."""

import math

import pytest
import torch

from pfdiff.diffusion import (PREDICTIONS, WEIGHTINGS, ClassifierFreeGuidance, DiffusionLoss, cosine_schedule,
                              eps_from_x0, linear_schedule, loss_weight, make_schedule, split_prediction,
                              training_target, v_target, x0_from_eps)
from pfdiff.models import FeatureDenoiser


def _alpha_bar_by_hand(betas: list[float], t: int) -> float:
    return math.prod(1.0 - b for b in betas[: t + 1])


# ---------------------------------------------------------------- schedules

def test_linear_schedule_endpoints_and_zero_indexing():
    s = linear_schedule(1000)
    assert s.T == 1000 and s.name == "linear" and s.betas.dtype == torch.float64
    assert math.isclose(float(s.betas[0]), 1e-4) and math.isclose(float(s.betas[-1]), 0.02)
    assert float(s.alpha_bar[0]) == pytest.approx(1 - 1e-4, abs=1e-15)  # ᾱ_0 = 1 − β_0 (0-indexed t)
    assert float(s.alpha_bar[999]) == pytest.approx(_alpha_bar_by_hand(s.betas.tolist(), 999), rel=1e-10)
    torch.testing.assert_close(s.alphas, 1 - s.betas)


def test_cosine_schedule_is_monotone_in_the_unit_interval_and_follows_its_formula():
    s = cosine_schedule(1000)
    ab = s.alpha_bar
    assert ((ab > 0) & (ab <= 1)).all() and (ab[1:] < ab[:-1]).all()
    # away from the β cap, ᾱ_t = f((t+1)/T)/f(0) with f(u) = cos²((u + s)/(1 + s)·π/2)  (Nichol & Dhariwal eq. 17)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 100, 500, 900):
        assert float(ab[t]) == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-9)
    assert float(s.betas.max()) <= 0.999


def test_make_schedule_registry():
    assert make_schedule("cosine", 50).name == "cosine" and make_schedule("linear", 50).T == 50
    with pytest.raises(ValueError, match=r"choose one of \['cosine', 'linear'\]"):
        make_schedule("sigmoid", 100)


def test_broadcast_coefficients_shape_dtype_and_device():
    s = linear_schedule(100)
    t = torch.tensor([0, 5, 99])
    a = s.sqrt_alpha_bar(t, 4)
    assert a.shape == (3, 1, 1, 1) and a.dtype == torch.float32 and a.device == t.device
    torch.testing.assert_close(a.flatten(), s.alpha_bar[t].sqrt().float())
    torch.testing.assert_close(a**2 + s.sqrt_one_minus_alpha_bar(t, 4) ** 2, torch.ones(3, 1, 1, 1))
    moved = s.to("cpu")
    assert moved.name == "linear" and torch.equal(moved.alpha_bar, s.alpha_bar)


def test_q_sample_statistics():
    s = linear_schedule(1000)
    g = torch.Generator().manual_seed(0)
    n, t0 = 200_000, 300
    z0 = torch.full((n, 2), 2.0)
    zt = s.q_sample(z0, torch.full((n,), t0), torch.randn(z0.shape, generator=g))
    ab = _alpha_bar_by_hand(s.betas.tolist(), t0)
    # q(z_t | z_0) = N(√ᾱ z_0, (1 − ᾱ) I); standard errors are ~0.002 here
    assert abs(zt.mean().item() - 2.0 * math.sqrt(ab)) < 0.01
    assert abs(zt.var().item() - (1 - ab)) < 0.01


def test_ou_time_snr_and_sigma_are_consistent_with_alpha_bar():
    s = cosine_schedule(200)
    t = torch.tensor([0, 10, 100, 199])
    ab = s.alpha_bar[t]
    torch.testing.assert_close(torch.exp(-2 * s.ou_time(t)), ab)
    torch.testing.assert_close(s.snr(t), ab / (1 - ab))
    torch.testing.assert_close(s.sigma(t) ** 2, (1 - ab) / ab)
    torch.testing.assert_close(s.sigma(t) ** 2, 1 / s.snr(t))
    ou = s.ou_time()
    assert ou.shape == (200,) and (ou > 0).all() and (ou[1:] > ou[:-1]).all()


# ---------------------------------------------------------------- parameterisations

@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_split_prediction_round_trips_every_parameterisation(prediction):
    s = linear_schedule(1000)
    g = torch.Generator().manual_seed(1)
    z0, eps = (torch.randn(32, 5, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.cat([torch.tensor([0, 999]), torch.randint(0, 1000, (30,), generator=g)])
    a, b = s.sqrt_alpha_bar(t, 2, torch.float64), s.sqrt_one_minus_alpha_bar(t, 2, torch.float64)
    zt = s.q_sample(z0, t, eps)
    eps_hat, z0_hat = split_prediction(training_target(prediction, z0, eps, a, b), zt, t, s, prediction)
    torch.testing.assert_close(eps_hat, eps, atol=1e-6, rtol=0)
    torch.testing.assert_close(z0_hat, z0, atol=1e-6, rtol=0)
    # the coefficient form gives the same
    eps2, z02 = split_prediction(training_target(prediction, z0, eps, a, b), zt, a, b, prediction)
    torch.testing.assert_close(eps2, eps_hat)
    torch.testing.assert_close(z02, z0_hat)


def test_conversion_helpers_invert_each_other():
    g = torch.Generator().manual_seed(2)
    z0, eps = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)
    ab = torch.rand(8, 1, generator=g, dtype=torch.float64) * 0.98 + 0.01
    a, b = ab.sqrt(), (1 - ab).sqrt()
    zt = a * z0 + b * eps
    torch.testing.assert_close(x0_from_eps(zt, eps, a, b), z0)
    torch.testing.assert_close(eps_from_x0(zt, z0, a, b), eps)
    v = v_target(z0, eps, a, b)
    torch.testing.assert_close(v, a * eps - b * z0)
    torch.testing.assert_close(a * zt - b * v, z0)  # Salimans & Ho 2022: z0 = a z_t − b v


def test_unknown_prediction_names_the_choices():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"\['eps', 'v', 'x0'\]"):
        training_target("score", z, z, 1.0, 0.0)
    with pytest.raises(ValueError, match="choose one of"):
        split_prediction(z, z, torch.zeros(2, dtype=torch.long), linear_schedule(10), "score")
    with pytest.raises(ValueError, match="choose one of"):
        DiffusionLoss(linear_schedule(10), prediction="score")


# ---------------------------------------------------------------- loss

def _oracle(schedule, prediction):
    """With z0 = 0, z_t = √(1−ᾱ)ε, so every target is a known function of (z_t, t)."""
    def model(z, t, y):
        a, b = schedule.sqrt_alpha_bar(t, z.ndim), schedule.sqrt_one_minus_alpha_bar(t, z.ndim)
        return {"eps": z / b, "x0": torch.zeros_like(z), "v": a * z / b}[prediction]
    return model


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("shape", [(6, 3), (6, 2, 4, 4)])
def test_loss_is_zero_for_the_exact_model(prediction, shape):
    s = linear_schedule(100)
    out = DiffusionLoss(s, prediction=prediction, weighting="min_snr")(
        _oracle(s, prediction), torch.zeros(shape), torch.zeros(6, dtype=torch.long), noise_multiplicity=3,
        generator=torch.Generator().manual_seed(0))
    assert out.loss.shape == (6,) and out.t.shape == (6, 3) and out.y_used.shape == (6, 3)
    assert out.z0_hat.shape == (6, 3, *shape[1:])
    assert out.loss.abs().max() < 1e-8
    assert out.z0_hat.abs().max() < 1e-4  # ẑ0 of the exact model is z0 = 0


def test_loss_is_positive_and_differentiable_for_a_network():
    s = linear_schedule(100)
    model = FeatureDenoiser(3, 2, hidden=16, depth=1)
    out = DiffusionLoss(s)(model, torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1]), noise_multiplicity=2)
    assert (out.loss > 0).all() and out.z0_hat.requires_grad
    out.loss.mean().backward()
    assert model.out.weight.grad.abs().sum() > 0


def test_noise_multiplicity_averages_k_single_draws_in_one_call():
    s = cosine_schedule(100)
    g = torch.Generator().manual_seed(3)
    z0, y = torch.randn(7, 4, generator=g), torch.randint(0, 3, (7,), generator=g)
    calls = []

    def model(z, t, yy):  # some fixed function of all three inputs
        calls.append(len(z))
        return 0.3 * z + 1e-3 * t[:, None] + 0.1 * yy[:, None]

    loss = DiffusionLoss(s, prediction="v", weighting="inv_sqrt")
    out_k = loss(model, z0, y, noise_multiplicity=5, generator=torch.Generator().manual_seed(11))
    assert calls == [35] and out_k.loss.shape == (7,)
    # the same generator stream with K = 1 on the repeated batch draws the same (t, ε) rows
    out_1 = loss(model, z0.repeat_interleave(5, 0), y.repeat_interleave(5, 0),
                 generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(out_k.loss, out_1.loss.view(7, 5).mean(1))
    torch.testing.assert_close(out_k.t, out_1.t.view(7, 5))
    torch.testing.assert_close(out_k.z0_hat, out_1.z0_hat.view(7, 5, 4))
    # and the K draws of one example are different draws
    assert (out_1.loss.view(7, 5).std(1) > 0).all()
    with pytest.raises(ValueError, match="noise_multiplicity"):
        loss(model, z0, y, noise_multiplicity=0)


def test_cond_drop_rate_and_labels():
    s = linear_schedule(100)
    loss = DiffusionLoss(s, cond_drop_prob=0.3, null_label=10)
    y = torch.randint(0, 10, (5000,), generator=torch.Generator().manual_seed(1))
    out = loss(lambda z, t, yy: z, torch.randn(5000, 2), y, noise_multiplicity=4,
               generator=torch.Generator().manual_seed(0))
    dropped = out.y_used == 10
    assert abs(dropped.float().mean().item() - 0.3) < 0.01  # 20,000 rows: standard error 0.003
    kept = ~dropped
    assert torch.equal(out.y_used[kept], y[:, None].expand(-1, 4)[kept])
    assert torch.equal(DiffusionLoss(s)(lambda z, t, yy: z, torch.randn(50, 2), y[:50]).y_used[:, 0], y[:50])
    with pytest.raises(ValueError, match="null_label"):
        DiffusionLoss(s, cond_drop_prob=0.1)


def test_timestep_range_is_respected():
    s = linear_schedule(100)
    out = DiffusionLoss(s, t_min=20, t_max=40)(lambda z, t, y: z, torch.randn(4000, 2),
                                               torch.zeros(4000, dtype=torch.long),
                                               generator=torch.Generator().manual_seed(0))
    assert out.t.min().item() == 20 and out.t.max().item() == 39  # both ends are reached in 4,000 draws
    out = DiffusionLoss(s)(lambda z, t, y: z, torch.randn(4000, 2), torch.zeros(4000, dtype=torch.long))
    assert out.t.min().item() == 0 and out.t.max().item() == 99
    for bad in ({"t_min": 50, "t_max": 50}, {"t_min": -1}, {"t_max": 101}):
        with pytest.raises(ValueError, match="t_min"):
            DiffusionLoss(s, **bad)


def test_loss_weights_by_hand():
    s = linear_schedule(1000)
    betas = s.betas.tolist()
    t = torch.tensor([5, 400, 999])
    for i, ti in enumerate(t.tolist()):
        ab = _alpha_bar_by_hand(betas, ti)
        snr = ab / (1 - ab)
        # Hang et al. 2023: min(SNR, γ) in x0 units; /SNR for ε, /(SNR + 1) for v
        assert loss_weight(s, t, "min_snr", "eps")[i].item() == pytest.approx(min(snr, 5) / snr, rel=1e-5)
        assert loss_weight(s, t, "min_snr", "v")[i].item() == pytest.approx(min(snr, 5) / (snr + 1), rel=1e-5)
        assert loss_weight(s, t, "min_snr", "x0")[i].item() == pytest.approx(min(snr, 5), rel=1e-5)
        assert loss_weight(s, t, "min_snr", "eps", gamma=1.0)[i].item() == pytest.approx(min(snr, 1) / snr, rel=1e-5)
        assert loss_weight(s, t, "inv_sqrt", "eps")[i].item() == pytest.approx(1 / math.sqrt(1 - ab), rel=1e-5)
        assert loss_weight(s, t, "uniform", "v")[i].item() == 1.0
    assert loss_weight(s, t, "min_snr", "eps")[0] < 0.01  # t = 5: SNR ≈ 1600, heavily down-weighted
    assert set(WEIGHTINGS) == {"uniform", "inv_sqrt", "min_snr"}
    with pytest.raises(ValueError, match=r"choose one of \['inv_sqrt', 'min_snr', 'uniform'\]"):
        DiffusionLoss(s, weighting="p2")


@pytest.mark.parametrize("weighting", ["min_snr", "inv_sqrt"])
def test_loss_applies_the_weight_per_row(weighting):
    s = linear_schedule(1000)
    z0, y = torch.randn(64, 3), torch.zeros(64, dtype=torch.long)
    model = lambda z, t, yy: 0.5 * z  # noqa: E731
    plain = DiffusionLoss(s, prediction="v")(model, z0, y, generator=torch.Generator().manual_seed(4))
    weighted = DiffusionLoss(s, prediction="v", weighting=weighting, min_snr_gamma=2.0)(
        model, z0, y, generator=torch.Generator().manual_seed(4))
    w = loss_weight(s, plain.t[:, 0], weighting, "v", gamma=2.0)
    torch.testing.assert_close(weighted.loss, plain.loss * w)


# ---------------------------------------------------------------- classifier-free guidance

class _CountingModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.batches = model, []

    def forward(self, z, t, y):
        self.batches.append(len(z))
        return self.model(z, t, y)


def test_classifier_free_guidance():
    torch.manual_seed(0)
    model = FeatureDenoiser(3, 4, hidden=16, depth=1)
    for p in model.parameters():  # the residual blocks start as the identity: randomise so that y matters
        torch.nn.init.normal_(p, std=0.3)
    z, t, y = torch.randn(5, 3), torch.randint(0, 100, (5,)), torch.randint(0, 4, (5,))
    with torch.no_grad():
        cond, uncond = model(z, t, y), model(z, t, torch.full_like(y, 4))
        assert (cond - uncond).abs().max() > 1e-3
        counting = _CountingModel(model)
        torch.testing.assert_close(ClassifierFreeGuidance(counting, 4, 1.0)(z, t, y), cond)
        torch.testing.assert_close(ClassifierFreeGuidance(counting, 4, 0.0)(z, t, y), uncond)
        assert counting.batches == [5, 5]  # scale 1 and 0: one plain pass each
        guided = ClassifierFreeGuidance(counting, 4, 2.5)(z, t, y)
        assert counting.batches[-1] == 10  # cond and null rows in one batched call
        torch.testing.assert_close(guided, uncond + 2.5 * (cond - uncond), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ClassifierFreeGuidance(model, 4, -1.0)(z, t, y), 2 * uncond - cond,
                                   atol=1e-6, rtol=1e-5)


def test_precomputed_draws_give_the_generators_losses_and_batch_across_examples():
    """``DiffusionLoss.draw`` + ``draws=``: per-example draws concatenated, one forward, the same losses."""
    loss_fn = DiffusionLoss(linear_schedule(100), cond_drop_prob=0.2, null_label=3)
    model = FeatureDenoiser(4, 4, hidden=16, depth=1).eval()
    z, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])

    def gen(i):
        return torch.Generator().manual_seed(100 + i)

    with torch.no_grad():
        direct = torch.cat([loss_fn(model, z[i:i + 1], y[i:i + 1], 3, gen(i)).loss for i in range(5)])
        parts = [loss_fn.draw(z[i:i + 1], y[i:i + 1], 3, gen(i)) for i in range(5)]
        t, eps, y_rep = (torch.cat(p) for p in zip(*parts))
        batched = loss_fn(model, z, y, 3, draws=(t, eps, y_rep)).loss
    assert torch.allclose(batched, direct, atol=1e-6)
    with pytest.raises(ValueError, match=r"draws for 15 rows, the batch has 4×3"):
        loss_fn(model, z[:4], y[:4], 3, draws=(t, eps, y_rep))
