"""Privacy evidence sweep: the table (control beside every attack, one row per release), the per-group table,
the composed ε of all releases from the runs' ledgers, the figure, and (slow) the whole sweep on tiny settings."""

import json
import math

import pytest

from pfdiff.evidence import run_sweep, sweep_composition, write_evidence
from pfdiff.evidence_report import evidence_table, group_table
from pfdiff.privacy.accounting import GaussianEvent, PrivacyLedger, epsilon, epsilon_all


def _point(setting, eps, auc, few, audit=None, control=0.5, run_dir=None):
    groups = {"many": auc - 0.1, "medium": auc, "few": auc + 0.1}
    attacks = {a: {"auc": auc, "tpr_at_1pct_fpr": auc / 10, "per_group_auc": groups, "control_auc": control,
                   "control_tpr_at_1pct_fpr": 0.01, "control_per_group_auc": {g: control for g in groups}}
               for a in ("loss", "secmi", "pia")}
    p = {"setting": setting, "epsilon": eps, "claimed_epsilon": eps, "audit": audit,
         "attacks": {**attacks, "copy_fraction": 0.01, "n_members": 100,
                     "upstream_auc": {"feature_norm": 0.52, "stage1_loss": 0.49}}, "few": few, "top1": few + 0.1}
    return p | ({"run_dir": str(run_dir)} if run_dir else {})


def test_table_and_figure_show_every_point_with_its_control(tmp_path):
    points = [_point("centralised", 1.0, 0.51, 0.55, {"epsilon_lower": 0.0, "canaries": 200, "seconds": 7.2}),
              _point("centralised", math.inf, 0.68, 0.73, control=0.56),
              _point("federated fedavg", 10.0, 0.52, 0.40)]
    table = evidence_table(points)
    assert "| #1 | centralised | 1.00 | 1.00 | 0.00 (m = 200, 7 s) | 0.510 / 0.051 (0.500)" in table
    assert "| #2 | centralised | ∞ | ∞ | – | 0.680 / 0.068 (0.560)" in table and "federated fedavg" in table
    assert "control AUC" in table.splitlines()[0] and "0.520 / 0.490" in table  # no-denoiser statistics
    assert "| #2 | centralised | ∞ | loss | 0.580 (0.560) | 0.680 (0.560) | 0.780 (0.560) |" in group_table(points)
    md = write_evidence(tmp_path, points).read_text()
    assert "privacy_utility.png" in md and (tmp_path / "privacy_utility.png").stat().st_size > 1000
    assert "Each row is a separate release" in md and "independent" in md
    saved = json.loads((tmp_path / "evidence.json").read_text())
    assert [p["epsilon"] for p in saved["points"]] == ["1", "inf", "10"]
    assert saved["points"][1]["claimed_epsilon"] is None
    assert saved["composition"]["non_private_releases"] == ["centralised"]


def _ledger(run_dir, events, delta=1e-5, private=True):
    ledger = PrivacyLedger(run_dir / "privacy" / "seed0.json", 100.0, delta)
    for e in events:
        ledger.record(e.name, e.noise_multiplier, e.sample_rate, e.steps)
    if not private:  # as a run with reproducible noise marks its ledger
        path = run_dir / "privacy" / "seed0.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "private": False}))


