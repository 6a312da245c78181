"""report.md and plots from a hand-made run directory (no training): which figures are drawn, the spread."""

import copy
import json

import pytest

from pfdiff.cli import print_table
from pfdiff.report import render_report, verdict
from pfdiff.text import plural
from pfdiff.runs import RunDir

C = 3


def _cell(mean, std):
    return {"mean": mean, "std": std}


def _row(few, std=0.0, per_class=(0.9, 0.6, 0.3)):
    return {"top1": _cell(0.7, std), "many": _cell(0.9, std), "medium": _cell(0.6, std), "few": _cell(few, std),
            "balanced": _cell(0.65, std), "seconds": _cell(1.5, std), "per_class": list(per_class)}


def fake_results(n_runs=1, std=0.0):
    """A results.json as the pipeline writes it, trimmed: CE, logit_adjust and one diffusion method."""
    pairs = [[0, s] for s in range(n_runs)]
    return {
        "seeds": [s for _, s in pairs], "pairs": pairs, "run_keys": [f"seed{s}" for _, s in pairs],
        "device": "cpu", "baselines": ["ce", "logit_adjust"],
        "split": {"dataset": "digits", "train_size": 120, "test_size": 30, "num_classes": C,
                  "train_counts": [80, 30, 10], "groups": {"many": [0], "medium": [1], "few": [2],
                                                           "rule": "thresholds"}},
        "methods": {"ce": _row(0.30, std), "logit_adjust": _row(0.40, std), "ldmlr": _row(0.45, std)},
        "method_names": {"ce": "cross-entropy", "logit_adjust": "logit adjustment", "ldmlr": "LDMLR"},
        "timings": {"stage1": _cell(2.0, std)},
        "per_seed": [{"seed": s, "split_seed": 0, "diagnostics": {}} for _, s in pairs],
    }


def _metrics(stage_points):
    """metrics.jsonl rows: ``stage_points[stage]`` logged losses for seed 0, and one frozen drift point."""
    rows = [{"stage": stage, "seed": 0, "split_seed": 0, "step": 50 * (i + 1), "loss": 1.0 / (i + 1)}
            for stage, k in stage_points.items() for i in range(k)]
    return rows + [{"event": "drift", "method": "ldmlr", "step": 0, "frechet": 2.5, "seed": 0, "split_seed": 0}]


def _run(tmp_path, results, metrics):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    (run.path / "results.json").write_text(json.dumps(results))
    run.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in metrics))
    return run


def test_plural():
    assert [plural(1, "class"), plural(3, "class"), plural(1, "run"), plural(0, "run")] == \
        ["1 class", "3 classes", "1 run", "0 runs"]


def test_one_run_has_no_spread_and_no_claim(tmp_path):
    text = render_report(_run(tmp_path, fake_results(1), _metrics({"stage 1": 3}))).read_text()
    assert "± 0.000" not in text and "| 0.450 ± n/a (1 seed) |" in text
    assert not any(w in text for w in ("beats", "does not beat", "within the spread", "better"))
    assert "ldmlr: few 0.450, +0.150 vs CE" in text and "no method is claimed to beat another" in text
    assert "mean ± std over 1 run (one seed: no spread)" in text


def test_one_class_is_singular(tmp_path):
    res = fake_results(1)
    res["split"]["num_classes"] = 1
    text = render_report(_run(tmp_path, res, [])).read_text()
    assert "1 class;" in text and "1 classes" not in text


@pytest.mark.parametrize("std, word", [(0.01, "beats"), (0.04, "is within the spread (0.080) of")])
def test_with_several_runs_a_claim_needs_the_difference_to_exceed_the_spread(std, word):
    res = fake_results(3, std)
    text = "\n".join(verdict(res))
    assert f"; {word} logit_adjust." in text  # ldmlr − logit_adjust = 0.05 on the few classes
    worse = copy.deepcopy(res)
    worse["methods"]["ldmlr"]["few"]["mean"] = 0.2
    assert "does not beat logit_adjust" in "\n".join(verdict(worse))


def test_print_table_spread(capsys):
    print_table(fake_results(1))  # captured: no terminal, as in a log file
    one = capsys.readouterr().out
    assert "± n/a (1 seed)" in one and "0.450 ± n/a" in one and "± 0.000" not in one
    rows = [line for line in one.splitlines() if "ldmlr" in line]
    assert len(rows) == 1 and rows[0].count("± n/a") == 5  # a row per line, not wrapped at 80 columns
    print_table(fake_results(2, std=0.0123))
    assert "0.450 ± 0.012" in capsys.readouterr().out


def test_short_stages_get_no_panel_and_are_named(tmp_path):
    run = _run(tmp_path, fake_results(1), _metrics({"stage 1": 3, "stage 2": 1}))
    (run.plots).mkdir()
    (run.plots / "drift.png").write_bytes(b"stale")  # from an earlier render: not left beside the report
    text = render_report(run).read_text()
    assert (run.plots / "training_curves.png").exists() and "](plots/training_curves.png)" in text
    assert "Too short to plot a training curve" in text and "`stage 2`" in text and "`stage 1`" not in text
    # no E2E variant: the frozen-encoder drift line is not drawn, not linked
    assert not (run.plots / "drift.png").exists() and "drift" not in text.split("## Plots", 1)[1]


def test_no_figure_when_no_stage_has_a_curve(tmp_path):
    run = _run(tmp_path, fake_results(1), _metrics({"stage 1": 1}))
    text = render_report(run).read_text()
    assert not (run.plots / "training_curves.png").exists() and "training_curves" not in text
    assert "`stage 1`" in text


def test_drift_drawn_when_an_e2e_variant_ran(tmp_path):
    res = fake_results(1)
    res["e2e"] = {"e2e-A": {"routing": {"ldm_to_E": True}, "steps": 100, "loss_shares": {"real": 1.0}}}
    metrics = _metrics({}) + [{"event": "drift", "method": "e2e-A", "step": s, "frechet": 1.0 + s / 100,
                               "seed": 0, "split_seed": 0} for s in (0, 50, 100)]
    run = _run(tmp_path, res, metrics)
    text = render_report(run).read_text()
    assert (run.plots / "drift.png").stat().st_size > 1000 and "](plots/drift.png)" in text
