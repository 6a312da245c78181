"""Privacy evidence sweep: the table and figure from points, and (slow) the whole sweep on tiny settings."""

import json
import math

import pytest

from pfdiff.evidence import evidence_table, run_sweep, write_evidence


def _point(setting, eps, auc, few, audit=None):
    attacks = {a: {"auc": auc, "tpr_at_1pct_fpr": auc / 10} for a in ("loss", "secmi", "pia")}
    return {"setting": setting, "epsilon": eps, "claimed_epsilon": eps, "audit": audit,
            "attacks": {**attacks, "copy_fraction": 0.01, "n_members": 100}, "few": few, "top1": few + 0.1}


def test_table_and_figure_show_every_point(tmp_path):
    points = [_point("centralised", 1.0, 0.51, 0.55, {"epsilon_lower": 0.0, "canaries": 200, "seconds": 7.2}),
              _point("centralised", math.inf, 0.68, 0.73),
              _point("federated fedavg", 10.0, 0.52, 0.40)]
    table = evidence_table(points)
    assert "| centralised | 1.00 | 1.00 | 0.00 (m = 200, 7 s) | 0.510 / 0.051" in table
    assert "| centralised | ∞ | ∞ | – |" in table and "federated fedavg" in table
    md = write_evidence(tmp_path, points).read_text()
    assert "privacy_utility.png" in md and (tmp_path / "privacy_utility.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "evidence.json").read_text())["points"]
    assert [p["epsilon"] for p in saved] == ["1", "inf", "10"] and saved[1]["claimed_epsilon"] is None


@pytest.mark.slow
def test_sweep_end_to_end_on_tiny_settings(tmp_path):
    central = ["stage1.epochs=3", "diffusion.steps=60", "diffusion.T=100", "diffusion.sample_steps=5",
               "pseudo.finetune_epochs=2", "model.width=8", "privacy.steps=20", "privacy.expected_batch_size=32"]
    fed = ["fed.num_clients=3", "fed.rounds=2", "fed.local_steps=3", "fed.warmup_steps=10", "fed.aux_size=200",
           "fed.repair_epochs=2", "fed.repair_per_class=20", "fed.server_steps=2", "fed.encoder_rounds=2"]
    md = run_sweep(tmp_path, [2.0, math.inf], central, fed, audit_canaries=50).read_text()
    points = json.loads((tmp_path / "evidence.json").read_text())["points"]
    assert {p["setting"] for p in points} == {"centralised", "federated fedavg", "federated fedddpm"}
    dp = next(p for p in points if p["setting"] == "centralised" and p["epsilon"] == "2")
    assert dp["claimed_epsilon"] <= 2.0 + 1e-6 and dp["audit"]["epsilon_lower"] <= dp["claimed_epsilon"]
    fed_dp = next(p for p in points if p["setting"] == "federated fedavg" and p["epsilon"] == "2")
    assert fed_dp["claimed_epsilon"] <= 2.0 + 1e-6
    assert "| centralised | ∞ |" in md
