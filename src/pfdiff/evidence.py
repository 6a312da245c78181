"""Privacy evidence sweep (``pfdiff evidence``): claimed ε, audited lower bound, attacks, utility.

For every ε of the sweep (∞ = no DP) and both settings:
- centralised: the ``dp`` preset (one seed) with methods ``ldmlr`` and ``dp-ldmlr``; the ``dp-ldmlr``
  denoiser at each finite ε, the non-private ``ldmlr`` denoiser of the same run at ∞. Claimed ε is
  the ledger's PLD ε; the lower bound comes from a one-run audit (Steinke et al. 2023) of the same
  DP training code with canaries (``longtail.private_audit``); attacks from ``pfdiff attack``; utility
  = the few-class accuracy of the run's classifier.
- federated: ``pfdiff fed`` (one α) with ``fed.dp = example`` (public encoder), ``fedavg`` and
  ``fedddpm``; claimed ε = the largest client ε; attacks on the final global denoiser (members: all
  clients' data); utility = few-class accuracy of the repaired G. The federated runs are not audited
  (the clients run the same ``DPSGD`` engine as the audited centralised training; auditing inside a
  client would need canaries on the client side — not done).

Every attack figure comes with its **control** (a denoiser trained the same way on data containing neither
the members nor the non-members, ``longtail.membership``): the target's AUC is read against the control's.

Each point is a **separate release** on the same private data, trained with its own independent noise;
releasing several of them costs their composition. ``composition`` in evidence.json composes every DP
release of the sweep: the centralised ones exactly, from the runs' privacy ledgers
(``privacy/seed*.json``, PLD/RDP/PRV via ``accounting.epsilon_all``); the federated ones per client by
basic composition of each run's per-client ε (an upper bound); and both together per private example.

Writes ``<root>/evidence.json``, ``evidence.md`` and ``privacy_utility.png``; each point is cached in
its own run directory, so a rerun resumes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pfdiff import evidence_report
from pfdiff.config import RunConfig, dump_config, load_config
from pfdiff.evidence_report import ATTACKS, eps_label
from pfdiff.runs import RunDir, atomic_write_text

INF = math.inf


def _groups(metrics: dict[str, Any]) -> dict[str, float | None]:
    return {g: m["auc"] for g, m in metrics.get("per_group", {}).items()}


def _attack_summary(results: dict[str, Any], target: str) -> dict[str, Any]:
    """The figures the table shows for ``target`` of one seed's attack results, its control's beside them."""
    r = results[target]
    c = r.get("control") or {}
    out: dict[str, Any] = {}
    for a in ATTACKS:
        ca = c.get(a, {})
        out[a] = {"auc": r[a]["auc"], "tpr_at_1pct_fpr": r[a]["tpr_at_1pct_fpr"], "per_group_auc": _groups(r[a]),
                  "control_auc": ca.get("auc"), "control_tpr_at_1pct_fpr": ca.get("tpr_at_1pct_fpr"),
                  "control_per_group_auc": _groups(ca)}
    return out | {"copy_fraction": r["copying"]["copy_fraction"], "n_members": r["n_members"],
                  "control_copy_fraction": c.get("copying", {}).get("copy_fraction"),
                  "control_trained_on": c.get("trained_on"),
                  "upstream_auc": {k: v["auc"] for k, v in r.get("upstream", {}).items()}}


# ---------------------------------------------------------------- centralised


def centralised_run(root: Path, eps: float, overrides: list[str]) -> RunDir:
    """The ``dp`` preset at ``eps`` with one seed (cached: an existing finished run is reused)."""
    from pfdiff.longtail.pipeline import run_experiment

    path = root / f"central-eps{eps_label(eps)}"
    cfg = load_config("dp", ["seeds=[0]", "methods=[ldmlr,dp-ldmlr]", f"privacy.target_epsilon={eps}",
                             f"name=central-eps{eps_label(eps)}", *overrides])
    if (path / "results.json").exists():
        return RunDir.open(path)
    run = RunDir.open(path) if path.exists() else _create(cfg, path)
    run_experiment(cfg, run)
    return run


def _create(cfg: RunConfig, path: Path) -> RunDir:
    """A run directory at a fixed path (``RunDir.create`` adds a timestamp; the sweep needs to find it again)."""
    path.mkdir(parents=True)
    atomic_write_text(path / "config.yaml", dump_config(cfg))
    return RunDir.open(path)


def centralised_points(root: Path, epsilons: list[float], overrides: list[str], audit_canaries: int
                       ) -> list[dict[str, Any]]:
    from pfdiff.longtail.membership import attack_run

    finite = [e for e in epsilons if not math.isinf(e)] or [10.0]
    points = []
    for eps in finite:
        run = centralised_run(root, eps, overrides)
        res, att = run.read_json("results.json"), attack_run(run.path, ATTACKS)
        att.pop("roc_curves")
        priv = res["per_seed"][0]["diagnostics"]["privacy"]
        audit = audit_point(root, eps, overrides, audit_canaries)
        if eps in epsilons:
            points.append({"setting": "centralised", "epsilon": eps, "claimed_epsilon": priv["epsilon"]["pld"],
                           "audit": audit, "attacks": _attack_summary(att["seeds"]["0"], "dp-ldmlr"),
                           "few": res["methods"]["dp-ldmlr"]["few"]["mean"],
                           "top1": res["methods"]["dp-ldmlr"]["top1"]["mean"], "run_dir": str(run.path)})
        if INF in epsilons and eps == finite[-1]:  # the non-private denoiser of the same run, same members
            points.append({"setting": "centralised", "epsilon": INF, "claimed_epsilon": INF, "audit": None,
                           "attacks": _attack_summary(att["seeds"]["0"], "ldmlr"),
                           "few": res["methods"]["ldmlr"]["few"]["mean"], "top1": res["methods"]["ldmlr"]["top1"]["mean"],
                           "run_dir": str(run.path)})
    return points


def audit_point(root: Path, eps: float, overrides: list[str], canaries: int) -> dict[str, Any] | None:
    """One-run audit of the DP denoiser training at ``eps``, cached in ``audit-eps…/`` (∞: no claim to audit)."""
    if canaries <= 0 or math.isinf(eps):
        return None
    from pfdiff.longtail.private_audit import audit_config, run_audit

    out = root / f"audit-eps{eps_label(eps)}"
    if (out / "audit.json").exists():
        return json.loads((out / "audit.json").read_text())
    return run_audit(audit_config("dp", [*overrides, f"privacy.target_epsilon={eps}"]), canaries, seed=0, out_dir=out)


# ---------------------------------------------------------------- federated


def federated_points(root: Path, epsilons: list[float], fed_overrides: list[str]) -> list[dict[str, Any]]:
    from pfdiff.federated.attack import attack_fed_targets
    from pfdiff.federated.simulation import simulate

    points = []
    for eps in epsilons:
        dp = [] if math.isinf(eps) else ["fed.dp=example", f"privacy.target_epsilon={eps}"]
        cfg = load_config("federated", ["fed.encoder=public", "fed.methods=[fedavg,fedddpm]", "fed.alpha=0.5",
                                        *dp, *fed_overrides])
        run_dir = root / f"fed-eps{eps_label(eps)}"
        done = run_dir / "results.json"
        res = json.loads(done.read_text()) if done.exists() else simulate(cfg, run_dir)
        attacked = attack_fed_targets(run_dir, cfg, ATTACKS)["seeds"]["0"]
        for m in ("fedavg", "fedddpm"):
            claimed = INF if math.isinf(eps) else max(c["epsilon"] for c in res["privacy"]["methods"][m].values())
            points.append({"setting": f"federated {m}", "epsilon": eps, "claimed_epsilon": claimed, "audit": None,
                           "attacks": _attack_summary(attacked, f"fed-{m}"),
                           "few": res["methods"][m]["repair"]["few"], "top1": res["methods"][m]["repair"]["top1"],
                           "fd": res["methods"][m]["fd"], "run_dir": str(run_dir)})
    return points


# ---------------------------------------------------------------- composition of the sweep's releases


def read_ledger(path: Path) -> dict[str, Any]:
    """One privacy ledger (``privacy/seedN.json``): its δ, whether its noise was private, its events."""
    from dataclasses import fields

    from pfdiff.privacy.accounting import GaussianEvent

    keys = {f.name for f in fields(GaussianEvent)}
    try:
        data = json.loads(Path(path).read_text())
        events = [GaussianEvent(**{k: v for k, v in e.items() if k in keys}) for e in data["entries"]]
        return {"path": str(path), "delta": float(data["delta"]), "private": data.get("private", True) is True,
                "events": events}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"privacy ledger {path} is unreadable ({err}); cannot compose the sweep's releases") from err


def _dp_dirs(points: list[dict[str, Any]], federated: bool) -> list[Path]:
    return sorted({Path(p["run_dir"]) for p in points if "run_dir" in p and not math.isinf(p["epsilon"])
                   and p["setting"].startswith("federated") == federated})


def centralised_composition(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Exact composition (``accounting.epsilon_all``) of every ledger event of the sweep's centralised DP runs:
    they all train on the same private part, with independent noise, so their guarantees compose. Evaluated at
    the largest ledger δ (all equal in a normal sweep)."""
    from pfdiff.privacy.accounting import epsilon, epsilon_all

    ledgers = [read_ledger(f) for d in _dp_dirs(points, False) for f in sorted((d / "privacy").glob("seed*.json"))]
    if not ledgers:
        return None
    delta = max(led["delta"] for led in ledgers)
    events = [e for led in ledgers for e in led["events"]]
    return {"releases": [{"ledger": led["path"], "epsilon_pld": epsilon(led["events"], delta)} for led in ledgers],
            "delta": delta, "epsilon": epsilon_all(events, delta), "events": len(events),
            "private": all(led["private"] for led in ledgers),
            "method": "exact composition of every ledger event (PLD; RDP and PRV as cross-checks)"}


