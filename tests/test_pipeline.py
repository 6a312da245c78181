"""End to end on digits with a tiny budget: run dir contents, determinism, resume, report, CLI errors."""

import json

import pytest
from typer.testing import CliRunner

from pfdiff.cli import app
from pfdiff.config import load_config
from pfdiff.diffusion import DiffusionLoss
from pfdiff.longtail.pipeline import run_experiment
from pfdiff.report import render_report
from pfdiff.runs import RunDir, load_state

TINY = ["stage1.epochs=3", "diffusion.steps=60", "diffusion.T=100", "diffusion.sample_steps=5",
        "pseudo.finetune_epochs=2", "model.denoiser_hidden=32", "model.width=8", "seeds=[0]",
        "checkpoint_every=20"]


def _numbers(results):
    """Every metric except wall time."""
    return json.dumps({m: {k: v for k, v in row.items() if k != "seconds"} for m, row in results["methods"].items()})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cfg = load_config(None, TINY + ["name=tiny"])
    run = RunDir.create(cfg, tmp_path_factory.mktemp("runs"))
    return run, run_experiment(cfg, run)


def test_run_writes_everything(tiny_run):
    run, results = tiny_run
    for name in ("config.yaml", "metrics.jsonl", "results.json", "split.json", "seeds/seed0.json",
                 "checkpoints/seed0/stage1.safetensors", "checkpoints/seed0/stage2.safetensors",
                 "checkpoints/seed0/features.safetensors"):
        assert (run.path / name).exists(), name
    assert set(results["methods"]) == {"ce", "logit_adjust", "resample", "ldmlr"}
    for row in results["methods"].values():
        for key in ("top1", "balanced", "many", "medium", "few"):
            assert 0.0 <= row[key]["mean"] <= 1.0
    split = results["split"]
    assert split["train_counts"][0] > split["train_counts"][-1]  # long-tailed
    assert len(set(split["test_counts"])) == 1  # exactly balanced test set
    diag = results["per_seed"][0]["diagnostics"]["ldmlr"]
    assert diag["generated_per_class"][0] == 0 and diag["generated_per_class"][-1] > 0
    # the protocol: a balanced validation split (default 10 per class), τ of logit_adjust chosen on it
    assert split["val_counts"] == [10] * 10 and results["protocol"]["val_per_class"] == 10
    (choice,) = results["choices"]["logit_adjust"]
    assert choice["on"] == "validation" and choice["tau"] in results["protocol"]["la_tau_grid"]
    assert results["run_keys"] == ["seed0"] and results["pairs"] == [[0, 0]]


def test_report_has_table_and_plots(tiny_run):
    run, _ = tiny_run
    text = render_report(run).read_text()
    assert "| ldmlr |" in text and "few" in text and "not private" in text
    assert "| few | balanced |" in text and "rule used: thresholds" in text and "## Protocol" in text
    for png in ("per_class_accuracy.png", "training_curves.png", "feature_projection.png"):
        assert (run.plots / png).stat().st_size > 1000
    assert not (run.plots / "drift.png").exists() and "drift" not in text.split("## Plots", 1)[1]  # no E2E variant
    assert "± n/a (1 seed)" in text and "± 0.000" not in text and " beats " not in text  # seeds=[0]: no spread


def test_same_seed_same_numbers(tiny_run, tmp_path):
    _, first = tiny_run
    cfg = load_config(None, TINY + ["name=again"])
    assert _numbers(run_experiment(cfg, RunDir.create(cfg, tmp_path))) == _numbers(first)


def test_interrupted_run_resumes_to_the_same_numbers(tiny_run, tmp_path, monkeypatch):
    _, first = tiny_run
    cfg = load_config(None, TINY + ["name=crash"])
    run = RunDir.create(cfg, tmp_path)
    calls = {"n": 0}
    original = DiffusionLoss.__call__

    def crash_at_step_45(self, *args, **kwargs):  # stage 2 dies after its step-40 checkpoint
        calls["n"] += 1
        if calls["n"] == 45:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DiffusionLoss, "__call__", crash_at_step_45)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, run)
    monkeypatch.undo()
    assert not (run.path / "results.json").exists()
    assert load_state(run.checkpoints / "seed0" / "stage2.safetensors")["step"] == 40
    resumed = run_experiment(RunDir.open(run.path).config(), RunDir.open(run.path))
    assert _numbers(resumed) == _numbers(first)


def test_cli_run_and_errors(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["run", "--out", str(tmp_path), *sum((["--set", s] for s in TINY), []),
                              "--set", "methods=[ce,logit_adjust]"])
    assert res.exit_code == 0, res.output
    assert "report:" in res.output and "test accuracy" in res.output
    run_dir = next(tmp_path.iterdir())
    assert set(json.loads((run_dir / "results.json").read_text())["methods"]) == {"ce", "logit_adjust"}
    assert (run_dir / "report.md").exists()
    assert runner.invoke(app, ["report", str(run_dir)]).exit_code == 0
    bad = runner.invoke(app, ["run", "--out", str(tmp_path), "--set", "methods=[nope]"])
    assert bad.exit_code == 2 and "unknown method" in bad.output
    bad = runner.invoke(app, ["run", "--out", str(tmp_path), "--set", "data.name=npz",
                              "--set", f"data.path={tmp_path}/missing.npz"])
    assert bad.exit_code == 2 and "missing.npz" in bad.output


