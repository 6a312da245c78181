"""Image-space DPDM reference: U-Net shapes and Opacus validity, DP-SGD steps under vmap, the high-noise
t distribution, feature FID and CAS, and a tiny end-to-end run_dpdm."""

import json
import math

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator

from pfdiff.diffusion import make_schedule
from pfdiff.evaluation.fid import frechet_distance
from pfdiff.imagespace.dpdm import (DPDMConfig, HighNoiseDiffusionLoss, ImageClassifier, cas_accuracy, feature_fid,
                                    make_engine, make_loss, run_dpdm, sample_balanced, train_denoiser)
from pfdiff.models.unet import UNet
from pfdiff.privacy.noise import NoiseSource

SCHEDULE = make_schedule("cosine", 1000)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convs: one intra-op thread is faster, and much faster on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
TINY = DPDMConfig(base_channels=8, channel_mults=(1, 2), steps=2, batch_size=8, noise_multiplicity=2,
                  max_physical_batch_size=8, sampler_steps=2, n_per_class=2, clf_steps=3, clf_batch_size=8,
                  clf_width=8, clf_feature_dim=8, tune_allocator=False, noise_multiplier=1.0)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [8, 28])
def test_unet_shapes_and_opacus_valid(channels, size):
    torch.manual_seed(0)
    model = UNet(channels, num_classes=10, base_channels=8, channel_mults=(1, 2, 2))
    ModuleValidator.validate(model, strict=True)  # GroupNorm only
    x = torch.randn(3, channels, size, size)
    out = model(x, torch.tensor([0, 500, 999]), torch.tensor([0, 9, 10]))  # 10 = the null label
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def _images(n=16, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.arange(n) % classes


def test_unet_under_dpsgd_two_steps_finite_loss():
    x, y = _images()
    loss_fn = make_loss(TINY, SCHEDULE, num_classes=3)
    torch.manual_seed(0)
    model = UNet(1, 3, base_channels=8, channel_mults=(1, 2))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    engine = make_engine(model, opt, sigma=1.0, dataset_size=len(x), sample_rate=0.5, cfg=TINY,
                         noise=NoiseSource(reproducible=True, seed=0))

    def per_example_loss(m, xb, yb):
        return loss_fn(m, xb, yb, noise_multiplicity=2).loss

    for step in range(2):
        torch.manual_seed(step)
        stats = engine.step(per_example_loss, (x, y), step)
        assert math.isfinite(stats["batch_size"])
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    loss = loss_fn(model, x, y, noise_multiplicity=2, generator=torch.Generator().manual_seed(1)).loss
    assert loss.shape == (len(x),) and torch.isfinite(loss).all()


def test_train_denoiser_private_and_not_and_sampling():
    x, y = _images()
    cfg = TINY.model_copy(update={"noise_multiplier": None})  # σ calibrated by PLD to ε = 10 (q = 0.5, 2 steps)
    for eps in (10.0, None):
        model, info = train_denoiser(x, y, 3, eps, cfg, seed=0)
        assert info["private"] == (eps is not None)
        if eps is not None:
            assert info["sigma"] > 0 and info["epsilon"] <= eps + 1e-6
        xs, ys = sample_balanced(model, 3, 2, (1, 8, 8), TINY, seed=0)
        assert xs.shape == (6, 1, 8, 8) and ys.tolist() == [0, 0, 1, 1, 2, 2]
        assert torch.isfinite(xs).all() and xs.abs().max() <= 1


def test_high_noise_t_distribution_mean_above_half():
    T = SCHEDULE.T
    loss = HighNoiseDiffusionLoss(SCHEDULE, prediction="v")  # defaults: log-normal, p_mean 0.5, p_std 1.2
    p = loss.t_probabilities()
    assert p.sum().item() == pytest.approx(1.0)
    mean_exact = (p * torch.arange(T)).sum().item()
    t = loss.sample_t(50_000, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() < T
    assert mean_exact > T / 2 and t.float().mean().item() > T / 2
    assert t.float().mean().item() == pytest.approx(mean_exact, rel=0.02)
    uniform = HighNoiseDiffusionLoss(SCHEDULE, t_distribution="uniform")
    assert (uniform.t_probabilities() * torch.arange(T)).sum().item() == pytest.approx((T - 1) / 2)
    # the draws are independent per example under vmap (DPSGD's per-example path)
    draws = torch.func.vmap(lambda _: loss.sample_t(4), randomness="different")(torch.zeros(8))
    assert draws.shape == (8, 4) and len(set(map(tuple, draws.tolist()))) > 1
    with pytest.raises(ValueError):
        HighNoiseDiffusionLoss(SCHEDULE, t_distribution="beta")


def test_feature_fid_zero_with_itself_positive_when_shifted():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(200, 8))
    assert frechet_distance(f, f) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(f, f + 1.0) == pytest.approx(8.0, rel=1e-3)  # ‖Δμ‖² = 8
    torch.manual_seed(0)
    extractor = ImageClassifier((1, 8, 8), 3, feature_dim=8, width=8).eval()
    x, _ = _images(64)
    assert feature_fid(extractor, x, x) == pytest.approx(0.0, abs=1e-4)
    assert feature_fid(extractor, x, (x + 0.8).clamp(-1, 1)) > 1e-3


def test_cas_on_tiny_run_is_an_accuracy():
    x, y = _images(24)
    xt, yt = _images(12, seed=1)
    acc = cas_accuracy(x, y, xt, yt, 3, steps=3, batch_size=8, feature_dim=8, width=8)
    assert 0.0 <= acc <= 1.0


def test_run_dpdm_tiny_end_to_end(tmp_path):
    res = run_dpdm(tmp_path, epsilons=(10.0, None), seed=0, config=TINY)
    saved = json.loads((tmp_path / "dpdm_results.json").read_text())
    assert [m["tag"] for m in saved["models"]] == ["eps10", "nonprivate"] == [m["tag"] for m in res["models"]]
    for m in saved["models"]:
        assert (tmp_path / m["grid"]).stat().st_size > 0
        assert 0 <= m["cas"] <= 1 and math.isfinite(m["fid"])
        assert m["steps"] == 2 and m["noise_multiplicity"] == 2
        assert {"loss", "secmi", "pia"} <= set(m["attacks"]) and 0 <= m["attacks"]["loss"]["auc"] <= 1
    assert saved["models"][0]["sigma"] == 1.0 and saved["models"][0]["epsilon"] > 0  # σ fixed by the config
    assert saved["models"][1]["epsilon"] is None and saved["models"][1]["sigma"] == 0.0
    # utility on held-out images only; the releases of one data set compose
    assert saved["data"]["n_evaluator_fit"] + saved["data"]["n_reference"] == saved["data"]["n_test"]
    assert "train_counts" not in saved["data"] and "cas_real_heldout" in saved["evaluator"]
    assert saved["composed_epsilon"]["pld"] == pytest.approx(saved["models"][0]["epsilon"], rel=1e-3)
    assert "OS entropy" in saved["noise"]


def test_dpdm_releases_at_two_epsilons_compose():
    from pfdiff.imagespace.dpdm import composed_epsilon
    from pfdiff.privacy.accounting import GaussianEvent, epsilon
    models = [{"private": True, "sigma": s, "sample_rate": 0.2, "steps": 50, "tag": f"m{i}"} for i, s in enumerate((3.0, 1.0))]
    both = composed_epsilon([*models, {"private": False}], 1e-5)["pld"]
    alone = [epsilon([GaussianEvent(m["sigma"], 0.2, 50)], 1e-5) for m in models]
    assert both > max(alone) and both == pytest.approx(epsilon([GaussianEvent(3.0, 0.2, 50), GaussianEvent(1.0, 0.2, 50)], 1e-5))


def test_frechet_trace_term_matches_the_matrix_square_root():
    """tr((Σ_a Σ_b)^½) from eigenvalues equals the trace of scipy's matrix square root (real part), and the
    closed form for commuting (diagonal) covariances."""
    from scipy import linalg

    from pfdiff.evaluation.fid import trace_sqrt_product

    rng = np.random.default_rng(0)
    for d in (2, 8, 32):
        xa, xb = rng.standard_normal((3 * d, d)), rng.standard_normal((3 * d, d)) @ rng.standard_normal((d, d))
        ca, cb = np.cov(xa, rowvar=False), np.cov(xb, rowvar=False)
        ref = np.trace(linalg.sqrtm(ca @ cb)).real
        assert trace_sqrt_product(ca, cb) == pytest.approx(ref, rel=1e-6)
    assert trace_sqrt_product(np.diag([4.0, 1.0]), np.diag([9.0, 16.0])) == pytest.approx(6.0 + 4.0)
    # rank-deficient covariances (fewer samples than dimensions) stay finite and non-negative
    few = rng.standard_normal((3, 16))
    assert trace_sqrt_product(np.cov(few, rowvar=False), np.cov(few + 1, rowvar=False)) >= 0


def test_cli_takes_config_and_set_and_saves_config(tmp_path):
    """`pfdiff dpdm --set dpdm.…` drives DPDM from the one config and saves the resolved config.yaml."""
    import yaml
    from typer.testing import CliRunner

    from pfdiff.cli import app

    tiny = [f"dpdm.{k}={v}" for k, v in TINY.model_dump(mode="json").items()
            if k not in ("epsilons", "extra") and v != DPDMConfig().model_dump(mode="json")[k]]
    args = ["dpdm", "--out", str(tmp_path / "d"), "--epsilon", "inf", "--steps", "2"]
    for t in tiny:
        args += ["--set", t.replace("(", "[").replace(")", "]")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    saved = yaml.safe_load((tmp_path / "d" / "config.yaml").read_text())["dpdm"]
    assert saved["epsilons"] == [None] and saved["steps"] == 2 and saved["base_channels"] == 8
    assert (tmp_path / "d" / "dpdm_results.json").exists()
    bad = CliRunner().invoke(app, ["dpdm", "--out", str(tmp_path / "e"), "--set", "dpdm.stepz=3"])
    assert bad.exit_code == 2 and not (tmp_path / "e").exists()  # refused before anything is written


def test_dpdm_models_are_built_on_their_datas_device(monkeypatch):
    """device: the DPDM reference builds every model where its data are (here the "meta" device stands in for a
    GPU: shapes and placement only, no numbers)."""
    from pfdiff.imagespace import dpdm as D

    x = torch.zeros(4, 1, 8, 8, device="meta")
    unet = D.make_unet(TINY, (1, 8, 8), 3, 0).to(x.device)
    assert next(unet.parameters()).device.type == "meta"
    splits = D.ImageSplits(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), torch.zeros(2, 1, 8, 8),
                           torch.zeros(2, dtype=torch.long), 3, "t").to(torch.device("meta"))
    assert {t.device.type for t in (splits.x_train, splits.y_train, splits.x_test, splits.y_test)} == {"meta"}
    assert TINY.device == "auto"
