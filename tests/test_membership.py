"""`pfdiff attack`: members / non-members of a run's denoisers, their controls, LiRA shadows that mimic the
target's training counts, the attack results and the report sections."""

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
from pfdiff.longtail.membership import candidate_pools, load_targets, shadow_split
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


def test_nonmember_candidates_give_the_head_class_nonmembers_and_leave_a_reserve():
    cfg = load_config(None, [])
    split = make_split(cfg)
    cand, reserve = candidate_pools(split, 0)
    test_c = np.bincount(split.test.y, minlength=10)
    held_c = np.bincount(split.heldout.y, minlength=10)
    assert (np.bincount(cand.y, minlength=10) == held_c + (test_c + 1) // 2).all()
    assert (np.bincount(reserve.y, minlength=10) == test_c // 2).all()
    assert ((test_c + 1) // 2 >= 10).all()  # every class, the head above all, gains at least 10 candidates
    # the two halves of the test split are disjoint and together are the whole test split
    rows = {r.tobytes() for r in split.test.x}
    got = [r.tobytes() for r in np.concatenate([cand.x[len(split.heldout.y):], reserve.x])]
    assert len(got) == len(set(got)) == len(rows) and set(got) == rows


def test_balanced_pairs_match_per_class_and_are_seeded():
    y_mem, y_non = np.array([0] * 10 + [1] * 2), np.array([0] * 3 + [1] * 7)
    mem, non = balanced_pairs(y_mem, y_non, 2, seed=0)
    assert np.bincount(y_mem[mem]).tolist() == np.bincount(y_non[non]).tolist() == [3, 2]
    assert balanced_pairs(y_mem, y_non, 2, seed=0)[0].tolist() == mem.tolist()
    assert balanced_pairs(y_mem, y_non, 2, seed=1)[0].tolist() != mem.tolist()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is fastest and leaves the shared cores to others."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """A non-private LDMLR run: its encoder is trained on every training example, the members included."""
    cfg = load_config(None, TINY + ["methods=[ldmlr]", "name=plain"])
    run = RunDir.create(cfg, tmp_path_factory.mktemp("runs"))
    run_experiment(cfg, run)
    return run, cfg


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
    assert len(dp.members[1]) <= len(priv)
    assert torch.equal(torch.bincount(dp.members[1], minlength=10), torch.bincount(dp.nonmembers[1], minlength=10))
    # DP features are clipped to the radius the DP training used
    assert dp.members[0].norm(dim=1).max() <= cfg.privacy.feature_radius + 1e-4


def test_private_run_attacks_both_denoisers_on_the_same_unseen_members(dp_run):
    """ε = ∞ vs DP on the same member population: the private part, which the public encoder never saw."""
    run, cfg = dp_run
    targets = {t.name: t for t in load_targets(run.path, 0)}
    split = make_split(cfg)
    _, priv = public_private_split(split.train.y, 10, cfg.privacy.public_fraction, cfg.data.split_seed)
    cand, reserve = candidate_pools(split, 0)
    mem, non = balanced_pairs(split.train.y[priv], cand.y, 10, 0)
    for t in targets.values():
        assert t.members[1].tolist() == split.train.y[priv][mem].tolist()
        assert t.nonmembers[1].tolist() == cand.y[non].tolist()
        assert t.setup["members_seen_by_encoder"] is False and t.setup["encoder_saw"] == "the public part only"
        assert set(t.groups) == {"many", "medium", "few"} and set(t.upstream) == {"feature_norm", "stage1_loss"}


def _disjoint(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.cdist(a.double(), b.double()).min() > 1e-6)


def test_controls_saw_neither_the_members_nor_the_nonmembers(dp_run, plain_run):
    run, cfg = dp_run
    split = make_split(cfg)
    pub, _ = public_private_split(split.train.y, 10, cfg.privacy.public_fraction, cfg.data.split_seed)
    for t in load_targets(run.path, 0):
        u, y = t.control.data
        assert _disjoint(u, t.members[0]) and _disjoint(u, t.nonmembers[0]), t.name
        assert t.control.counts == np.bincount(split.train.y[pub], minlength=10).tolist()  # the public part
    assert "warm start" in {t.name: t for t in load_targets(run.path, 0)}["dp-ldmlr"].control.source
    run, cfg = plain_run
    (t,) = load_targets(run.path, 0)
    split = make_split(cfg)
    assert t.setup["members_seen_by_encoder"] is True  # the confound the control has to measure
    u, y = t.control.data
    assert _disjoint(u, t.members[0]) and _disjoint(u, t.nonmembers[0])
    assert _disjoint(t.population[0], t.members[0]) and _disjoint(t.population[0], t.nonmembers[0])  # LiRA's
    counts = np.bincount(y.numpy(), minlength=10)
    assert (counts <= split.counts).all() and counts[-1] == split.counts[-1]  # the target's counts where available
    assert "test split" in t.control.source


def test_shadow_split_mimics_the_targets_class_counts():
    y_attack = np.array([0] * 4 + [1] * 4 + [2] * 3)
    y_pop = np.array([0] * 20 + [1] * 2 + [2] * 5)
    counts = np.array([10, 5, 2])
    rng = np.random.default_rng(0)
    inside_share = np.zeros(len(y_attack))
    for _ in range(400):
        inside, fill, short = shadow_split(y_attack, y_pop, counts, rng)
        got = np.bincount(y_attack[inside], minlength=3) + np.bincount(y_pop[fill], minlength=3)
        assert got.tolist() == [10, 4, 2] and short.tolist() == [0, 1, 0]  # class 1: the population lacks one
        assert len(set(fill.tolist())) == len(fill)
        inside_share += inside
    inside_share /= 400
    assert np.abs(inside_share[:8] - 0.5).max() < 0.1  # every attack example is in about half of the shadows
    assert np.abs(inside_share[8:] - 0.5).max() < 0.1  # odd class: a random extra one half of the time


def test_cli_attack_writes_results_plot_and_report(dp_run):
    run, _ = dp_run
    out = CliRunner().invoke(app, ["attack", str(run.path)])
    assert out.exit_code == 0, out.output
    att = json.loads((run.path / "attack.json").read_text())
    for target in ("ldmlr", "dp-ldmlr"):
        res = att["seeds"]["0"][target]
        ctrl = res["control"]
        assert "public part" in ctrl["trained_on"] and sum(ctrl["train_counts"]) > 0
        for a in ("loss", "secmi", "pia"):
            assert 0.0 <= res[a]["auc"] <= 1.0 and res[a]["n_members"] == res["n_members"]
            assert 0.0 <= ctrl[a]["auc"] <= 1.0 and ctrl[a]["n_members"] == res["n_members"]
            assert set(res[a]["per_group"]) == set(ctrl[a]["per_group"]) == {"many", "medium", "few"}
            assert sum(g["n_members"] for g in res[a]["per_group"].values()) == res["n_members"]
        assert res["copying"]["n_pseudo"] > 0 and ctrl["copying"]["n_pseudo"] > 0
        assert 0.0 <= res["upstream"]["stage1_loss"]["auc"] <= 1.0
    assert (run.plots / "roc.png").stat().st_size > 1000
    report = (run.path / "report.md").read_text()
    assert "## Membership inference" in report and "| 0 | dp-ldmlr | loss |" in report
    assert "control AUC" in report  # the control beside every attack in the run's own report too
    assert set(att["seeds"]["0"]) == {"ldmlr", "dp-ldmlr"}  # the keys stay the released models
    md = (run.path / "attack.md").read_text()
    assert "control AUC" in md and "| 0 | ldmlr | loss | few |" in md and "feature-norm AUC" in md


def test_cli_attack_on_a_non_private_run_names_the_encoder_confound(plain_run):
    run, _ = plain_run
    out = CliRunner().invoke(app, ["attack", str(run.path), "--attack", "loss"])
    assert out.exit_code == 0, out.output
    res = json.loads((run.path / "attack.json").read_text())["seeds"]["0"]
    assert res["ldmlr"]["setup"]["members_seen_by_encoder"] is True
    assert "test split" in res["ldmlr"]["control"]["trained_on"]
    assert "every training example (the members included)" in (run.path / "attack.md").read_text()


def test_cli_attack_refuses_a_run_whose_split_no_longer_matches(dp_run, tmp_path):
    """If the data code changed since training, the recomputed 'members' are not the training set: refuse."""
    import shutil

    run, _ = dp_run
    copy = tmp_path / "moved"
    shutil.copytree(run.path, copy)
    split = json.loads((copy / "split.json").read_text())
    (copy / "split.json").write_text(json.dumps({**split, "train_size": split["train_size"] + 1}))
    out = CliRunner().invoke(app, ["attack", str(copy)])
    assert out.exit_code == 2 and "data code changed" in out.output


def test_cli_attack_refuses_a_run_without_denoisers(tmp_path):
    cfg = load_config(None, TINY + ["methods=[ce]", "name=nodenoiser"])
    run = RunDir.create(cfg, tmp_path)
    run_experiment(cfg, run)
    out = CliRunner().invoke(app, ["attack", str(run.path)])
    assert out.exit_code == 2 and "no trained denoiser" in out.output


def test_lira_with_shadow_models_on_the_non_private_denoiser(dp_run):
    run, cfg = dp_run
    out = CliRunner().invoke(app, ["attack", str(run.path), "--attack", "loss", "--lira", "2"])
    assert out.exit_code == 0, out.output
    res = json.loads((run.path / "attack.json").read_text())["seeds"]["0"]
    lira = res["ldmlr"]["lira"]
    assert lira["shadows"] == 2 and 0.0 <= lira["auc"] <= 1.0 and 0.0 <= lira["control"]["auc"] <= 1.0
    assert lira["shadow_counts"] == make_split(cfg).counts.tolist()  # the target's long-tailed training counts
    assert lira["shadow_shortfall"] == [0] * 10 and set(lira["per_group"]) == {"many", "medium", "few"}
    assert "lira" not in res["dp-ldmlr"]  # shadows mimic the non-private training only
    assert "| 0 | ldmlr | lira |" in (run.path / "report.md").read_text()
    assert "| 0 | ldmlr | lira |" in (run.path / "attack.md").read_text()