def test_private_run_keeps_its_budget_and_reports_every_release(tmp_path):
    cfg = load_config("dp", TINY + ["methods=[ce,dp-ldmlr,dp-ldmlr+la]", "privacy.steps=6", "privacy.target_epsilon=3",
                                    "privacy.expected_batch_size=32"])
    run = RunDir.create(cfg, tmp_path)
    results = run_experiment(cfg, run)
    ledger = json.loads((run.path / "privacy" / "seed0.json").read_text())
    assert [e["name"] for e in ledger["entries"]] == ["class counts (Gaussian)", "denoiser DP-SGD"]
    assert ledger["entries"][1]["steps"] == 6
    eps = results["per_seed"][0]["diagnostics"]["privacy"]["epsilon"]
    assert 2.9 < eps["pld"] <= 3.0 and eps["rdp"] >= eps["pld"] - 1e-6  # calibrated to the target, RDP looser
    # ce saw only the public part: its prior (stage-1 counts) is below the full long-tailed counts
    report = render_report(run).read_text()
    assert "Gaussian mechanism, in the ledger" in report and "public (ε = 0)" in report
    assert "not private" in report  # methods outside dp-… are labelled
    assert "add/remove one example" in report and "OS entropy" in report and "NOT PRIVATE" not in report
    # no private class count anywhere in what the run writes (only the public part's, and N_private)
    split = json.loads((run.path / "split.json").read_text())
    assert "train_counts" not in split and "train_counts" not in results["split"]
    assert split["n_public"] + split["n_private"] == split["train_size"]
    assert ledger["private"] is True and ledger["neighbouring_relation"].startswith("add/remove")


def test_dp_encoder_is_composed_into_the_budget(tmp_path):
    cfg = load_config("dp", TINY + ["methods=[ce,dp-ldmlr]", "privacy.steps=4", "privacy.target_epsilon=4",
                                    "privacy.expected_batch_size=32", "privacy.encoder=dp", "privacy.encoder_steps=3",
                                    "privacy.encoder_batch_size=32"])
    run = RunDir.create(cfg, tmp_path)
    results = run_experiment(cfg, run)
    ledger = json.loads((run.path / "privacy" / "seed0.json").read_text())
    names = [e["name"] for e in ledger["entries"]]
    assert names[0] == "encoder + stage-1 classifier DP-SGD" and "denoiser DP-SGD" in names
    assert ledger["entries"][0]["steps"] == 3
    eps = results["per_seed"][0]["diagnostics"]["privacy"]["epsilon"]["pld"]
    assert 3.9 < eps <= 4.0  # encoder + counts + denoiser together meet the target
    assert "DP-SGD (`privacy.encoder: dp`)" in render_report(run).read_text()
    # the logit-adjustment prior of the DP stage 1 is the released (noisy, accounted) count vector
    released = json.loads((run.checkpoints / "seed0" / "noisy-counts.json").read_text())["counts"]
    assert names.count("class counts (Gaussian)") == 1
    from pfdiff.longtail.common import make_split
    from pfdiff.longtail.pipeline import SeedRun
    seed_run = SeedRun(make_split(cfg), cfg, 0, __import__("torch").device("cpu"), run)
    assert seed_run.counts().tolist() == released  # read back, not drawn (and charged) again
    assert [e["name"] for e in json.loads((run.path / "privacy" / "seed0.json").read_text())["entries"]] == names


@pytest.mark.parametrize("override, needle", [
    ("privacy.target_epsilon=1e-6", "fixed releases alone cost"),
    ("privacy.target_epsilon=1e-6 privacy.count_epsilon=0", "unreachable"),
    ("privacy.delta=0.5", "not below 1/N"),
    ("privacy.noise_multiplier=0.3", "plan costs epsilon"),
])
def test_refused_private_plans_write_nothing(tmp_path, override, needle):
    res = CliRunner().invoke(app, ["run", "dp", "--out", str(tmp_path),
                                   *sum((["--set", s] for s in [*TINY, *override.split()]), [])])
    assert res.exit_code == 2 and needle in res.output, res.output
    assert list(tmp_path.iterdir()) == []  # refused before the run directory exists


def test_debug_noise_marks_the_run_not_private_everywhere(tmp_path):
    res = CliRunner().invoke(app, ["run", "dp", "--out", str(tmp_path), *sum((["--set", s] for s in TINY), []),
                                   "--set", "methods=[dp-ldmlr]", "--set", "privacy.steps=3",
                                   "--set", "privacy.reproducible_noise=true"])
    assert res.exit_code == 0, res.output
    assert "NOT PRIVATE" in res.output
    run_dir = next(tmp_path.iterdir())
    ledger = json.loads((run_dir / "privacy" / "seed0.json").read_text())
    assert ledger["private"] is False and "NOT PRIVATE" in ledger["noise"]
    assert "NOT PRIVATE — debugging run" in (run_dir / "report.md").read_text()
