"""LDMLR's stage 3 as its authors run it: proportional pseudo counts and the real prior for LSC."""

from __future__ import annotations

import numpy as np

from pfdiff.config import PseudoConfig
from pfdiff.longtail.ldmlr import pseudo_counts, stage3_prior


def test_proportional_fill_keeps_the_imbalance_with_a_floor():
    counts = np.array([500, 120, 40, 12, 5, 0])
    p = PseudoConfig(fill="proportional")  # max(round(0.2·n_c), 5), nothing for an absent class
    assert pseudo_counts(counts, p).tolist() == [100, 24, 8, 5, 5, 0]
    assert pseudo_counts(counts, PseudoConfig(fill="max")).tolist() == [0, 380, 460, 488, 495, 500]


def test_lsc_divides_by_the_real_prior_only_for_proportional_fill():
    counts, gen = np.array([100, 10]), np.array([20, 5])
    assert stage3_prior(counts, gen, PseudoConfig(fill="proportional")).tolist() == [100, 10]
    flat = stage3_prior(counts, np.array([0, 90]), PseudoConfig(fill="max", pseudo_weight=1.0))
    assert flat.tolist() == [100, 100]  # fill-to-max: the effective prior is flat, +la is then a no-op at τ = 1


def test_logit_adjustment_survives_a_class_without_training_examples():
    import torch

    from pfdiff.longtail.baselines import logit_adjusted
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    adjusted = logit_adjusted(logits, [50, 10, 0], tau=1.0)  # the absent class counts as one example
    expected = logits - torch.log(torch.tensor([50.0, 10.0, 1.0]) / 61.0)
    assert torch.isfinite(adjusted).all() and torch.allclose(adjusted, expected)


def test_ldmlr_paper_runs_beside_fill_to_max_on_the_same_denoiser(tmp_path):
    from test_pipeline import TINY

    from pfdiff.config import load_config
    from pfdiff.longtail.pipeline import run_experiment
    from pfdiff.runs import RunDir

    cfg = load_config(None, TINY + ["methods=[ldmlr,ldmlr-paper,ldmlr-paper+la]"])
    run = RunDir.create(cfg, tmp_path)
    results = run_experiment(cfg, run)
    diag = results["per_seed"][0]["diagnostics"]
    counts = np.asarray(results["split"]["train_counts"])
    assert diag["ldmlr-paper"]["generated_per_class"] == np.maximum(np.round(0.2 * counts), 5).astype(int).tolist()
    assert diag["ldmlr"]["generated_per_class"] == (counts.max() - counts).tolist()
    assert set(results["methods"]) == {"ldmlr", "ldmlr-paper", "ldmlr-paper+la"}
    assert len(list((run.checkpoints / "seed0").glob("stage2*.safetensors"))) == 1  # one denoiser for both


def test_chunked_sampling_gives_the_same_pseudo_features():
    """diffusion.sample_batch bounds the rows per sampler call; with DDIM η = 0 the chunks reproduce the
    one-call samples (the initial noise of all rows is drawn first), labels in the same order."""
    import torch

    from pfdiff.config import DiffusionConfig
    from pfdiff.diffusion import make_schedule
    from pfdiff.longtail.ldmlr import sample_features
    from pfdiff.models import FeatureDenoiser

    torch.manual_seed(0)
    net = FeatureDenoiser(6, 3, hidden=32, depth=1).eval()
    schedule, per_class = make_schedule("linear", 100), np.array([5, 0, 9])
    whole = sample_features(net, schedule, per_class, DiffusionConfig(T=100, sample_steps=8), 3, torch.device("cpu"))
    parts = sample_features(net, schedule, per_class, DiffusionConfig(T=100, sample_steps=8, sample_batch=4), 3,
                            torch.device("cpu"))
    assert torch.equal(whole[1], parts[1]) and whole[0].shape == (14, 6)
    torch.testing.assert_close(parts[0], whole[0], atol=1e-5, rtol=1e-5)
    stochastic = DiffusionConfig(T=100, sample_steps=8, sample_batch=4, eta=1.0)
    assert not torch.equal(sample_features(net, schedule, per_class, stochastic, 3, torch.device("cpu"))[0], parts[0])
