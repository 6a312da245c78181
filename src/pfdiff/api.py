"""The Python API: ``pfdiff.run`` is ``pfdiff run`` without the command line.

    import pfdiff
    results = pfdiff.run("quickstart", overrides=["seeds=[0]"])
    results["methods"]["ldmlr"]["few"]["mean"]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pfdiff.config import RunConfig, load_config


def run(config: str | Path | RunConfig | None = None, out: str | Path | None = None,
        overrides: list[str] | tuple[str, ...] = (), report: bool = True) -> dict[str, Any]:
    """Train and evaluate every configured method over all seeds, as ``pfdiff run`` does: the same checks
    before anything is written (bad methods, data, devices, privacy plans raise ``ValueError``/``ConfigError``
    /``DataError`` and leave no run directory), a run directory under ``out`` (default ``runs/``), report.md
    when ``report``. ``config``: a preset name, a YAML path or a ``RunConfig``. Returns results.json's
    content, with the run directory under ``"run_dir"``."""
    from pfdiff.longtail.pipeline import prepare, run_experiment
    from pfdiff.report import render_report
    from pfdiff.runs import RunDir

    if isinstance(config, RunConfig):
        cfg = RunConfig.model_validate(_apply(config, list(overrides))) if overrides else config
    else:
        cfg = load_config(config, list(overrides))
    split = prepare(cfg)
    run_dir = RunDir.create(cfg, out)
    results = run_experiment(cfg, run_dir, split)
    if report:
        render_report(run_dir)
    return {**results, "run_dir": str(run_dir.path)}


def _apply(cfg: RunConfig, overrides: list[str]) -> dict:
    from pfdiff.config import apply_override

    data = cfg.model_dump(mode="json")
    for assignment in overrides:
        apply_override(data, assignment)
    return data
