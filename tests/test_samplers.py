"""Samplers against references: diffusers' schedulers, exact Gaussian scores, a trained 2-D Gaussian mixture."""

import pytest
import torch

from pfdiff.diffusion import (SAMPLERS, Denoiser, DiffusionLoss, cosine_schedule, ddim_step, ddpm_step, generate,
                              get_sampler, linear_schedule, make_timesteps, sample_ddim, sample_ddpm, sample_heun)
from pfdiff.models import FeatureDenoiser

diffusers = pytest.importorskip("diffusers")

PRED_TYPE = {"eps": "epsilon", "v": "v_prediction"}


def _ours_and_diffusers_name(kind: str, T: int = 1000):
    return (linear_schedule(T), "linear") if kind == "linear" else (cosine_schedule(T), "squaredcos_cap_v2")


def _in_float64(ref, ours):
    """diffusers keeps ᾱ in float32: hand it ours in float64 so the step formulas are compared, not rounding."""
    ref.alphas_cumprod = ours.alpha_bar.clone()
    ref.alphas, ref.betas = ours.alphas.clone(), ours.betas.clone()
    ref.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    ref.one = torch.tensor(1.0, dtype=torch.float64)
    return ref


def _ddpm_ref(kind, prediction, T=1000):
    ours, name = _ours_and_diffusers_name(kind, T)
    ref = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=name, prediction_type=PRED_TYPE[prediction],
                                  clip_sample=False, thresholding=False, variance_type="fixed_small")
    return ours, ref


def _ddim_ref(kind, prediction, spacing="leading", T=1000):
    ours, name = _ours_and_diffusers_name(kind, T)
    ref = diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule=name, prediction_type=PRED_TYPE[prediction],
                                  clip_sample=False, thresholding=False, set_alpha_to_one=True, steps_offset=0,
                                  timestep_spacing=spacing)
    return ours, ref


def _toy_model(z, t, y):
    """A fixed, nonlinear function of (z_t, t, y) standing in for a network."""
    return torch.tanh(z) * (0.5 + t[:, None] / 1000.0) + 0.1 * y[:, None]


# ---------------------------------------------------------------- schedules and timesteps vs diffusers

