"""Dynamical regimes (Biroli, Bonnaire, de Bortoli & Mézard 2024): theory, measurement, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pfdiff.analysis import regimes as R
from pfdiff.diffusion import make_schedule
from pfdiff.diffusion import Denoiser, training_target

# Two-Gaussian mixture with its exact score: |measured t_S − ½ log Λ| in OU time. The exact midpoint sits
# +0.06 above ½ log Λ there, the 10 % → 90 % speciation window spans ≈ 1.7, seed-to-seed spread ≈ 0.03.
T_S_TOLERANCE = 0.2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small matrices: extra threads only add overhead (and stall badly on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _mixture(schedule, d=32, m2=24.0, sigma2=1.0):
    m = torch.full((d,), math.sqrt(m2 / d), dtype=torch.float64)
    return R.GaussianMixtureDenoiser(torch.stack([m, -m]), sigma2, schedule)


def _as_network(mixture, prediction):
    """The exact mixture as a raw network in ``prediction``, wrapped again: the path a trained model takes."""
    def net(z, t, y):
        eps, x0 = mixture(z, t, y)
        a, b = (c.to(z.dtype) for c in Denoiser(None, mixture.schedule).coefficients(t, z))
        return training_target(prediction, x0, eps, a, b)
    return Denoiser(net, mixture.schedule, prediction)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("T", [1000, 50])
def test_ou_time_step_round_trip(name, T):
    s = make_schedule(name, T)
    t = s.ou_time().numpy()
    assert np.allclose(t, -0.5 * np.log(s.alpha_bar.numpy()))
    assert (np.diff(t) > 0).all()
    assert (R.step_at_ou_time(s, t) == np.arange(T)).all()  # step → t → step
    for k in (0, T // 3, T - 1):
        assert R.step_at_ou_time(s, float(t[k])) == k  # scalar in, int out
    u = np.random.default_rng(0).uniform(t[0], t[-1], 200)  # t → step → t: within the local spacing
    back = t[R.step_at_ou_time(s, u)]
    spacing = np.maximum(np.abs(np.diff(t, prepend=t[0]))[R.step_at_ou_time(s, u)], np.diff(t, append=t[-1])[R.step_at_ou_time(s, u)])
    assert (np.abs(back - u) <= spacing + 1e-12).all()
    assert R.step_at_ou_time(s, -1.0) == 0 and R.step_at_ou_time(s, 1e3) == T - 1


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_mixture_denoiser_is_the_gaussian_posterior(prediction):
    """One component: E[a|z_t] = μ + √ᾱσ²/(ᾱσ² + 1 − ᾱ)·(z_t − √ᾱμ); every parameterisation agrees."""
    s = make_schedule("linear", 100)
    mu = torch.randn(1, 5, dtype=torch.float64)
    model = _as_network(R.GaussianMixtureDenoiser(mu, 0.7, s), prediction)
    z, t = torch.randn(8, 5), torch.randint(0, 100, (8,))
    ab = s.alpha_bar[t].double()[:, None]
    want = mu + ab.sqrt() * 0.7 / (ab * 0.7 + 1 - ab) * (z.double() - ab.sqrt() * mu)
    _, x0 = model(z, t, torch.full((8,), 1))
    assert torch.allclose(x0.double(), want, atol=1e-4)


@pytest.mark.parametrize("schedule_name,prediction", [("linear", "eps"), ("cosine", "v"), ("cosine", None)])
def test_cloning_recovers_speciation_time_of_two_gaussians(schedule_name, prediction):
    """Exact score, ±m with ‖m‖² = 24, σ² = 1 in d = 32: Λ = 25, t_S = ½ log 25 = 1.609. The measured cloning
    curve follows the exact φ(t) and crosses the midpoint ¾ of its plateaus (½, 1) within T_S_TOLERANCE of
    ½ log Λ, and within 0.12 of the exact curve's own midpoint (½ log Λ + 0.06)."""
    s = make_schedule(schedule_name, 1000)
    model = _mixture(s)  # prediction None: the exact denoiser itself, no parameterisation in between
    denoiser = model if prediction is None else _as_network(model, prediction)
    x0, y = model.sample(1000, torch.Generator().manual_seed(0))
    spec = R.speciation_time(x0, y)
    t_S = 0.5 * math.log(25.0)
    assert abs(spec.t_S - t_S) < 0.05  # the covariance spectrum of the sample gives Λ
    assert spec.Lambda_between == pytest.approx(24.0, rel=0.1)
    steps = R.ou_grid_steps(s, 12, 0.4, 3.4)
    cur = R.cloning_curve(denoiser, x0, steps, model.classify, torch.full((len(x0),), model.null_label), clones=4,
                          sampler_steps=50, seed=1)
    theory = R.two_gaussian_cloning_theory(np.array(cur["t"]), 24.0, 1.0)
    assert (np.abs(np.array(cur["phi"]) - theory) <= 4 * np.array(cur["se"]) + 0.02).all()
    measured = R.speciation_from_cloning(cur["t"], cur["phi"], low=0.5, high=1.0)["t_S"]
    exact = R.speciation_from_cloning(cur["t"], theory, low=0.5, high=1.0)["t_S"]
    assert abs(measured - t_S) < T_S_TOLERANCE
    assert abs(exact - t_S) < 0.1 and abs(measured - exact) < 0.12


