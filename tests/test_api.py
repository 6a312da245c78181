"""The Python API (``pfdiff.run``) and ``python -m pfdiff``."""

import subprocess
import sys

import pytest

import pfdiff
from pfdiff.config import load_config

TINY = ["methods=[ce,logit_adjust]", "seeds=[0]", "stage1.epochs=2", "threads=1"]


def test_run_returns_the_results_and_writes_a_run(tmp_path):
    results = pfdiff.run("quickstart", out=tmp_path, overrides=TINY)
    assert set(results["methods"]) == {"ce", "logit_adjust"}
    run_dir = tmp_path / results["run_dir"].rsplit("/", 1)[-1]
    assert (run_dir / "results.json").exists() and (run_dir / "report.md").exists()
    again = pfdiff.run(load_config("quickstart", TINY), out=tmp_path / "b", report=False)
    assert again["methods"]["ce"]["balanced"] == results["methods"]["ce"]["balanced"]  # same config, same numbers


def test_run_refuses_before_writing(tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        pfdiff.run("quickstart", out=tmp_path, overrides=["methods=[nope]"])
    assert not any(tmp_path.iterdir())


def test_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "pfdiff", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "run" in out.stdout


def test_every_run_records_its_environment(tmp_path):
    import json

    from pfdiff.runs import RunDir

    run = RunDir.create(load_config("quickstart", TINY), tmp_path)
    env = json.loads((run.path / "environment.json").read_text())
    assert env["pfdiff"] == pfdiff.__version__ and env["packages"]["torch"] and env["device"] == "cpu"
    assert env["git_commit"] is None or len(env["git_commit"]) == 40
