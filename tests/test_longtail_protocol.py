"""The long-tail protocol (validation split, sealed test set, split seeds × seeds) and stage 1 of the field
(losses, optimiser schedule, augmentation, the BASE@LOSS grammar). Fast: synthetic feature data where a run
needs one, so the whole file stays within a few seconds."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pfdiff.config import ConfigError, OptimConfig, load_config
from pfdiff.longtail import baselines, pipeline
from pfdiff.longtail.common import (PrematureTestAccess, SealedDataset, augmentation_kind, augmenter, make_split,
                                    random_shift)
from pfdiff.longtail.losses import (Stage1Loss, balanced_softmax, effective_number_weights, ldam_loss, ldam_margins,
                                    log_prior, logit_adjusted_loss, stage1_loss)
from pfdiff.longtail.methods import parse_method
from pfdiff.longtail.pipeline import Fitted, SeedRun, prepare, run_experiment
from pfdiff.report import render_report
from pfdiff.runs import RunDir
from pfdiff.training import lr_factor, make_scheduler, train

C = 5


@pytest.fixture(scope="module")
def onehot_npz(tmp_path_factory):
    """Feature vectors x = one-hot(y) + small noise: an identity encoder and a linear G separate them exactly."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(C), 300)
    x = np.eye(C, dtype=np.float32)[y] + 0.05 * rng.standard_normal((len(y), C)).astype(np.float32)
    path = tmp_path_factory.mktemp("data") / "onehot.npz"
    np.savez(path, x=x, y=y)
    return path


def _cfg(path, *extra):
    return load_config(None, ["data.name=npz", f"data.path={path}", "data.imbalance_factor=100",
                              "data.val_per_class=20", "stage1.epochs=2", "pseudo.finetune_epochs=1",
                              "seeds=[0]", "threads=1", *extra])


# ---------------------------------------------------------------- stage-1 losses


def test_balanced_softmax_is_ce_on_logits_plus_log_prior():
    counts = torch.tensor([3.0, 1.0])
    logits, y = torch.zeros(1, 2), torch.tensor([1])
    assert balanced_softmax(logits, y, log_prior(counts)).item() == pytest.approx(-math.log(0.25))
    z = torch.randn(6, 2)
    yy = torch.randint(0, 2, (6,))
    assert torch.allclose(balanced_softmax(z, yy, log_prior(counts)),
                          F.cross_entropy(z + torch.log(counts / counts.sum()), yy, reduction="none"))
    # Balanced Softmax is the logit-adjusted loss at τ = 1
    assert torch.allclose(balanced_softmax(z, yy, log_prior(counts)), logit_adjusted_loss(z, yy, log_prior(counts), 1.0))


def test_logit_adjusted_loss_by_hand():
    # τ = 2: logits + 2·log π = (2 log .75, 2 log .25) → p(1) = .0625 / (.5625 + .0625) = 0.1
    loss = logit_adjusted_loss(torch.zeros(1, 2), torch.tensor([1]), log_prior(torch.tensor([3.0, 1.0])), tau=2.0)
    assert loss.item() == pytest.approx(-math.log(0.1), rel=1e-5)


def test_ldam_margins_and_loss_by_hand():
    m = ldam_margins(torch.tensor([16.0, 1.0]), max_margin=0.5)  # n^(-1/4) = (0.5, 1) → scaled to max 0.5
    assert m.tolist() == pytest.approx([0.25, 0.5])
    cos = torch.tensor([[0.2, 0.1]])
    # s·(cos − Δ_y·1_y) with y = 0: 30·(0.2 − 0.25, 0.1) = (−1.5, 3) → CE = log(1 + e^4.5)
    loss = ldam_loss(30 * cos, torch.tensor([0]), m, scale=30.0)
    assert loss.item() == pytest.approx(math.log1p(math.exp(4.5)), rel=1e-5)


