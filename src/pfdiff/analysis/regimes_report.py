"""Plots and ``regimes.md`` of ``pfdiff regimes`` (from the results dict of ``regimes_run.run_regimes``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from pfdiff.report import plt, save_fig
from pfdiff.text import plural


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "∞" if v == math.inf else ("nan" if math.isnan(v) else f"{v:.{nd}f}")
    return str(v)


def _class_tc(res: dict[str, Any]) -> dict[str, dict]:
    return {k: v for k, v in res["collapse_theory"]["groups"].items() if k != "all" and "t_C" in v}


def _median_finite(vals) -> float:
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    return float(np.median(vals)) if vals else math.nan


def collapse_summary(res: dict[str, Any]) -> dict[str, float]:
    """Median over classes of the Monte Carlo and formula t_C, their finite range, and the whole-set values."""
    cls = _class_tc(res)
    mc = [v["t_C"] for v in cls.values()]
    fin = [v for v in mc if math.isfinite(v)]
    whole = res["collapse_theory"]["groups"]["all"]
    return {"t_C_median": _median_finite(mc), "t_C_formula_median": _median_finite([v["t_C_formula"] for v in cls.values()]),
            "t_C_min": min(fin) if fin else math.nan, "t_C_max": max(fin) if fin else math.nan,
            "classes_collapsed_everywhere": sum(1 for v in mc if v == math.inf),
            "t_C_all": whole.get("t_C", math.nan), "t_C_formula_all": whole.get("t_C_formula", math.nan)}


def _step(sched: dict[str, Any], t: float) -> str:
    from pfdiff.analysis.regimes import step_at_ou_time
    from pfdiff.diffusion import make_schedule

    return str(step_at_ou_time(make_schedule(sched["name"], sched["T"]), t)) if math.isfinite(t) else "–"


def plot_dataset(name: str, res: dict[str, Any], path: Path) -> Path:
    """Top: cloning probability φ(t) and collapse share vs OU time with t_S and t_C; bottom: f^e(t) per class."""
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(7.2, 6.4), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    cl, co = res["cloning"], res["collapse"]
    ax.errorbar(cl["t"], cl["phi"], yerr=cl["se"], marker="o", ms=4, capsize=2, color="tab:blue",
                label="cloning: P(two clones end in the same class)")
    ax.plot(co["t"], co["copy_share"], marker="s", ms=4, color="tab:red",
            label="collapse: share of held-out probes ending on a training point")
    ax.axhline(res["prior_same_class"], color="tab:blue", ls=":", lw=0.8, label="Σπ² (classes independent)")
    spec, meas, cs = res["speciation_theory"], res["speciation_measured"], collapse_summary(res)
    for a in (ax, bx):
        a.axvline(spec["t_S"], color="k", lw=1.4)
        if math.isfinite(cs["t_C_median"]):
            a.axvline(cs["t_C_median"], color="tab:red", lw=1.4)
        if math.isfinite(cs["t_C_min"]) and cs["t_C_max"] > cs["t_C_min"]:
            a.axvspan(cs["t_C_min"], cs["t_C_max"], color="tab:red", alpha=0.08)
        if math.isfinite(cs["t_C_formula_median"]):
            a.axvline(cs["t_C_formula_median"], color="tab:red", ls="--", lw=1)
    if math.isfinite(meas["t_S"]):
        ax.axvline(meas["t_S"], color="tab:blue", ls="--", lw=1)
    handles = [plt.Line2D([], [], color="k", lw=1.4, label=f"t_S = ½ log Λ = {spec['t_S']:.2f}"),
               plt.Line2D([], [], color="tab:blue", ls="--", label=f"t_S measured (midpoint) = {_fmt(meas['t_S'], 2)}"),
               plt.Line2D([], [], color="tab:red", lw=1.4, label=f"t_C (f^e = 0), class median = {_fmt(cs['t_C_median'], 2)}"),
               plt.Line2D([], [], color="tab:red", ls="--", label=f"t_C large-d formula, median = {_fmt(cs['t_C_formula_median'], 2)}")]
    ax.legend(handles=ax.get_legend_handles_labels()[0] + handles, fontsize=7, loc="center right")
    ax.set(ylabel="probability / share", ylim=(-0.02, 1.05), title=f"Dynamical regimes: {name}")
    ax.grid(alpha=0.3)
    sched = res["schedule"]
    from pfdiff.analysis.regimes import ou_times
    from pfdiff.diffusion import make_schedule

    grid = ou_times(make_schedule(sched["name"], sched["T"]))
    top = ax.secondary_xaxis("top", functions=(lambda t: np.interp(t, grid, np.arange(len(grid))),
                                               lambda k: np.interp(k, np.arange(len(grid)), grid)))
    t_top = float(min(grid[-1], max(cl["t"])))  # steps at 5 evenly spaced OU times, rounded to tens
    top.set_xticks(sorted({int(round(float(np.interp(v, grid, np.arange(len(grid)))), -1))
                           for v in np.linspace(0.5, t_top, 5)}))
    top.set_xlabel(f"step of the {sched['name']} schedule (T = {sched['T']})", fontsize=8)
    th = res["collapse_theory"]
    t = np.array(th["ou_t"])
    cmap = plt.get_cmap("viridis")
    cls = _class_tc(res)
    nmax = max(v["n"] for v in cls.values()) if cls else 1
    for k, v in cls.items():
        bx.plot(t, v["excess_entropy"], lw=0.9, color=cmap(math.log(v["n"]) / math.log(max(nmax, 2))),
                label=f"class {k} (n={v['n']})")
    if "excess_entropy" in th["groups"]["all"]:
        bx.plot(t, th["groups"]["all"]["excess_entropy"], color="k", lw=1.6, label=f"all (n={th['groups']['all']['n']})")
    bx.axhline(0, color="grey", lw=0.8)
    lo = min(min(v["excess_entropy"]) for v in [*cls.values(), th["groups"]["all"]] if "excess_entropy" in v)
    bx.set(xlabel="forward OU time t = −½ log ᾱ", ylabel="excess entropy f^e(t)", ylim=(max(lo, -1.0), None))
    bx.grid(alpha=0.3)
    bx.legend(fontsize=6, ncol=3, loc="lower right")
    fig.tight_layout()
    return save_fig(fig, path)


def plot_collapse_vs_n(sweep: dict[str, Any], path: Path) -> Path:
    """Left: attack AUC and generated copy share vs n per class; right: collapse curves per n."""
    rows = sweep["rows"]
    n = [r["n_per_class"] for r in rows]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in rows[0]["auc"]:
        ax.plot(n, [r["auc"][name] for r in rows], marker="o", label=f"AUC {name}")
    ax.plot(n, [r["generated_copy_share"] for r in rows], marker="s", color="tab:red", label="copy share of samples")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="training examples per class n", ylabel="AUC / share", ylim=(0, 1.02), title="memorisation vs n")
    ax.set_xticks(n, [str(v) for v in n])
    ax.minorticks_off()
    ax2 = ax.twinx()
    ax2.plot(n, [r["t_C_median"] for r in rows], color="k", ls="--", marker="^", label="t_C (f^e = 0), median class")
    ax2.plot(n, [r["t_C_formula_median"] for r in rows], color="k", ls=":", marker="v", label="t_C formula")
    ax2.set_ylabel("collapse time t_C")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    for r in rows:
        c = r["collapse_curve"]
        line, = bx.plot(c["t"], c["copy_share"], marker="o", ms=3, label=f"n = {r['n_per_class']}")
        if math.isfinite(r["t_C_median"]):
            bx.axvline(r["t_C_median"], color=line.get_color(), ls="--", lw=0.8)
    bx.set(xlabel="forward OU time t", ylabel="share of probes ending on a training point", ylim=(-0.02, 1.02),
           title="collapse curves (dashed: t_C)")
    bx.grid(alpha=0.3)
    bx.legend(fontsize=7)
    fig.tight_layout()
    return save_fig(fig, path)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]]


def _dataset_md(name: str, res: dict[str, Any], plot: str) -> list[str]:
    # Long on purpose: one report section written top to bottom in reading order (theory, measurement,
    # collapse, placement); pieces of it would be read out of order.
    spec, meas, cs = res["speciation_theory"], res["speciation_measured"], collapse_summary(res)
    sched, ref = res["schedule"], res["placement"]["reference"]
    tmin = res["collapse_theory"]["ou_t"][0]

    def tc(v: float) -> str:  # nan: f^e ≥ 0 on the whole grid, the zero lies below its first time
        return f"< {tmin:g}" if isinstance(v, float) and math.isnan(v) else _fmt(v)

    L = [f"## {name}", "", f"Space: {res['space']}; model: {res['source']}; schedule {sched['name']} T = {sched['T']} "
         f"({sched['denoiser']}); classifier test accuracy {res['classifier_test_accuracy']:.3f}; "
         f"wall time {res['wall_seconds']:.0f} s.", "", f"![{name}]({plot})", "", "### Theory", "",
         f"- Λ (top eigenvalue of the whole-data covariance, d = {spec['d']}) = {spec['Lambda']:.3f} → "
         f"**t_S = ½ log Λ = {spec['t_S']:.3f}** (step {res['steps_of_t_S']['linear']} of linear, "
         f"{res['steps_of_t_S']['cosine']} of cosine, T = {sched['T']}); between-class Λ_B = "
         f"{_fmt(spec['Lambda_between'])} (t = {_fmt(spec['t_S_between'])}); top eigenvalues "
         f"{', '.join(f'{v:.2f}' for v in spec['top_eigenvalues'])}.",
         f"- Collapse (per class: a class-conditional model collapses within its class): t_C where f^e = 0, median "
         f"over classes **{_fmt(cs['t_C_median'])}** (range {_fmt(cs['t_C_min'])}–{_fmt(cs['t_C_max'])}; "
         f"{cs['classes_collapsed_everywhere']} class(es) with f^e < 0 on the whole grid); large-d formula median "
         f"{_fmt(cs['t_C_formula_median'])}; whole training set {_fmt(cs['t_C_all'])} (formula {_fmt(cs['t_C_formula_all'])}). "
         f"The median t_C is step {_step(sched, cs['t_C_median'])} of this schedule.",
         "", *_table(["class", "n", "σ² (tr C/d)", "t_C (f^e = 0)", "t_C formula", "Λ_c", "½ log Λ_c"],
                     [[k, v["n"], v["sigma2"], tc(v["t_C"]), v["t_C_formula"], spec["Lambda_within"].get(k),
                       spec["t_S_within"].get(k)] for k, v in _class_tc(res).items()]),
         "", "### Measured", "",
         f"- Cloning ({res['config_starts']} points × {res['config_clones']} clones per t, null label): plateaus "
         f"{meas['low']:.3f} (large t; Σπ² = {res['prior_same_class']:.3f}) and {meas['high']:.3f} (small t); "
         f"**measured t_S (midpoint) = {_fmt(meas['t_S'])}** vs ½ log Λ = {spec['t_S']:.3f}; speciation window "
         f"(10 % → 90 % of the rise) from t = {_fmt(meas['t_S_upper'])} down to {_fmt(meas.get('t_S_lower'))}.", "",
         *_table(["t", "step", "φ (cloning)", "± se", "collapse share", "median r"],
                 [[t, k, p, se, c, r] for t, k, p, se, c, r in zip(res["cloning"]["t"], res["cloning"]["step"],
                                                                    res["cloning"]["phi"], res["cloning"]["se"],
                                                                    res["collapse"]["copy_share"],
                                                                    res["collapse"]["median_ratio"])]),
         "", "### Few-step DDIM: steps around t_S vs uniform", "",
         f"Deterministic DDIM from the same noise, {res['placement_samples']} samples; t_S used = "
         f"{res['placement']['t_S']:.3f}; reference: {ref['steps']} trailing steps (conditional FD {ref['fd_test']:.3f}, "
         f"accuracy {ref['accuracy']:.3f}; unconditional class histogram TV to the prior {ref['uncond_tv_to_prior']:.3f}). "
         "Conditional (balanced labels): FD to the real test set, classifier agreement with the label, RMSE to the "
         "reference sample of the same noise (discretisation error). Unconditional (null label, the class is decided "
         "at speciation): TV distance of the class histogram to the reference sampler's and to the training prior.", "",
         *_table(["steps", "placement", "FD", "accuracy", "RMSE to ref", "uncond. RMSE to ref", "uncond. TV to ref",
                  "uncond. TV to prior", "timesteps"],
                 [[r["steps"], r["placement"], r["fd_test"], r["accuracy"], r["rmse_to_reference"],
                   r["uncond_rmse_to_reference"], r["uncond_tv_to_reference"], r["uncond_tv_to_prior"],
                   " ".join(map(str, r["timesteps"]))] for r in res["placement"]["rows"]])]
    if "promise" in res:
        p = res["promise"]
        base, rec = p["configured_S_plan"] or {}, p["recommended_S_plan"] or {}
        L += ["", "### dp-promise: where to put S", "",
              f"dp preset with dp-promise on this split: n_private = {p['n_private']}, Phase I: "
              f"{p['phase1_steps']} steps at rate {p['phase1_sample_rate']:.3f}, R = {p['feature_radius']}, target "
              f"ε = {p['target_epsilon']} at δ = {p['delta']:g}, {p['schedule']['name']} T = {p['schedule']['T']}; "
              f"upper edge of the speciation window t = {p['t_S_upper']:.3f} (measured; lower edge "
              f"{_fmt(res['speciation_measured'].get('t_S_lower'))}). Rule: {p['rule']}. "
              f"**Recommended S = {p['recommended_S']}** (the next smaller candidate fails: {p['binding_constraint']}); "
              f"smallest label-free S = {p['smallest_label_free_S']}; configured S = {p['default_S']} "
              f"(Phase-II σ₂ = {_fmt(base.get('phase2_sigma'))}); at the recommended S, σ₂ = "
              f"{_fmt(rec.get('phase2_sigma'))}. Total ε below: fixed events + Phase I at that S + Phase II with the "
              "configured S's σ₂. Label accuracy: share of class-conditional samples of the non-private denoiser, "
              "labels withheld on t ≥ S as dp-promise samples, that the classifier puts in the requested class "
              f"({p.get('label_accuracy_sampler', '–')}).", "",
              "**The Phase-I ε and 'privacy ok' columns are the paper's accounting — claimed by the paper, NOT a "
              "guarantee**: its Phase I (no clipping, no noise) separates x from −x in one use "
              "(docs/privacy_audit_cases.md). pfdiff runs Phase I as DP-SGD with one σ for both phases, so S "
              "only decides where labels are withheld (the speciation column), not what privacy costs.", "",
              *_table(["S", "t(S−1)", "t − t_S,upper", "Phase-I ε (claimed by the paper)", "total ε (σ₂ fixed)", "label-free ok", "privacy ok",
                       "label accuracy"],
                      [[r["S"], r["ou_t"], r["t_minus_t_S_upper"], r["phase1_epsilon"], r["total_epsilon_at_base_sigma2"],
                        r["label_free_ok"], r["privacy_ok"], r.get("label_accuracy_withheld_above_S")]
                       for r in p["rows"]])]
    if "collapse_vs_n" in res:
        sw = res["collapse_vs_n"]
        L += ["", "### Collapse vs n and membership inference", "",
              f"One denoiser per n ({sw['steps']} steps), members drawn from {sw['pool']}.", "",
              f"![collapse vs n]({res['sweep_plot']})", "",
              *_table(["n / class", "members", "t_C (f^e=0) median", "t_C formula median", "copy share (samples)",
                       *[f"AUC {k}" for k in sw["rows"][0]["auc"]], "pairs"],
                      [[r["n_per_class"], r["n_members"], r["t_C_median"], r["t_C_formula_median"],
                        r["generated_copy_share"], *r["auc"].values(), r["n_attack_pairs"]] for r in sw["rows"]])]
    secs = ", ".join(f"{k} {v:.0f} s" for k, v in res["seconds"].items())
    L += ["", f"Time: setup {res['setup_seconds']:.0f} s, {secs}.", ""]
    return L


def render(results: dict[str, Any], out_dir: Path) -> str:
    """Write the plots next to ``regimes.md`` and return its Markdown."""
    cfg = results["config"]
    L = ["# Dynamical regimes of diffusion (pfdiff regimes)", "",
         f"{results['paper']}. OU time t = −½ log ᾱ. Speciation: t_S = ½ log Λ; collapse: t_C where the excess entropy "
         "f^e(t) = s^sep(t) − s(t) vanishes (Monte Carlo over noised training points, leave-one-out density), and the "
         "large-d formula ½ log(1 + σ²/(n^{2/d} − 1)). Measured t_S: where the cloning probability crosses the midpoint "
         "of its plateaus.", "",
         f"Total wall time {results.get('wall_seconds', 0):.0f} s on {plural(results['threads'], 'thread')}; seed {cfg['seed']}.", ""]
    for name, res in results["datasets"].items():
        res = {**res, "config_starts": cfg["starts"], "config_clones": cfg["clones"],
               "placement_samples": cfg["samples_per_class"] * len(res["train_counts"])}
        plot = plot_dataset(name, res, out_dir / f"regimes_{name}.png").name
        if "collapse_vs_n" in res:
            res["sweep_plot"] = plot_collapse_vs_n(res["collapse_vs_n"], out_dir / f"regimes_{name}_collapse_vs_n.png").name
        L += _dataset_md(name, res, plot)
    return "\n".join(L)
