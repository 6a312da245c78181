"""`pfdiff check` / `run --dry-run` (plan.py), `pfdiff config`, and help text on every CLI parameter."""

import click
import pytest
import typer
import yaml
from typer.testing import CliRunner

from pfdiff.cli import app
from pfdiff.config import RunConfig, annotated_config, load_config
from pfdiff.longtail.private import COUNTS, DPSGD_EVENT, preflight
from pfdiff.plan import make_plan, render_plan


def test_check_prints_the_stages_with_their_steps_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["check", "quickstart", "--set", "seeds=[0, 1]"], terminal_width=400)
    assert res.exit_code == 0, res.output
    assert list(tmp_path.iterdir()) == []  # not even runs/
    assert "stage2: stage 2: feature denoiser ε_θ: 4000 steps × batch 256" in res.output
    assert "2 (split seed, seed) pair(s): (0, 0), (0, 1)" in res.output
    dry = CliRunner().invoke(app, ["run", "quickstart", "--set", "seeds=[0, 1]", "--dry-run",
                                   "--out", str(tmp_path / "runs")], terminal_width=400)
    assert dry.exit_code == 0 and dry.output == res.output and list(tmp_path.iterdir()) == []


def test_plan_shares_stage1_per_loss_and_counts_steps_as_the_pipeline_does():
    cfg = load_config("quickstart", ["methods=[ce, logit_adjust, bsce, resample, ldmlr@bsce]", "seeds=[0]"])
    plan = make_plan(cfg)
    stages = {st["stage"]: st for st in plan["stages"]}
    n = plan["data"]["train"]
    assert set(stages) == {"stage1", "stage1@bsce", "crt", "stage2@bsce", "sampling@bsce", "ldmlr@bsce"}
    assert stages["stage1"]["steps"] == cfg.stage1.epochs * -(-n // cfg.stage1.batch_size)
    assert stages["stage1"]["used_by"] == ["ce", "logit_adjust", "resample"]
    assert stages["stage1@bsce"]["used_by"] == ["bsce", "ldmlr@bsce"]
    assert stages["stage2@bsce"]["steps"] == cfg.diffusion.steps
    assert stages["stage2@bsce"]["seconds"] > 0 and plan["time"]["total_seconds"] >= stages["stage2@bsce"]["seconds"]


def test_private_plan_lists_every_release_with_the_run_s_calibration():
    cfg = load_config("dp", ["seeds=[0, 1]"])
    plan = make_plan(cfg)
    pv = plan["privacy"]
    assert [e["name"] for e in pv["events"]] == [COUNTS, DPSGD_EVENT]
    pre = preflight(cfg, plan["data"]["train"])
    assert pv["sigma"] == pytest.approx(pre["sigma"]) and pv["epsilon"] == pytest.approx(pre["planned_epsilon"])
    assert pv["epsilon"] <= cfg.privacy.target_epsilon * (1 + 1e-9) and pv["n_private"] == plan["data"]["private"]
    assert pv["all_pairs_epsilon"]["pld"] > pv["epsilon"]  # two pairs' releases compose
    assert {"dp-stage2", "public-stage2", "dp-stage3"} <= {st["stage"] for st in plan["stages"]}
    text = render_plan(plan)
    assert f"{DPSGD_EVENT}: σ = {pv['sigma']:.4g}" in text and "composed: ε =" in text


def test_plan_without_benchmarks_says_so(tmp_path):
    plan = make_plan(load_config("quickstart", ["seeds=[0]"]), bench_dir=tmp_path)
    assert all(st["seconds"] is None for st in plan["stages"]) and plan["time"]["total_seconds"] == 0
    assert any(m.startswith("no benchmark for stage 1") for m in plan["time"]["missing"])
    assert "no benchmark for" in render_plan(plan)


def test_dry_run_with_resume_is_refused(tmp_path):
    res = CliRunner().invoke(app, ["run", "--dry-run", "--resume", str(tmp_path)], terminal_width=400)
    assert res.exit_code == 2 and "--dry-run plans a new run" in res.output


def test_config_prints_every_key_with_its_comment_and_marks_what_changed():
    res = CliRunner().invoke(app, ["config", "dp", "--set", "privacy.steps=7"], terminal_width=400)
    assert res.exit_code == 0, res.output
    cfg = load_config("dp", ["privacy.steps=7"])
    assert RunConfig.model_validate(yaml.safe_load(res.output)) == cfg  # loads back as the same config
    assert res.output == annotated_config(cfg, "dp")
    lines = {line.strip().split(":")[0]: line for line in res.output.splitlines()[1:]}
    assert "steps: 7  # [set: default 1500]" in res.output
    assert "[set: default 256]" in lines["denoiser_hidden"] and "[set" not in lines["feature_dim"]
    assert "# auto | cpu | cuda" in lines["device"]  # the field's comment in config.py


def _params(command: click.Command, path: str):
    for p in command.params:
        if p.name != "help":
            yield f"{path} {p.name}", p
    for name, sub in getattr(command, "commands", {}).items():
        yield from _params(sub, f"{path} {name}")


def test_every_cli_argument_and_option_has_help_text():
    root = typer.main.get_command(app)
    params = list(_params(root, "pfdiff"))
    assert len(params) > 40 and any(name == "pfdiff run dry_run" for name, _ in params)
    missing = [name for name, p in params if not (getattr(p, "help", None) or "").strip()]
    assert missing == []
    assert [name for name, cmd in root.commands.items() if not (cmd.help or "").strip()] == []