def test_drw_switches_to_effective_number_weights():
    counts = torch.tensor([100.0, 10.0])
    w = effective_number_weights(counts, beta=0.9)
    raw = torch.tensor([0.1 / (1 - 0.9 ** 100), 0.1 / (1 - 0.9 ** 10)])
    assert torch.allclose(w, raw / raw.sum() * 2) and w.sum().item() == pytest.approx(2.0)
    o = OptimConfig(epochs=10, drw_start=0.8, drw_beta=0.9, ldam_scale=30.0)
    loss = stage1_loss("ldam-drw", counts, o, steps_per_epoch=3)
    assert loss.drw_step == 24  # epoch 8 of 10, 3 steps per epoch
    logits, y = 30 * torch.tanh(torch.randn(8, 2)), torch.tensor([0, 0, 0, 1, 1, 0, 1, 0])
    shifted = logits - 30 * F.one_hot(y, 2) * loss._margins[y][:, None]
    assert loss(logits, y, 23).item() == pytest.approx(F.cross_entropy(shifted, y).item(), rel=1e-5)
    assert loss(logits, y, 24).item() == pytest.approx(F.cross_entropy(shifted, y, weight=w).item(), rel=1e-5)
    ce = Stage1Loss("ce", counts)
    assert ce(logits, y, 0).item() == pytest.approx(F.cross_entropy(logits, y).item())
    with pytest.raises(ValueError, match="unknown stage-1 loss"):
        Stage1Loss("focal", counts)


# ---------------------------------------------------------------- schedule


def test_warmup_cosine_and_step_lr_values():
    assert [lr_factor(s, "cosine", 10, 2) for s in (0, 1, 2, 6)] == pytest.approx([0.5, 1.0, 1.0, 0.5])
    assert lr_factor(9, "cosine", 10, 2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert [lr_factor(s, "step", 10, 0, (5, 8), 0.1) for s in (4, 5, 7, 8)] == pytest.approx([1, 0.1, 0.1, 0.01])
    assert [lr_factor(s, "constant", 10, 4) for s in (0, 3, 4, 9)] == pytest.approx([0.25, 1, 1, 1])
    assert make_scheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), "constant", 10) is None
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_factor(0, "linear", 10)


def test_scheduler_runs_inside_train_and_resumes(tmp_path):
    def lrs(checkpoint, crash_at=None):
        net = nn.Linear(2, 1)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        sched = make_scheduler(opt, "cosine", 12, 3)
        seen = []

        def step_fn(step):
            if step == crash_at:
                raise KeyboardInterrupt
            seen.append(opt.param_groups[0]["lr"])
            return net(torch.ones(1, 2)).sum() ** 2, {}

        try:
            train({"net": net}, opt, step_fn, 12, description="t", checkpoint=checkpoint, checkpoint_every=4,
                  scheduler=sched)
        except KeyboardInterrupt:
            pass
        return seen

    expected = [0.1 * lr_factor(s, "cosine", 12, 3) for s in range(12)]
    assert lrs(None) == pytest.approx(expected)
    ck = tmp_path / "ck.safetensors"
    first = lrs(ck, crash_at=6)  # checkpoint at step 4, dies at 6
    assert first == pytest.approx(expected[:6])
    assert lrs(ck) == pytest.approx(expected[4:])  # resumed at step 4 with the schedule where it was


def test_stage1_scheduler_in_epochs():
    o = OptimConfig(epochs=10, lr=0.1, optimizer="sgd", nesterov=True, schedule="step", warmup_epochs=2,
                    step_milestones=[0.5, 0.8], step_gamma=0.01)
    opt = baselines.stage1_optimizer([nn.Parameter(torch.zeros(1))], o)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
    sched = baselines.stage1_scheduler(opt, o, steps_per_epoch=3)
    seen = []
    for _ in range(30):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(0.1 / 6) and seen[5] == pytest.approx(0.1) and seen[14] == pytest.approx(0.1)
    assert seen[15] == pytest.approx(1e-3) and seen[24] == pytest.approx(1e-5)  # epochs 5 and 8


# ---------------------------------------------------------------- augmentation