def _run_client_epsilon(privacy: dict[str, Any]) -> dict[str, float]:
    """One federated run's ε per client for all its methods together: the run's own composition when it
    reports one, else the sum of its per-method ε (basic composition, an upper bound)."""
    composed = privacy.get("composed_over_methods")
    if composed:
        return {str(k): float(v) for k, v in composed.items()}
    out: dict[str, float] = {}
    for per_client in privacy["methods"].values():
        for pid, c in per_client.items():
            out[str(pid)] = out.get(str(pid), 0.0) + float(c["epsilon"])
    return out


def federated_composition(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Per client, basic composition (Σε, Σδ) over the sweep's federated DP runs (each run: all its methods
    together). An upper bound: the runs' events are not re-composed exactly."""
    per_client: dict[str, float] = {}
    deltas, private = [], True
    for d in _dp_dirs(points, True):
        priv = json.loads((d / "results.json").read_text())["privacy"]
        if priv.get("mode") != "example":
            continue
        for pid, e in _run_client_epsilon(priv).items():
            per_client[pid] = per_client.get(pid, 0.0) + e
        deltas.append(float(priv["delta"]))
        private = private and priv.get("private", True) is True
    if not deltas:
        return None
    return {"per_client_epsilon": per_client, "epsilon": max(per_client.values()), "delta": sum(deltas),
            "runs": len(deltas), "private": private,
            "method": "basic composition (Σε, Σδ) of each run's per-client ε (all its methods together)"}


