"""The report of the privacy evidence sweep (``pfdiff evidence``): evidence.json, evidence.md, privacy_utility.png.

Only formats what ``pfdiff.evidence`` measured and composed (see that module for what each point means).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pfdiff.runs import atomic_write_json, atomic_write_text
from pfdiff.text import plural

ATTACKS = ("loss", "secmi", "pia")  # the attacks of every point, in table order
INF = math.inf


def eps_label(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


def composition_markdown(comp: dict[str, Any]) -> list[str]:
    md = ["## Composition: every release of the sweep", "",
          "Each row of the table above is a separate release trained on the same private data (every DP row with "
          "its own, independent noise), and each claims its ε alone. Releasing several of them costs their "
          "composition:", ""]
    c, f, a = comp.get("centralised"), comp.get("federated"), comp.get("all_dp")
    flag = lambda x: "" if x["private"] else " — **NOT PRIVATE: reproducible (seed-derived) noise**"  # noqa: E731
    if c:
        e = c["epsilon"]
        md.append(f"- centralised DP releases ({plural(len(c['releases']), 'ledger')}, "
                  f"{plural(c['events'], 'event')}): PLD ε = "
                  f"{e['pld']:.3f} (RDP {e['rdp']:.3f}, PRV {e['prv']:.3f}) at δ = {c['delta']:g}, exact composition"
                  f"{flag(c)}")
    if f:
        md.append(f"- federated DP releases ({plural(f['runs'], 'run')}): ε ≤ {f['epsilon']:.3f} for the worst client at "
                  f"δ = {f['delta']:g} (basic composition of each run's per-client ε){flag(f)}")
    if a:
        md.append(f"- all DP releases together, for an example in both the centralised private part and a client: "
                  f"ε ≤ {a['epsilon']:.3f} at δ = {a['delta']:g} (basic composition){flag(a)}")
    if comp.get("non_private_releases"):
        md.append(f"- released without DP (ε = ∞ rows: {', '.join(comp['non_private_releases'])}): with them the "
                  "total is ∞")
    return md + [""]


# ---------------------------------------------------------------- report


def _fmt_eps(e: float | None) -> str:
    if e is None:
        return "–"
    return "∞" if math.isinf(e) or e > 1e4 else f"{e:.2f}"


def _with_control(a: dict[str, Any]) -> str:
    ctrl = "–" if a.get("control_auc") is None else f"{a['control_auc']:.3f}"
    return f"{a['auc']:.3f} / {a['tpr_at_1pct_fpr']:.3f} ({ctrl})"


def _upstream(p: dict[str, Any]) -> str:
    up = p["attacks"].get("upstream_auc") or {}
    return " / ".join("–" if up.get(k) is None else f"{up[k]:.3f}" for k in ("feature_norm", "stage1_loss"))


def evidence_table(points: list[dict[str, Any]]) -> str:
    """One row per release: ε claimed and audited, each attack's AUC / TPR@1%FPR with the control's AUC in
    brackets, the no-denoiser statistics, copies and utility."""
    from pfdiff.report import markdown_table

    header = ["release", "setting", "target ε", "claimed ε (PLD)", "audited ε lower bound (95 %)",
              *[f"{a} AUC / TPR@1% (control AUC)" for a in ATTACKS], "no-denoiser AUC (norm / G loss)",
              "copies", "few", "top1"]
    rows = []
    for i, p in enumerate(points, 1):
        au = p["audit"]
        rows.append([f"#{i}", p["setting"], _fmt_eps(p["epsilon"]), _fmt_eps(p["claimed_epsilon"]),
                     "–" if au is None else f"{au['epsilon_lower']:.2f} (m = {au['canaries']}, {au.get('seconds', float('nan')):.0f} s)",
                     *[_with_control(p["attacks"][a]) for a in ATTACKS], _upstream(p),
                     f"{p['attacks']['copy_fraction']:.3f}", f"{p['few']:.3f}", f"{p['top1']:.3f}"])
    return markdown_table(header, rows)


def _auc(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def group_table(points: list[dict[str, Any]]) -> str:
    """Per class group (many / medium / few): each attack's AUC, the control's in brackets."""
    from pfdiff.report import markdown_table

    groups = ("many", "medium", "few")
    rows = []
    for i, p in enumerate(points, 1):
        for a in ATTACKS:
            t, c = p["attacks"][a].get("per_group_auc") or {}, p["attacks"][a].get("control_per_group_auc") or {}
            cells = [f"{_auc(t.get(g))} ({_auc(c.get(g))})" for g in groups]
            rows.append([f"#{i}", p["setting"], _fmt_eps(p["epsilon"]), a, *cells])
    return markdown_table(["release", "setting", "target ε", "attack", *[f"{g} AUC (control)" for g in groups]], rows)


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


def _json_point(p: dict[str, Any]) -> dict[str, Any]:
    return {**p, "epsilon": eps_label(p["epsilon"]),
            "claimed_epsilon": None if math.isinf(p["claimed_epsilon"]) else p["claimed_epsilon"]}


def write_evidence(root: Path, points: list[dict[str, Any]], comp: dict[str, Any]) -> Path:
    atomic_write_json(root / "evidence.json", {"points": [_json_point(p) for p in points], "composition": comp})
    plot_privacy_utility(points, root / "privacy_utility.png")
    md = ["# Privacy evidence: claimed ε, audited lower bound, attacks, utility", "",
          "Attacks: members are the training examples of the attacked denoiser, non-members examples nothing was "
          "trained on (the held-out pool and half of the test split), balanced per class; the ε = ∞ and DP "
          "centralised rows attack the same private members. In brackets: the AUC of the **control**, a "
          "denoiser trained the same way on data containing neither set — what no membership signal looks like through this pipeline. No-denoiser AUC: the raw "
          "feature norm and the stage-1 classifier loss as attack scores (≈ 0.5: the encoder treats members and "
          "non-members alike). Audit: one training run of the DP denoiser code with canaries included w.p. ½ "
          "(Steinke, Nasr & Jagielski 2023); a lower bound above the claimed ε would expose a broken "
          "implementation or accountant.", "",
          "**Each row is a separate release** (#) trained on the same private data, every DP row with its own, "
          "independent noise; its ε is for that release alone — the composition of all of them is below.", "",
          evidence_table(points), "", "Per class group (training-count groups of the split):", "",
          group_table(points), "", *composition_markdown(comp),
          "![privacy against utility](privacy_utility.png)", ""]
    atomic_write_text(root / "evidence.md", "\n".join(md))
    return root / "evidence.md"