def test_augmentation_kinds_follow_the_input_shape():
    auto = OptimConfig(augment="auto")
    assert augmentation_kind(auto, (1, 8, 8)) == "none"  # digits stay as they are unless asked
    assert augmentation_kind(auto, (3, 32, 32)) == "crop-flip"
    assert augmentation_kind(auto, (1, 40)) == "shift" and augmentation_kind(auto, (64,)) == "none"
    assert augmentation_kind(OptimConfig(augment="crop-flip"), (1, 8, 8)) == "crop-flip"  # asked for
    with pytest.raises(ValueError, match="needs 1-D signals"):
        augmentation_kind(OptimConfig(augment="shift"), (3, 32, 32))
    with pytest.raises(ValueError, match="needs images"):
        augmentation_kind(OptimConfig(augment="crop"), (1, 40))
    assert augmenter(OptimConfig(), (3, 32, 32)) is None
    assert augmenter(OptimConfig(augment="shift", augment_pad=0), (1, 40)) is None
    x = torch.rand(64, 1, 4, 4)
    flip_only = augmenter(OptimConfig(augment="crop-flip", augment_pad=0), (1, 4, 4))(x, 0, 0)
    flipped = [torch.equal(a, b.flip(-1)) and not torch.equal(a, b) for a, b in zip(flip_only, x)]
    assert 10 < sum(flipped) < 54 and all(f or torch.equal(a, b) for f, a, b in zip(flipped, flip_only, x))


def test_crop_flip_shapes_content_and_seeded_determinism():
    x = torch.rand(16, 3, 16, 16)
    aug = augmenter(OptimConfig(augment="crop-flip", augment_pad=4), (3, 16, 16))
    out = aug(x, 0, 5)
    assert out.shape == x.shape and torch.equal(out, aug(x, 0, 5))
    assert not torch.equal(out, aug(x, 0, 6)) and not torch.equal(out, aug(x, 1, 5))
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(len(x)):  # every output is a 16×16 window of the padded image, mirrored or not
        windows = [padded[i, :, r:r + 16, c:c + 16] for r in range(9) for c in range(9)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)


def test_shift_for_signals_zero_and_circular():
    x = torch.arange(1, 11, dtype=torch.float32).repeat(6, 1)[:, None, :]  # [6, 1, 10]
    g = torch.Generator().manual_seed(0)
    s = torch.randint(-3, 4, (6,), generator=g)
    zero = random_shift(x, 3, torch.Generator().manual_seed(0), "zero")
    circ = random_shift(x, 3, torch.Generator().manual_seed(0), "circular")
    for i in range(6):
        k = int(s[i])
        assert torch.equal(circ[i, 0], torch.roll(x[i, 0], k))
        ref = torch.zeros(10)
        if k >= 0:
            ref[k:] = x[i, 0, :10 - k]
        else:
            ref[:10 + k] = x[i, 0, -k:]
        assert torch.equal(zero[i, 0], ref)
    aug = augmenter(OptimConfig(augment="auto"), (1, 10))
    assert aug(x, 0, 3).shape == x.shape and torch.equal(aug(x, 0, 3), aug(x, 0, 3))


# ---------------------------------------------------------------- grammar


@pytest.mark.parametrize("name, base, loss, adjust", [
    ("ce", "ce", "ce", False), ("logit_adjust", "ce", "ce", True), ("bsce", "ce", "bsce", False),
    ("bsce+la", "ce", "bsce", True), ("la-loss", "ce", "la-loss", False), ("ldam-drw", "ce", "ldam-drw", False),
    ("ce@bsce", "ce", "bsce", False), ("ldmlr@bsce", "ldmlr", "bsce", False),
    ("resample@ldam-drw", "resample", "ldam-drw", False), ("ldmlr-aid@la-loss+la", "ldmlr-aid", "la-loss", True),
    ("e2e-C-rad-aid+la", "e2e-C-rad-aid", "ce", True), ("dp-ldmlr@bsce", "dp-ldmlr", "bsce", False),
])
def test_method_grammar(name, base, loss, adjust):
    m = parse_method(name)
    assert (m.base, m.stage1, m.adjust) == (base, loss, adjust)
    assert m.spec == (base if loss == "ce" else f"{base}@{loss}")


@pytest.mark.parametrize("name, needle", [
    ("ldmlr@focal", "unknown stage-1 loss 'focal'"), ("ldmlr@", "needs a stage-1 loss"),
    ("ce+xx", "only suffix is '+la'"), ("nope", "unknown base 'nope'"),
    ("e2e-A@bsce", "trains its own encoder"),
])
def test_method_grammar_errors_name_the_grammar(name, needle):
    with pytest.raises(ValueError, match="grammar: BASE\\[@LOSS\\]\\[\\+la\\]") as e:
        parse_method(name)
    assert needle in str(e.value)


# ---------------------------------------------------------------- validation split and sealed test set


