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

Writes ``<root>/evidence.json``, ``evidence.md`` and ``privacy_utility.png``; each point is cached in
its own run directory, so a rerun resumes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pfdiff.config import RunConfig, dump_config, load_config
from pfdiff.runs import RunDir, atomic_write_json, atomic_write_text

ATTACKS = ("loss", "secmi", "pia")
INF = math.inf


def _label(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


def _attack_summary(per_target: dict[str, Any]) -> dict[str, Any]:
    return {a: {"auc": per_target[a]["auc"], "tpr_at_1pct_fpr": per_target[a]["tpr_at_1pct_fpr"]} for a in ATTACKS} | {
        "copy_fraction": per_target["copying"]["copy_fraction"], "n_members": per_target["n_members"]}


# ---------------------------------------------------------------- centralised


def centralised_run(root: Path, eps: float, overrides: list[str]) -> RunDir:
    """The ``dp`` preset at ``eps`` with one seed (cached: an existing finished run is reused)."""
    from pfdiff.longtail.pipeline import run_experiment

    path = root / f"central-eps{_label(eps)}"
    cfg = load_config("dp", ["seeds=[0]", "methods=[ldmlr,dp-ldmlr]", f"privacy.target_epsilon={eps}",
                             f"name=central-eps{_label(eps)}", *overrides])
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
                           "audit": audit, "attacks": _attack_summary(att["seeds"]["0"]["dp-ldmlr"]),
                           "few": res["methods"]["dp-ldmlr"]["few"]["mean"],
                           "top1": res["methods"]["dp-ldmlr"]["top1"]["mean"]})
        if INF in epsilons and eps == finite[-1]:  # the non-private denoiser of the same run
            points.append({"setting": "centralised", "epsilon": INF, "claimed_epsilon": INF, "audit": None,
                           "attacks": _attack_summary(att["seeds"]["0"]["ldmlr"]),
                           "few": res["methods"]["ldmlr"]["few"]["mean"], "top1": res["methods"]["ldmlr"]["top1"]["mean"]})
    return points


def audit_point(root: Path, eps: float, overrides: list[str], canaries: int) -> dict[str, Any] | None:
    """One-run audit of the DP denoiser training at ``eps``, cached in ``audit-eps…/`` (∞: no claim to audit)."""
    if canaries <= 0 or math.isinf(eps):
        return None
    from pfdiff.longtail.private_audit import audit_config, run_audit

    out = root / f"audit-eps{_label(eps)}"
    if (out / "audit.json").exists():
        return json.loads((out / "audit.json").read_text())
    return run_audit(audit_config("dp", [*overrides, f"privacy.target_epsilon={eps}"]), canaries, seed=0, out_dir=out)


# ---------------------------------------------------------------- federated


def federated_points(root: Path, epsilons: list[float], fed_overrides: list[str]) -> list[dict[str, Any]]:
    from pfdiff.federated.attack import load_fed_targets
    from pfdiff.federated.simulation import simulate
    from pfdiff.longtail.membership import attack_targets

    points = []
    for eps in epsilons:
        dp = [] if math.isinf(eps) else ["fed.dp=example", f"privacy.target_epsilon={eps}"]
        cfg = load_config("federated", ["fed.encoder=public", "fed.methods=[fedavg,fedddpm]", "fed.alpha=0.5",
                                        *dp, *fed_overrides])
        run_dir = root / f"fed-eps{_label(eps)}"
        done = run_dir / "results.json"
        res = json.loads(done.read_text()) if done.exists() else simulate(cfg, run_dir)
        attacked, _ = attack_targets(load_fed_targets(run_dir), cfg, 0, ATTACKS)
        for m in ("fedavg", "fedddpm"):
            claimed = INF if math.isinf(eps) else max(c["epsilon"] for c in res["privacy"]["methods"][m].values())
            points.append({"setting": f"federated {m}", "epsilon": eps, "claimed_epsilon": claimed, "audit": None,
                           "attacks": _attack_summary(attacked[f"fed-{m}"]),
                           "few": res["methods"][m]["repair"]["few"], "top1": res["methods"][m]["repair"]["top1"],
                           "fd": res["methods"][m]["fd"]})
    return points