def test_cloning_window_offsets():
    assert R.cloning_window_offset(0.5) == pytest.approx(0.0808, abs=2e-3)  # φ = ¾ at λ ≈ 0.85
    assert 1.0 < R.cloning_window_offset(0.1) < 1.2
    assert R.cloning_window_offset(0.9) < 0


def test_collapse_time_formula():
    f = R.collapse_time_formula
    ns = [2, 5, 10, 100, 1e4, 1e8]
    tc = [f(n, 64, 1.0) for n in ns]
    assert all(a > b > 0 for a, b in zip(tc, tc[1:]))  # more data: later collapse (smaller t_C)
    assert f(1, 64, 1.0) == math.inf and f(1 + 1e-9, 64, 1.0) > 10  # one point: collapsed at every time
    assert f(1e12, 10, 1.0) < 0.01  # n → ∞ at fixed d: no collapse
    assert f(100, 16, 1.0) < f(100, 64, 1.0) < f(100, 256, 1.0)  # curse of dimensionality
    assert f(100, 64, 0.5) < f(100, 64, 2.0)
    for n, d, s2 in [(100, 64, 1.0), (50, 16, 0.3)]:  # it is the zero of the Gaussian excess entropy
        assert abs(R.excess_entropy_gaussian(f(n, d, s2), n, d, s2)) < 1e-12


def test_excess_entropy_of_gaussian_data():
    """Sign convention f^e = s^sep − s: → (log n)/d (≈ 0, positive) at large t, negative at small t, zero at
    t_C; for Gaussian data the Monte Carlo zero agrees with the large-d formula."""
    n, d = 300, 64
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ts = np.linspace(0.05, 4.0, 40)
    fe = R.excess_entropy(x, ts, queries=300)
    assert 0 < fe[-1] < 2 * math.log(n) / d and fe[-1] == pytest.approx(math.log(n) / d, abs=0.01)
    assert fe[0] < -1
    assert abs(R.zero_crossing(ts, fe) - R.collapse_time_formula(n, d, 1.0)) < 0.15
    tiny = R.excess_entropy(x[:2], ts, queries=200)  # two points: finite, collapses late
    assert tiny[-1] == pytest.approx(math.log(2) / d, abs=0.01) and R.zero_crossing(ts, tiny) > 1


def test_zero_crossing():
    t = np.linspace(0, 1, 11)
    assert R.zero_crossing(t, t - 0.35) == pytest.approx(0.35)
    assert R.zero_crossing(t, -np.ones(11)) == math.inf
    assert math.isnan(R.zero_crossing(t, np.ones(11)))