def test_validation_split_is_balanced_and_disjoint(onehot_npz):
    split = make_split(_cfg(onehot_npz))
    assert np.bincount(split.val.y, minlength=C).tolist() == [20] * C
    rows = lambda ds: {r.tobytes() for r in ds.x}  # noqa: E731
    assert not rows(split.val) & rows(split.train) and not rows(split.val) & rows(split.test)
    assert rows(split.val) <= rows(split.heldout)  # never trained on: a non-member like the rest of heldout
    assert split.counts[-1] >= 1 and split.counts[0] == split.counts.max()
    none = make_split(_cfg(onehot_npz, "data.val_per_class=0"))
    assert none.val is None and len(none.train.y) >= len(split.train.y)
    with pytest.raises(Exception, match="val_per_class=299"):
        make_split(_cfg(onehot_npz, "data.val_per_class=299"))


def test_sealed_test_set_raises_until_final_evaluation(onehot_npz):
    split = make_split(_cfg(onehot_npz)).sealed()
    assert isinstance(split.test, SealedDataset) and split.sealed() is split
    for read in (lambda: split.test.x, lambda: split.test.y, lambda: split.test.subset(np.arange(3))):
        with pytest.raises(PrematureTestAccess, match="before final_evaluation"):
            read()
    assert len(split.test) == 5 * split.test.label_counts[0] and split.summary()["test_size"] == len(split.test)
    with split.final_evaluation() as test:
        assert len(split.test.y) == len(test.y)
    with pytest.raises(PrematureTestAccess):  # sealed again afterwards
        split.test.x


def _biased_fit(split, bias):
    """E = identity, G(z) = z + bias: exact on one-hot features up to a class bias."""
    g = nn.Linear(C, C)
    with torch.no_grad():
        g.weight.copy_(torch.eye(C))
        g.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    return Fitted(nn.Identity(), g, torch.as_tensor(split.counts, dtype=torch.float32))


@pytest.mark.parametrize("bias, tau", [("log_prior", 1.0), ("zero", 0.0)])
def test_tau_is_chosen_on_validation(onehot_npz, tmp_path, monkeypatch, bias, tau):
    """A G biased by exactly log π (as CE learns) needs τ = 1; an already balanced G (as Balanced Softmax
    learns) gets τ = 0 — +la with the training prior would double-correct it."""
    cfg = _cfg(onehot_npz, "methods=[ce+la]")
    split = make_split(cfg)
    b = np.log(split.counts / split.counts.sum()) if bias == "log_prior" else np.zeros(C)
    monkeypatch.setattr(SeedRun, "_train_base", lambda self, base, loss, w: _biased_fit(self.split, b))
    out = SeedRun(split, cfg, 0, torch.device("cpu"), RunDir.create(cfg, tmp_path)).run([parse_method("ce+la")])
    m = out["methods"]["ce+la"]
    assert m["chosen"]["tau"] == tau and m["chosen"]["on"] == "validation"
    assert m["validation"]["balanced"] == 1.0 and m["balanced"] == 1.0


def test_without_validation_tau_is_the_configured_one(onehot_npz, tmp_path, monkeypatch):
    cfg = _cfg(onehot_npz, "data.val_per_class=0", "logit_adjust_tau=1.5", "methods=[ce+la]")
    split = make_split(cfg)
    monkeypatch.setattr(SeedRun, "_train_base", lambda self, base, loss, w: _biased_fit(self.split, np.zeros(C)))
    out = SeedRun(split, cfg, 0, torch.device("cpu"), RunDir.create(cfg, tmp_path)).run([parse_method("ce+la")])
    assert out["methods"]["ce+la"]["chosen"]["tau"] == 1.5 and out["methods"]["ce+la"]["validation"] is None
    with pytest.raises(ValueError, match="pseudo_weight_grid"):
        prepare(_cfg(onehot_npz, "data.val_per_class=0", "pseudo_weight_grid=[0.5,1]"))


def test_a_run_that_reads_test_data_early_fails(onehot_npz, tmp_path, monkeypatch):
    """The guard of the whole pipeline: any read of the test set before the final evaluation raises."""
    cfg = _cfg(onehot_npz, "methods=[ce,ce+la]")
    real = baselines.train_stage1

    def peeking_stage1(split, *args, **kwargs):
        split.test.y  # e.g. to pick an epoch
        return real(split, *args, **kwargs)

    monkeypatch.setattr(pipeline, "train_stage1", peeking_stage1)
    with pytest.raises(PrematureTestAccess):
        run_experiment(cfg, RunDir.create(cfg, tmp_path))