# ---------------------------------------------------------------- report


def _fmt_eps(e: float | None) -> str:
    if e is None:
        return "–"
    return "∞" if math.isinf(e) or e > 1e4 else f"{e:.2f}"


def evidence_table(points: list[dict[str, Any]]) -> str:
    from pfdiff.report import markdown_table

    header = ["setting", "target ε", "claimed ε (PLD)", "audited ε lower bound (95 %)",
              *[f"{a} AUC / TPR@1%" for a in ATTACKS], "copies", "few", "top1"]
    rows = []
    for p in points:
        au = p["audit"]
        rows.append([p["setting"], _fmt_eps(p["epsilon"]), _fmt_eps(p["claimed_epsilon"]),
                     "–" if au is None else f"{au['epsilon_lower']:.2f} (m = {au['canaries']}, {au.get('seconds', float('nan')):.0f} s)",
                     *[f"{p['attacks'][a]['auc']:.3f} / {p['attacks'][a]['tpr_at_1pct_fpr']:.3f}" for a in ATTACKS],
                     f"{p['attacks']['copy_fraction']:.3f}", f"{p['few']:.3f}", f"{p['top1']:.3f}"])
    return markdown_table(header, rows)


def plot_privacy_utility(points: list[dict[str, Any]], path: Path) -> Path:
    """Attack AUC (x, best of the attacks) against few-class accuracy (y), one line per setting, ε annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pfdiff.report import save_fig

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for setting in dict.fromkeys(p["setting"] for p in points):
        pts = sorted((p for p in points if p["setting"] == setting), key=lambda p: p["epsilon"])
        x = [max(p["attacks"][a]["auc"] for a in ATTACKS) for p in pts]
        y = [p["few"] for p in pts]
        ax.plot(x, y, "o-", label=setting)
        for i, (xi, yi, p) in enumerate(zip(x, y, pts)):
            label = "∞" if math.isinf(p["epsilon"]) else f"{p['epsilon']:g}"
            ax.annotate(f"ε={label}", (xi, yi), textcoords="offset points", xytext=(4, 4 - 12 * (i % 2)), fontsize=8)
    ax.axvline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("best membership-attack AUC (0.5: no leak)")
    ax.set_ylabel("few-class accuracy")
    ax.set_title("privacy against utility (digits-LT)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_fig(fig, path)


def write_evidence(root: Path, points: list[dict[str, Any]]) -> Path:
    atomic_write_json(root / "evidence.json", {"points": [{**p, "epsilon": _label(p["epsilon"]),
                                                            "claimed_epsilon": None if math.isinf(p["claimed_epsilon"])
                                                            else p["claimed_epsilon"]} for p in points]})
    plot_privacy_utility(points, root / "privacy_utility.png")
    md = ["# Privacy evidence: claimed ε, audited lower bound, attacks, utility", "",
          "Attacks: members are the training examples of the attacked denoiser, non-members held-out examples of "
          "the same classes (balanced per class). Audit: one training run of the DP denoiser code with canaries "
          "included w.p. ½ (Steinke, Nasr & Jagielski 2023); a lower bound above the claimed ε would expose a "
          "broken implementation or accountant.", "", evidence_table(points), "",
          "![privacy against utility](privacy_utility.png)", ""]
    atomic_write_text(root / "evidence.md", "\n".join(md))
    return root / "evidence.md"


def run_sweep(root: Path, epsilons: list[float], central_overrides: list[str], fed_overrides: list[str],
              audit_canaries: int = 1000, federated: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    points = centralised_points(root, epsilons, central_overrides, audit_canaries)
    if federated:
        points += federated_points(root, epsilons, fed_overrides)
    return write_evidence(root, points)