def sweep_composition(points: list[dict[str, Any]]) -> dict[str, Any]:
    """ε of releasing every model of the sweep: centralised, federated, and both (for a private example that
    is in the centralised private part and in a client — the same examples when both use the same data
    config — basic composition of the two), plus the releases made without DP (which make the total ∞)."""
    central, fed = centralised_composition(points), federated_composition(points)
    parts = ([(central["epsilon"]["pld"], central["delta"])] if central else []) + \
            ([(fed["epsilon"], fed["delta"])] if fed else [])
    out: dict[str, Any] = {"centralised": central, "federated": fed,
                           "non_private_releases": [p["setting"] for p in points if math.isinf(p["epsilon"])]}
    if parts:
        out["all_dp"] = {"epsilon": sum(e for e, _ in parts), "delta": sum(d for _, d in parts),
                         "private": all(c["private"] for c in (central, fed) if c),
                         "method": "basic composition of the centralised and the federated totals"}
    return out


def write_evidence(root: Path, points: list[dict[str, Any]]) -> Path:
    """evidence.json, evidence.md and privacy_utility.png of the sweep (``evidence_report``)."""
    return evidence_report.write_evidence(root, points, sweep_composition(points))


def run_sweep(root: Path, epsilons: list[float], central_overrides: list[str], fed_overrides: list[str],
              audit_canaries: int = 1000, federated: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    points = centralised_points(root, epsilons, central_overrides, audit_canaries)
    if federated:
        points += federated_points(root, epsilons, fed_overrides)
    return write_evidence(root, points)