def test_stage1_once_per_loss_and_reads_of_test_only_at_the_end(onehot_npz, tmp_path, monkeypatch):
    cfg = _cfg(onehot_npz, "methods=[ce,logit_adjust,bsce,bsce+la,resample@bsce,ldam-drw]")
    split = prepare(cfg)
    losses, real = [], baselines.train_stage1

    def counting(split_, *args, **kwargs):
        losses.append(args[-1] if len(args) == 6 else kwargs.get("loss", "ce"))
        assert not split.test._open  # trained while the test set is sealed
        return real(split_, *args, **kwargs)

    monkeypatch.setattr(pipeline, "train_stage1", counting)
    run = RunDir.create(cfg, tmp_path)
    results = run_experiment(cfg, run, split)
    assert sorted(losses) == ["bsce", "ce", "ldam-drw"]  # one stage 1 per stage-1 loss
    assert split.test.reads == ["x", "y"]  # once, inside the final evaluation
    for name in ("stage1.safetensors", "stage1-bsce.safetensors", "stage1-ldam-drw.safetensors", "crt-bsce.safetensors"):
        assert (run.checkpoints / "seed0" / name).exists(), name
    assert set(results["baselines"]) == set(cfg.methods)
    choices = results["choices"]
    assert all(c["tau"] in cfg.la_tau_grid for c in choices["logit_adjust"] + choices["bsce+la"])
    assert choices["ce"][0]["tau"] is None


def test_split_seeds_times_seeds_are_aggregated(onehot_npz, tmp_path):
    cfg = _cfg(onehot_npz, "methods=[ce,ce+la]", "split_seeds=[0,1]", "seeds=[0,1]")
    run = RunDir.create(cfg, tmp_path)
    results = run_experiment(cfg, run)
    assert results["pairs"] == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert results["run_keys"] == ["split0-seed0", "split0-seed1", "split1-seed0", "split1-seed1"]
    for key in results["run_keys"]:
        assert (run.path / "seeds" / f"{key}.json").exists() and (run.checkpoints / key / "stage1.safetensors").exists()
    for method in ("ce", "ce+la"):
        values = [s["methods"][method]["balanced"] for s in results["per_seed"]]
        cell = results["methods"][method]["balanced"]
        assert cell["mean"] == pytest.approx(np.mean(values)) and cell["std"] == pytest.approx(np.std(values, ddof=1))
        assert len(results["choices"][method]) == 4
    assert set(json.loads((run.path / "split.json").read_text())["splits"]) == {"0", "1"}
    a, b = make_split(cfg.model_copy(update={"data": cfg.data.model_copy(update={"split_seed": 1})})), make_split(cfg)
    assert not np.array_equal(a.train.x, b.train.x)  # another split, not the same one twice
    text = render_report(run).read_text()
    assert "| method | top1 | many | medium | few | balanced | E steps | seconds |" in text  # balanced beside few
    assert "rule used:" in text and "split seeds [0, 1] × training seeds [0, 1]" in text
    assert "Chosen per run" in text and "| ce+la |" in text
    with pytest.raises(ConfigError, match="distinct"):
        load_config(None, ["split_seeds=[1,1]"])


def test_pseudo_weight_is_chosen_on_validation(onehot_npz, tmp_path):
    cfg = _cfg(onehot_npz, "methods=[ldmlr,ldmlr+la]", "pseudo_weight_grid=[0.25,1.0]", "diffusion.steps=20",
               "diffusion.T=50", "diffusion.sample_steps=3", "model.denoiser_hidden=16", "model.denoiser_depth=1",
               "model.time_dim=8", "e2e.drift_per_class=4")
    run = RunDir.create(cfg, tmp_path)
    results = run_experiment(cfg, run)
    for name in ("ldmlr-stage3-w0.25.safetensors", "ldmlr-stage3-w1.safetensors"):
        assert (run.checkpoints / "seed0" / name).exists(), name  # stage 3 once per weight of the grid
    assert not list((run.checkpoints / "seed0").glob("stage2-*"))  # one denoiser for both
    for name in ("ldmlr", "ldmlr+la"):
        (c,) = results["choices"][name]
        assert c["pseudo_weight"] in (0.25, 1.0) and "pseudo_weight" in c["chosen_on_validation"]
    assert results["choices"]["ldmlr+la"][0]["tau"] in cfg.la_tau_grid