def test_collapse_curve_separates_empirical_from_population_score():
    """The empirical score (a mixture of the n training points with σ² → 0) pulls every probe onto a training
    point (copy share ≈ 1 at all t); the population score returns a lightly noised probe to itself (≈ 0)."""
    d, n = 16, 20
    g = torch.Generator().manual_seed(0)
    train, probes, refs = (torch.randn(k, d, generator=g) for k in (n, 30, n))
    s = make_schedule("linear", 1000)
    steps = R.ou_grid_steps(s, 4, 0.05, 3.0)
    empirical = _as_network(R.GaussianMixtureDenoiser(train, 1e-8, s), "v")
    lab = lambda k, c: torch.full((k,), c)  # noqa: E731 — one class; the null label runs the whole mixture
    emp = R.collapse_curve(empirical, probes, lab(30, n), steps, train, lab(n, n), refs, lab(n, n), sampler_steps=30)
    assert min(emp["copy_share"]) > 0.9
    population = _as_network(R.GaussianMixtureDenoiser(torch.zeros(1, d), 1.0, s), "v")
    pop = R.collapse_curve(population, probes, lab(30, 1), steps, train, lab(n, 1), refs, lab(n, 1), sampler_steps=30)
    assert pop["copy_share"][0] < 0.1 and max(pop["copy_share"]) < 0.2


def test_speciation_time_from_spectrum():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(2).repeat(500)
    x = torch.randn(1000, 10, generator=g, dtype=torch.float64) * 0.5
    x[:, 0] += torch.where(y == 0, 3.0, -3.0)
    sp = R.speciation_time(x, y)
    assert sp.Lambda == pytest.approx(9.25, rel=0.05)  # 3² + 0.5²
    assert sp.Lambda_between == pytest.approx(9.0, rel=0.05)
    assert sp.t_S == pytest.approx(0.5 * math.log(sp.Lambda))
    assert sp.Lambda_within["0"] == pytest.approx(0.25, rel=0.3)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_speciation_timesteps(name):
    s = make_schedule(name, 1000)
    t_S = 1.2
    for k in (3, 5, 10, 20):
        ts = R.speciation_timesteps(s, k, t_S, width=0.5)
        assert len(ts) == k == len(set(ts)) and ts == sorted(ts, reverse=True) and ts[0] == 999
        ou = s.ou_time(torch.tensor(ts)).numpy()
        assert ((ou > t_S - 0.5 - 0.01) & (ou < t_S + 0.5 + 0.01)).sum() >= round(0.5 * k)
        grids = R.placement_timesteps(s, k, t_S)
        assert set(grids) == {"leading", "trailing", "ou-uniform", "around-t_S"}
        assert all(g == sorted(set(g), reverse=True) for g in grids.values())


def test_promise_table():
    """Phase-I ε grows as S falls (μ_S = 2R√ᾱ_S/√(1−ᾱ_S) grows with ᾱ_S), and the recommendation is the
    smallest S above the speciation window whose Phase I spends ≤ the stated share of ε."""
    from pfdiff.config import load_config

    p = load_config("dp", ["privacy.mechanism=dp-promise"]).privacy
    s = make_schedule("linear", 1000)
    cands = (200, 600, 800, 900, 950, 990)
    out = R.promise_S_table(p, 192, s, cands, t_S_upper=2.5, eps_share=0.1, calibrate=False)
    rows = out["rows"]
    assert [r["S"] for r in rows] == sorted(cands)
    assert rows[0]["phase1_epsilon"] == math.inf  # σ < 0.1: not accounted, far over any budget
    eps1 = [r["phase1_epsilon"] for r in rows]
    assert all(a > b for a, b in zip(eps1, eps1[1:]))
    assert all(r["label_free_ok"] == (r["ou_t"] >= 2.5) for r in rows)
    ok = [r["S"] for r in rows if r["label_free_ok"] and r["phase1_epsilon"] <= 0.1 * p.target_epsilon]
    assert out["recommended_S"] == min(ok) and out["binding_constraint"] == "privacy"
    assert out["smallest_label_free_S"] == 800 < out["recommended_S"]


def test_cli_rejects_unknown_analysis(tmp_path):
    from typer.testing import CliRunner

    from pfdiff.cli import app

    res = CliRunner().invoke(app, ["regimes", "--what", "bogus", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "unknown analyses" in res.output


def test_cli_validates_the_regimes_section_before_writing(tmp_path):
    from typer.testing import CliRunner

    from pfdiff.cli import app
    from pfdiff.config import load_config

    assert load_config(None, ["regimes.grid_points=8"]).regimes.grid_points == 8
    res = CliRunner().invoke(app, ["regimes", "--set", "regimes.grid_pointz=8", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "grid_pointz" in res.output and not (tmp_path / "r").exists()
