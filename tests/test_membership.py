"""`pfdiff attack`: members / non-members of a run's denoisers, the attack results and the report section."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pfdiff.cli import app
from pfdiff.config import load_config
from pfdiff.data import load_dataset
from pfdiff.longtail.common import make_split
from pfdiff.evaluation.mia import balanced_pairs
from pfdiff.longtail.membership import load_targets
from pfdiff.longtail.pipeline import run_experiment
from pfdiff.longtail.private import public_private_split
from pfdiff.runs import RunDir

TINY = ["stage1.epochs=3", "diffusion.steps=60", "diffusion.T=100", "diffusion.sample_steps=5",
        "pseudo.finetune_epochs=2", "model.denoiser_hidden=32", "model.width=8", "seeds=[0]"]


def test_heldout_pool_is_what_the_long_tailed_subset_left_out():
    cfg = load_config(None, [])
    split = make_split(cfg)
    n = len(load_dataset("digits", None).y)
    assert len(split.train.y) + len(split.heldout.y) + len(split.test.y) == n
    # every class has non-members, and the tail has many more of them than members
    held = np.bincount(split.heldout.y, minlength=10)
    assert held.min() > 0 and held[-1] > split.counts[-1]


def test_balanced_pairs_match_per_class_and_are_seeded():
    y_mem, y_non = np.array([0] * 10 + [1] * 2), np.array([0] * 3 + [1] * 7)
    mem, non = balanced_pairs(y_mem, y_non, 2, seed=0)
    assert np.bincount(y_mem[mem]).tolist() == np.bincount(y_non[non]).tolist() == [3, 2]
    assert balanced_pairs(y_mem, y_non, 2, seed=0)[0].tolist() == mem.tolist()
    assert balanced_pairs(y_mem, y_non, 2, seed=1)[0].tolist() != mem.tolist()


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    cfg = load_config("dp", TINY + ["methods=[ldmlr,dp-ldmlr]", "privacy.steps=6", "privacy.target_epsilon=3",
                                    "privacy.expected_batch_size=32", "name=attacked"])
    run = RunDir.create(cfg, tmp_path_factory.mktemp("runs"))
    run_experiment(cfg, run)
    return run, cfg


def test_dp_target_members_are_private_examples_only(dp_run):
    run, cfg = dp_run
    targets = {t.name: t for t in load_targets(run.path, 0)}
    assert set(targets) == {"ldmlr", "dp-ldmlr"}
    split = make_split(cfg)
    _, priv = public_private_split(split.train.y, 10, cfg.privacy.public_fraction, cfg.data.split_seed)
    dp = targets["dp-ldmlr"]
    assert len(dp.members[1]) <= len(priv) < len(targets["ldmlr"].members[1]) + len(priv)
    assert torch.equal(torch.bincount(dp.members[1], minlength=10), torch.bincount(dp.nonmembers[1], minlength=10))
    # DP features are clipped to the radius the DP training used
    assert dp.members[0].norm(dim=1).max() <= cfg.privacy.feature_radius + 1e-4


def test_cli_attack_writes_results_plot_and_report(dp_run):
    run, _ = dp_run
    out = CliRunner().invoke(app, ["attack", str(run.path)])
    assert out.exit_code == 0, out.output
    att = json.loads((run.path / "attack.json").read_text())
    for target in ("ldmlr", "dp-ldmlr"):
        res = att["seeds"]["0"][target]
        for a in ("loss", "secmi", "pia"):
            assert 0.0 <= res[a]["auc"] <= 1.0 and res[a]["n_members"] == res["n_members"]
        assert res["copying"]["n_pseudo"] > 0
    assert (run.plots / "roc.png").stat().st_size > 1000
    report = (run.path / "report.md").read_text()
    assert "## Membership inference" in report and "| 0 | dp-ldmlr | loss |" in report


def test_cli_attack_refuses_a_run_without_denoisers(tmp_path):
    cfg = load_config(None, TINY + ["methods=[ce]", "name=nodenoiser"])
    run = RunDir.create(cfg, tmp_path)
    run_experiment(cfg, run)
    out = CliRunner().invoke(app, ["attack", str(run.path)])
    assert out.exit_code == 2 and "no trained denoiser" in out.output


def test_lira_with_shadow_models_on_the_non_private_denoiser(dp_run):
    run, _ = dp_run
    out = CliRunner().invoke(app, ["attack", str(run.path), "--attack", "loss", "--lira", "2"])
    assert out.exit_code == 0, out.output
    res = json.loads((run.path / "attack.json").read_text())["seeds"]["0"]
    assert res["ldmlr"]["lira"]["shadows"] == 2 and 0.0 <= res["ldmlr"]["lira"]["auc"] <= 1.0
    assert "lira" not in res["dp-ldmlr"]  # shadows mimic the non-private training only
    assert "| 0 | ldmlr | lira |" in (run.path / "report.md").read_text()