def test_stage1_recipe_sgd_cosine_augment_ldam(tmp_path):
    """Stage 1 on 16×16 images with SGD + warm-up + cosine, crop-flip and LDAM-DRW (cosine classifier, s = 30)."""
    from pfdiff.data import ArrayDataset, class_groups
    from pfdiff.longtail.common import LongTailSplit
    from pfdiff.models.classifiers import CosineClassifier

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), [20, 8, 3])
    x = rng.random((len(y), 1, 16, 16)).astype(np.float32)
    ds = ArrayDataset(x, y, 3, "toy")
    split = LongTailSplit(ds, ds, np.bincount(y), class_groups(np.bincount(y)))
    cfg = load_config(None, ["stage1.epochs=4", "stage1.batch_size=8", "stage1.optimizer=sgd", "stage1.lr=0.05",
                             "stage1.schedule=cosine", "stage1.warmup_epochs=1", "stage1.augment=auto",
                             "model.width=4", "model.feature_dim=8"])
    logged = []
    enc, g = baselines.train_stage1(split, cfg, 0, torch.device("cpu"), tmp_path / "s1.safetensors",
                                    logged.append, "ldam-drw")
    assert isinstance(g, CosineClassifier) and g.scale == 30.0
    assert logged and all(math.isfinite(r["loss"]) for r in logged)
    enc2, g2 = baselines.train_stage1(split, cfg, 0, torch.device("cpu"), tmp_path / "s1.safetensors", None, "ldam-drw")
    assert all(torch.equal(a, b) for a, b in zip(g.state_dict().values(), g2.state_dict().values()))  # resumed at the end


def test_private_runs_refuse_a_stage1_loss_under_a_dp_encoder():
    cfg = load_config("dp", ["methods=[dp-ldmlr@bsce]", "privacy.encoder=dp"])
    with pytest.raises(ValueError, match="privacy.encoder=dp"):
        prepare(cfg)


def test_e2e_rows_report_budget_shares_filter_and_coverage(onehot_npz, tmp_path):
    """A run with LDMLR and two E2E variants: equal encoder steps by default (stage 1's), loss shares and filter
    totals per variant, per-class coverage of validation features for every generator, all in the report."""
    cfg = _cfg(onehot_npz, "methods=[ce,ldmlr,e2e-A-aid,e2e-C-rad-ws2+la]", "diffusion.steps=20", "diffusion.T=50",
               "diffusion.sample_steps=3", "model.denoiser_hidden=16", "model.denoiser_depth=1", "model.time_dim=8",
               "e2e.drift_per_class=6", "e2e.drift_every=10", "e2e.ge_steps=2", "e2e.ge_every=1")
    run = RunDir.create(cfg, tmp_path)
    results = run_experiment(cfg, run)
    table = results["methods"]
    stage1_steps = table["ce"]["encoder_steps"]["mean"]
    assert table["e2e-A-aid"]["encoder_steps"]["mean"] == stage1_steps  # equal encoder steps by default
    assert table["e2e-C-rad-ws2+la"]["encoder_steps"]["mean"] == 2 * stage1_steps  # warm start: stage 1 + E2E
    e2e = results["e2e"]
    assert e2e["e2e-A-aid"]["routing"] == {"ldm_to_encoder": True, "ge_to_denoiser": True, "ge_to_encoder": True}
    assert e2e["e2e-C-rad-ws2"]["warm_start"] == "stage2"
    assert sum(e2e["e2e-A-aid"]["loss_shares"].values()) == pytest.approx(1.0)
    assert "filter" in e2e["e2e-A-aid"] and "filter" not in e2e["e2e-C-rad-ws2"]
    cov = results["coverage"]
    assert set(cov) == {"ldmlr", "e2e-A-aid", "e2e-C-rad-ws2"}
    assert len(cov["ldmlr"]["recall"]) == C and all(0 <= v <= 1 for v in cov["ldmlr"]["recall_train"] if v is not None)
    text = render_report(run).read_text()
    assert "## End-to-end variants" in text and "## Coverage of held-out (validation) features" in text
    assert (run.plots / "coverage.png").exists()