@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_alpha_bar_equals_diffusers(kind):
    ours, ref = _ddpm_ref(kind, "eps")
    torch.testing.assert_close(ours.alpha_bar.float(), ref.alphas_cumprod.float(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_make_timesteps_equals_diffusers(spacing):
    ref = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=0)
    for steps in (1, 7, 10, 50, 333):
        ref.set_timesteps(steps)
        assert make_timesteps(1000, steps, spacing) == ref.timesteps.tolist(), (spacing, steps)
    with pytest.raises(ValueError, match="choose one of"):
        make_timesteps(1000, 10, "quadratic")
    with pytest.raises(ValueError, match="steps"):
        make_timesteps(1000, 0)


# ---------------------------------------------------------------- single steps vs diffusers

def _given(out):
    """A "network" whose output is the given tensor (diffusers' steps take the model output itself)."""
    return lambda z, t, y: out


def _x0(out, t, z, schedule, prediction):
    return Denoiser(_given(out), schedule, prediction)(z, t, None)[1]


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddpm_step_equals_diffusers(kind, prediction):
    ours, ref = _ddpm_ref(kind, prediction)
    ref = _in_float64(ref, ours)
    g = torch.Generator().manual_seed(2)
    for t in (999, 500, 37, 1, 0):
        z, out = (torch.randn(8, 6, generator=g, dtype=torch.float64) for _ in range(2))
        # diffusers draws its variance noise with torch.randn from the generator: draw the same here
        expected = ref.step(out, t, z, generator=torch.Generator().manual_seed(9)).prev_sample
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        torch.testing.assert_close(ddpm_step(_x0(out, t, z, ours, prediction), t, z, ours, noise), expected, atol=1e-5, rtol=1e-5)
        # and its deterministic part is the posterior mean
        mean = ref.step(out, t, z, generator=torch.Generator().manual_seed(9)).prev_sample - (
            ref._get_variance(t) ** 0.5 * noise if t > 0 else 0)
        torch.testing.assert_close(ddpm_step(_x0(out, t, z, ours, prediction), t, z, ours), mean, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_step_equals_diffusers(kind, prediction, eta, spacing):
    ours, ref = _ddim_ref(kind, prediction, spacing)
    ref = _in_float64(ref, ours)
    ref.set_timesteps(20)
    ts = make_timesteps(1000, 20, spacing)
    g = torch.Generator().manual_seed(3)
    for i, t in enumerate(ts):
        z, out, noise = (torch.randn(8, 6, generator=g, dtype=torch.float64) for _ in range(3))
        expected = ref.step(out, t, z, eta=eta, variance_noise=noise).prev_sample
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        torch.testing.assert_close(ddim_step(*Denoiser(_given(out), ours, prediction)(z, t, None), t, t_prev, z, ours, eta, noise), expected,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_single_steps_in_float32_against_stock_diffusers(prediction):
    """No float64 hand-over: stock diffusers (float32 ᾱ) on float32 inputs, away from the ᾱ → 0 end."""
    ours, ref = _ddim_ref("cosine", prediction)
    ref.set_timesteps(10)
    g = torch.Generator().manual_seed(5)
    z, out, noise = (torch.randn(16, 4, generator=g) for _ in range(3))
    expected = ref.step(out, 500, z, eta=0.5, variance_noise=noise).prev_sample
    torch.testing.assert_close(ddim_step(*Denoiser(_given(out), ours, prediction)(z, 500, None), 500, 400, z, ours, 0.5, noise), expected,
                               atol=1e-5, rtol=1e-5)
    ours, ref = _ddpm_ref("linear", prediction)
    expected = ref.step(out, 300, z, generator=torch.Generator().manual_seed(1)).prev_sample
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ddpm_step(_x0(out, 300, z, ours, prediction), 300, z, ours, noise), expected, atol=1e-5, rtol=1e-5)


def test_ddim_with_eta_one_on_consecutive_steps_is_ddpm():
    s = cosine_schedule(100)
    g = torch.Generator().manual_seed(6)
    for t in (99, 50, 1):
        z, out, noise = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(3))
        eps, x0 = Denoiser(_given(out), s, "v")(z, t, None)
        torch.testing.assert_close(ddim_step(eps, x0, t, t - 1, z, s, 1.0, noise), ddpm_step(x0, t, z, s, noise))


# ---------------------------------------------------------------- whole chains vs diffusers

@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_sample_ddpm_equals_the_diffusers_loop(prediction):
    ours, ref = _ddpm_ref("linear", prediction, T=50)
    ref = _in_float64(ref, ours)
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.arange(6) % 2
    g = torch.Generator().manual_seed(7)
    z = x
    for t in ref.timesteps.tolist():
        z = ref.step(_toy_model(z, torch.full((6,), t), y), t, z, generator=g).prev_sample
    ours_out = sample_ddpm(Denoiser(_toy_model, ours, prediction), x, y, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours_out, z, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_sample_ddim_equals_the_diffusers_loop(eta):
    ours, ref = _ddim_ref("cosine", "v", "trailing", T=200)
    ref = _in_float64(ref, ours)
    ref.set_timesteps(8)
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.arange(6) % 3
    g = torch.Generator().manual_seed(8)
    z = x
    for t in ref.timesteps.tolist():
        z = ref.step(_toy_model(z, torch.full((6,), t), y), t, z, eta=eta, generator=g).prev_sample
    den = Denoiser(_toy_model, ours, "v")
    ours_out = sample_ddim(den, x, y, 8, eta=eta, spacing="trailing", generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(ours_out, z, atol=1e-6, rtol=1e-6)
    # an explicit timestep list is the same as the spacing that produced it
    torch.testing.assert_close(sample_ddim(den, x, y, make_timesteps(200, 8, "trailing"), eta=eta,
                                           generator=torch.Generator().manual_seed(8)), ours_out)
    with pytest.raises(ValueError, match="descending"):
        sample_ddim(den, x, y, [10, 50])


# ---------------------------------------------------------------- exact Gaussian score

M, S = 1.5, 0.5


def _gaussian_oracle(schedule, m: float = M, s: float = S):
    """The exact ε-predictor for data N(m, s²I): ε̂ = √(1−ᾱ)(z_t − √ᾱ m)/(ᾱ s² + 1 − ᾱ), as a denoiser."""
    def model(z, t, y):
        ab = schedule.sqrt_alpha_bar(t, z.ndim, z.dtype) ** 2
        return (1 - ab).sqrt() * (z - ab.sqrt() * m) / (ab * s**2 + 1 - ab)
    return Denoiser(model, schedule, "eps")


def _exact_flow(x, schedule, t0: int, m: float = M, s: float = S):
    """The probability-flow ODE from z_{t0} = x to σ = 0 for N(m, s²) data: in x̃ = z/√ᾱ with σ² = (1−ᾱ)/ᾱ,
    x̃ − m scales as √(s² + σ²)."""
    sigma0 = float(schedule.sigma()[t0])
    return m + (x * (1 + sigma0**2) ** 0.5 - m) * s / (s**2 + sigma0**2) ** 0.5


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("shape", [(4000, 2), (1000, 2, 2, 2)])
def test_samplers_recover_a_gaussian_with_the_exact_score(sampler, shape):
    """Samples' mean and std within 0.05 of (m, s) = (1.5, 0.5) on 8,000 values (standard errors ≈ 0.006)."""
    schedule = linear_schedule(1000)
    g = torch.Generator().manual_seed(4)
    y = torch.zeros(shape[0], dtype=torch.long)
    out = generate(sampler, _gaussian_oracle(schedule), shape, y, 50, generator=g)
    assert out.shape == shape
    assert abs(out.mean().item() - M) < 0.05, out.mean()
    assert abs(out.std().item() - S) < 0.05, out.std()


def test_a_broken_sampler_fails_the_gaussian_check():
    """The check above has teeth: the sign of ε̂ flipped moves the samples far away."""
    schedule = linear_schedule(1000)
    oracle = _gaussian_oracle(schedule)
    y = torch.zeros(2000, dtype=torch.long)
    for sampler in sorted(SAMPLERS):
        broken = oracle.with_net(lambda z, t, yy: -oracle.net(z, t, yy))
        out = generate(sampler, broken, (2000, 2), y, 50, generator=torch.Generator().manual_seed(0))
        assert abs(out.mean().item() - M) > 0.5 or abs(out.std().item() - S) > 0.2, sampler


def test_heun_and_ddim_follow_the_exact_flow_at_their_orders():
    """Per sample against the analytic ODE solution: Heun is 2nd order (halving h divides the error by ~4),
    DDIM 1st order (by ~2); Heun with 50 steps is within 0.01 of the exact flow."""
    schedule = linear_schedule(1000)
    x = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.zeros(2000, dtype=torch.long)
    err = {}
    for name, fn in (("heun", sample_heun), ("ddim", sample_ddim)):
        for steps in (25, 50):
            out = fn(_gaussian_oracle(schedule), x, y, steps)
            err[name, steps] = (out - _exact_flow(x, schedule, make_timesteps(1000, steps)[0])).abs().max().item()
    assert err["heun", 50] < 0.01 and err["heun", 50] < err["ddim", 50] / 5, err
    assert err["heun", 25] / err["heun", 50] > 3.0, err
    assert 1.5 < err["ddim", 25] / err["ddim", 50] < 3.0, err


# ---------------------------------------------------------------- API: callback, generator, gradients, registry

@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_callback_sees_every_step(sampler):
    schedule = linear_schedule(40)
    seen = []
    x = torch.randn(3, 2)
    generate(sampler, _gaussian_oracle(schedule), x, torch.zeros(3, dtype=torch.long), 8,
             callback=lambda i, t, z, x0: seen.append((i, t, z.clone(), x0.clone())))
    ts = list(range(39, -1, -1)) if sampler == "ddpm" else make_timesteps(40, 8)
    assert [s[0] for s in seen] == list(range(len(ts))) and [s[1] for s in seen] == ts
    torch.testing.assert_close(seen[0][2], x)
    for _, t, z, x0 in seen:  # ẑ0 is the exact posterior mean E[z0 | z_t] = m + √ᾱ s²(z_t − √ᾱ m)/(ᾱ s² + 1 − ᾱ)
        ab = float(schedule.alpha_bar[t])
        torch.testing.assert_close(x0, M + ab**0.5 * S**2 * (z - ab**0.5 * M) / (ab * S**2 + 1 - ab))


def test_generate_is_reproducible_with_a_generator_and_gradient_free():
    schedule = linear_schedule(100)
    model = Denoiser(FeatureDenoiser(2, 2, hidden=16, depth=1), schedule)
    y = torch.tensor([0, 1, 1])
    a = generate("ddim", model, (3, 2), y, 5, eta=1.0, generator=torch.Generator().manual_seed(0))
    b = generate("ddim", model, (3, 2), y, 5, eta=1.0, generator=torch.Generator().manual_seed(0))
    c = generate("ddim", model, (3, 2), y, 5, eta=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c) and not a.requires_grad
    with pytest.raises(ValueError, match=r"choose one of \['ddim', 'ddpm', 'heun'\]"):
        get_sampler("euler")
    assert get_sampler("heun") is sample_heun


@pytest.mark.parametrize("sampler", ["ddim", "heun"])
def test_gradients_flow_through_the_sampler_when_enabled(sampler):
    model = FeatureDenoiser(2, 2, hidden=16, depth=1)
    out = get_sampler(sampler)(Denoiser(model, linear_schedule(100), "v"), torch.randn(4, 2),
                               torch.tensor([0, 1, 0, 1]), 3)
    out.square().sum().backward()
    assert model.inp.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- a trained model on a known mixture

MEANS = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
COVS = torch.tensor([[[0.25, 0.0], [0.0, 0.04]], [[0.04, 0.0], [0.0, 0.25]], [[0.13, 0.07], [0.07, 0.13]]])


@pytest.fixture(scope="module")
def trained_mixture_model():
    """FeatureDenoiser (v-prediction) trained on 3 anisotropic 2-D Gaussians, 1,500 points each (~10 s)."""
    torch.manual_seed(0)
    y = torch.arange(3).repeat_interleave(1500)
    z = MEANS[y] + (torch.linalg.cholesky(COVS)[y] @ torch.randn(len(y), 2, 1)).squeeze(-1)
    schedule = linear_schedule(1000)
    model = FeatureDenoiser(2, 3, hidden=64, depth=2)
    steps = 2000
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    lr_decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / steps)
    loss_fn = DiffusionLoss(schedule, prediction="v")
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (256,), generator=g)
        loss = loss_fn(model, z[idx], y[idx], generator=g).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        lr_decay.step()
    return model.eval(), schedule


def _mixture_errors(out, y):
    """Per class: max |mean − true mean|, max |cov − true cov| (entries), and whether the axes are right."""
    errs = []
    for c in range(3):
        zc = out[y == c]
        cov = torch.cov(zc.T)
        axes_ok = [cov[0, 0] > 2 * cov[1, 1], cov[1, 1] > 2 * cov[0, 0], cov[0, 1] > 0.03][c]
        errs.append(((zc.mean(0) - MEANS[c]).abs().max().item(), (cov - COVS[c]).abs().max().item(), bool(axes_ok)))
    return errs


def test_trained_model_matches_a_known_gaussian_mixture(trained_mixture_model):
    """Samples of each class: mean within 0.1 of the true mean, every covariance entry within 0.08 (DDIM,
    50 steps) or 0.04 (Heun, 25 steps) of the truth, and the anisotropy the right way round. True variances
    are 0.04–0.25; DDIM's 1st-order error shrinks them (max entry error ~0.04), Heun's reaches ~0.02.
    Training seeds 0–2 and sampling seeds 1–2 all pass with about 2× margin."""
    model, schedule = trained_mixture_model
    y = torch.arange(3).repeat_interleave(2000)
    noise = torch.randn(len(y), 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        den = Denoiser(model, schedule, "v")
        ddim = sample_ddim(den, noise, y, 50)
        heun = sample_heun(den, noise, y, 25)
        broken = sample_ddim(den.with_net(lambda z, t, yy: -model(z, t, yy)), noise, y, 50)
    for name, out, cov_tol in (("ddim", ddim, 0.08), ("heun", heun, 0.04)):
        for c, (mean_err, cov_err, axes_ok) in enumerate(_mixture_errors(out, y)):
            assert mean_err < 0.1 and cov_err < cov_tol and axes_ok, (name, c, mean_err, cov_err)
    # the same check fails for a broken sampler (sign of the model output flipped)
    assert all(mean_err > 0.5 for mean_err, _, _ in _mixture_errors(broken, y))