def test_sweep_composes_every_ledger_of_its_dp_releases(tmp_path):
    """Two DP runs on the same private data: the composed ε is that of all their events together, larger than
    either release alone; the ∞ row (same run dir as the last DP run) adds no ledger but makes the total ∞."""
    a = [GaussianEvent(3.0, 0.5, 20, "DP-SGD"), GaussianEvent(4.0, 1.0, 1, "noisy counts")]
    b = [GaussianEvent(1.2, 0.5, 20, "DP-SGD"), GaussianEvent(4.0, 1.0, 1, "noisy counts")]
    _ledger(tmp_path / "eps1", a)
    _ledger(tmp_path / "eps10", b)
    points = [_point("centralised", 1.0, 0.5, 0.6, run_dir=tmp_path / "eps1"),
              _point("centralised", 10.0, 0.5, 0.6, run_dir=tmp_path / "eps10"),
              _point("centralised", math.inf, 0.6, 0.7, run_dir=tmp_path / "eps10")]
    md = write_evidence(tmp_path, points).read_text()
    comp = json.loads((tmp_path / "evidence.json").read_text())["composition"]["centralised"]
    want = epsilon_all([*a, *b], 1e-5)
    assert comp["epsilon"] == pytest.approx(want) and comp["events"] == 4 and comp["private"] is True
    assert [r["epsilon_pld"] for r in comp["releases"]] == pytest.approx([epsilon(a, 1e-5), epsilon(b, 1e-5)])
    assert want["pld"] > max(r["epsilon_pld"] for r in comp["releases"])
    assert f"PLD ε = {want['pld']:.3f}" in md and "with them the total is ∞" in md and "NOT PRIVATE" not in md
    assert "(2 ledgers, 4 events)" in md
    _ledger(tmp_path / "eps3", a, private=False)
    points.append(_point("centralised", 3.0, 0.5, 0.6, run_dir=tmp_path / "eps3"))
    assert "NOT PRIVATE" in write_evidence(tmp_path, points).read_text()
    assert json.loads((tmp_path / "evidence.json").read_text())["composition"]["centralised"]["private"] is False


def test_sweep_composes_federated_runs_per_client(tmp_path):
    def fed_run(name, privacy):
        d = tmp_path / name
        d.mkdir()
        (d / "results.json").write_text(json.dumps({"privacy": privacy}))
        return d

    composed = fed_run("fed1", {"mode": "example", "delta": 1e-5, "composed_over_methods": {"0": 1.5, "1": 1.2},
                                "methods": {}})
    summed = fed_run("fed10", {"mode": "example", "delta": 1e-5, "methods": {
        "fedavg": {"0": {"epsilon": 4.0}, "1": {"epsilon": 3.0}},
        "fedddpm": {"0": {"epsilon": 9.0}, "1": {"epsilon": 10.0}}}})
    points = [_point("federated fedavg", 1.0, 0.5, 0.4, run_dir=composed),
              _point("federated fedddpm", 1.0, 0.5, 0.4, run_dir=composed),
              _point("federated fedavg", 10.0, 0.5, 0.4, run_dir=summed)]
    fed = sweep_composition(points)["federated"]
    assert fed["per_client_epsilon"] == pytest.approx({"0": 14.5, "1": 14.2}) and fed["epsilon"] == pytest.approx(14.5)
    assert fed["runs"] == 2 and fed["delta"] == pytest.approx(2e-5)


@pytest.mark.slow
def test_sweep_end_to_end_on_tiny_settings(tmp_path):
    central = ["stage1.epochs=3", "diffusion.steps=60", "diffusion.T=100", "diffusion.sample_steps=5",
               "pseudo.finetune_epochs=2", "model.width=8", "privacy.steps=20", "privacy.expected_batch_size=32"]
    fed = ["fed.num_clients=3", "fed.rounds=2", "fed.local_steps=3", "fed.warmup_steps=10", "fed.aux_size=200",
           "fed.repair_epochs=2", "fed.repair_per_class=20", "fed.server_steps=2", "fed.encoder_rounds=2",
           "diffusion.steps=60"]
    md = run_sweep(tmp_path, [2.0, math.inf], central, fed, audit_canaries=50).read_text()
    saved = json.loads((tmp_path / "evidence.json").read_text())
    points = saved["points"]
    assert {p["setting"] for p in points} == {"centralised", "federated fedavg", "federated fedddpm"}
    dp = next(p for p in points if p["setting"] == "centralised" and p["epsilon"] == "2")
    assert dp["claimed_epsilon"] <= 2.0 + 1e-6 and dp["audit"]["epsilon_lower"] <= dp["claimed_epsilon"]
    assert dp["attacks"]["loss"]["control_auc"] is not None
    fed_dp = next(p for p in points if p["setting"] == "federated fedavg" and p["epsilon"] == "2")
    assert fed_dp["claimed_epsilon"] <= 2.0 + 1e-6 and fed_dp["attacks"]["loss"]["control_auc"] is not None
    assert saved["composition"]["centralised"]["epsilon"]["pld"] == pytest.approx(dp["claimed_epsilon"], abs=1e-3)
    assert "| centralised | ∞ |" in md and "Composition: every release" in md
