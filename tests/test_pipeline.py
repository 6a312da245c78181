"""End to end on digits with a tiny budget: run dir contents, determinism, resume, report, CLI errors."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pfdiff.cli import app
from pfdiff.config import load_config
from pfdiff.diffusion import DiffusionLoss
from pfdiff.longtail.pipeline import Timer, run_experiment
from pfdiff.report import render_report
from pfdiff.runs import RunDir, load_state, metric_key

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


def test_timer_counts_each_call_once_over_the_attempts_of_a_run(tmp_path, monkeypatch):
    """Bookkeeping on a fake clock: a call an earlier attempt finished counts its ledger seconds (not the restore);
    a call resumed mid-way counts what its loops restored plus its time now; the ledger gains only new calls."""
    from pfdiff import training

    now = [0.0]
    monkeypatch.setattr(training, "_clock", lambda: now[0])

    def work(seconds, restored=0.0):
        def fn():
            training.Stopwatch.credit(restored)  # what run_steps does on a resume
            now[0] += seconds
            return seconds
        return fn

    ledger = tmp_path / "timings.json"
    first = Timer(ledger)
    assert first("stage1", work(5.0)) == 5.0  # then the process is killed during stage 2
    assert json.loads(ledger.read_text()) == {"stage1#1": 5.0}
    again = Timer(ledger)
    again("stage1", work(0.5))  # restored from its checkpoint: the 5 s it took, not the 0.5 s of loading it
    again("stage2", work(2.0, restored=3.0))  # resumed: 3 s before the kill + 2 s after
    again("stage2", work(1.0))  # a second call of the same stage adds up
    assert again.seconds == {"stage1": 5.0, "stage2": 6.0}
    assert json.loads(ledger.read_text()) == {"stage1#1": 5.0, "stage2#1": 5.0, "stage2#2": 1.0}


KILLED_AT = """
import os, signal, sys
from pfdiff.diffusion import DiffusionLoss
original, calls = DiffusionLoss.__call__, [0]
def killed_at_step_55(self, *args, **kwargs):  # stage 2: logged step 50, checkpointed step 40, then SIGKILL
    calls[0] += 1
    if calls[0] == 55:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, *args, **kwargs)
DiffusionLoss.__call__ = killed_at_step_55
from pfdiff.cli import app
app(sys.argv[1:], prog_name="pfdiff")
"""


def test_a_killed_run_resumes_with_each_record_once_and_the_times_of_both_attempts(tmp_path):
    """`pfdiff run` SIGKILLed in stage 2 (no cleanup of any kind), then `pfdiff run --resume DIR`."""
    import pfdiff

    path = [str(Path(pfdiff.__file__).parents[1]), os.environ.get("PYTHONPATH")]  # this checkout's pfdiff
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    sets = sum((["--set", s] for s in [*TINY, "threads=1"]), [])
    killed = subprocess.run([sys.executable, "-c", KILLED_AT, "-q", "run", "--out", str(tmp_path), *sets],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (run_dir,) = tmp_path.iterdir()
    ck = run_dir / "checkpoints" / "seed0"
    assert not (run_dir / "results.json").exists()
    at_kill = load_state(ck / "stage2.safetensors")
    assert at_kill["step"] == 40 and at_kill["seconds"] > 0
    ledger_at_kill = json.loads((ck / "timings.json").read_text())
    assert set(ledger_at_kill) == {"stage1#1", "crt#1"}  # the stages finished before the kill
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    stage2 = [r["step"] for r in lines if "stage 2" in r.get("stage", "")]
    assert stage2 == [50]  # logged after the last checkpoint: the resume logs it again

    res = CliRunner().invoke(app, ["-q", "run", "--resume", str(run_dir)])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = [metric_key(r) for r in lines if metric_key(r) is not None]
    assert len(keys) == len(set(keys)) and RunDir.open(run_dir).metrics() == lines  # each record once
    assert [r["step"] for r in lines if "stage 2" in r.get("stage", "")] == [50, 60]
    seed = json.loads((run_dir / "seeds" / "seed0.json").read_text())
    timings, ledger = seed["timings"], json.loads((ck / "timings.json").read_text())
    # finished before the kill: the seconds they took then; stage 2: its steps before the kill and after
    assert timings["stage1"] == ledger_at_kill["stage1#1"] and timings["crt"] == ledger_at_kill["crt#1"]
    final = load_state(ck / "stage2.safetensors")
    assert final["step"] == 60 and timings["stage2"] >= final["seconds"] > at_kill["seconds"]
    assert timings == {name.split("#")[0]: ledger[name] for name in ledger}  # one call per stage here
    stages = {"ce": ["stage1"], "logit_adjust": ["stage1"], "resample": ["stage1", "crt"],
              "ldmlr": ["stage1", "stage2", "sampling", "ldmlr"]}
    results = json.loads((run_dir / "results.json").read_text())
    for method, names in stages.items():
        assert seed["methods"][method]["seconds"] == pytest.approx(sum(timings[s] for s in names)), method
        assert results["methods"][method]["seconds"]["mean"] == pytest.approx(seed["methods"][method]["seconds"])


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
