"""report.md and PNG plots of a run directory; ``pfdiff report RUN_DIR`` re-renders them from disk."""

from __future__ import annotations

import json

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402

from pfdiff.data.longtail import GROUPS  # noqa: E402
from pfdiff.runs import RunDir, atomic_write_bytes, atomic_write_text  # noqa: E402
from pfdiff.text import plural  # noqa: E402


def save_fig(fig, path: Path) -> Path:
    """Save ``fig`` as PNG atomically (rendered in memory, then written with a rename) and close it."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def n_runs(results: dict) -> int:
    """How many (split seed, seed) runs the means of ``results`` are over."""
    return len(results.get("per_seed") or results.get("seeds") or [])


def mean_spread(cell: dict, n: int, fmt: str = ".3f", why: bool = True) -> str:
    """``"mean ± std"``; with one run there is no spread: ``"mean ± n/a (1 seed)"`` (``why=False``: without
    the parenthesis, for a table whose title says it), never a ``± 0.000``."""
    spread = format(cell["std"], fmt) if n >= 2 else "n/a (1 seed)" if why else "n/a"
    return f"{cell['mean']:{fmt}} ± {spread}"


def plot_per_class(results: dict, path: Path) -> Path:
    """Per-class test accuracy of each method, classes ordered by training count (head → tail)."""
    split = results["split"]
    counts = np.array(split.get("train_counts") or split["public_counts"])  # private runs: public part only
    order = np.argsort(-counts, kind="stable")
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(order) + 2), 3.8))
    for method, row in results["methods"].items():
        acc = np.array(row["per_class"], dtype=float)[order]
        ax.plot(range(len(order)), acc, marker="o", label=method)
    ax.set_xticks(range(len(order)), [f"{c}\n(n={counts[c]})" for c in order], fontsize=7)
    ax.set_xlabel("class (training examples)" if "train_counts" in split else "class (public training examples)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Per-class accuracy, mean of {plural(n_runs(results), 'run')}")
    return save_fig(fig, path)


MIN_CURVE_POINTS = 2  # a stage logged fewer times than this (one point: a dot, no curve) gets no panel


def stage_losses(metrics: list[dict], seed: int) -> dict[str, list[tuple[int, float]]]:
    """(step, loss) points of every training stage of one seed, stages in the order they were logged."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in metrics:
        if r.get("seed") == seed and "stage" in r and "loss" in r:
            out.setdefault(r["stage"], []).append((r["step"], r["loss"]))
    return out


def short_stages(metrics: list[dict], seed: int) -> list[str]:
    """The stages of one seed logged too few times for a curve (they have no panel in training_curves.png)."""
    return [s for s, pts in stage_losses(metrics, seed).items() if len(pts) < MIN_CURVE_POINTS]


def plot_training_curves(metrics: list[dict], seed: int, path: Path) -> Path | None:
    """Loss against step for every training stage of one seed that has a curve; None (no figure) when none has."""
    curves = {s: pts for s, pts in stage_losses(metrics, seed).items() if len(pts) >= MIN_CURVE_POINTS}
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 3), squeeze=False)
    for ax, (stage, pts) in zip(axes[0], curves.items()):
        ax.plot(*zip(*pts))
        ax.set_title(stage.split("· ", 1)[-1], fontsize=9)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training loss")
    return save_fig(fig, path)


def plot_projection(features_file: Path, path: Path, max_classes: int = 10) -> Path | None:
    """2-D PCA (fitted on real features) of real vs pseudo features, one panel per class."""
    if not features_file.exists():
        return None
    f = load_file(str(features_file))
    pca = PCA(2).fit(f["z_real"])
    real, fake = pca.transform(f["z_real"]), pca.transform(f["z_pseudo"]) if len(f["z_pseudo"]) else None
    classes = np.unique(f["y_real"])
    shown = classes[np.unique(np.linspace(0, len(classes) - 1, min(max_classes, len(classes))).round().astype(int))]
    cols = min(5, len(shown))
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.5 * rows), squeeze=False, sharex=True, sharey=True)
    for ax, c in zip(axes.flat, shown):
        ax.scatter(*real.T, s=2, c="0.85")
        if fake is not None:
            pf = fake[f["y_pseudo"] == c]
            ax.scatter(*pf.T, s=6, marker="x", c="tab:orange", label=f"pseudo ({len(pf)})")
        pr = real[f["y_real"] == c]
        ax.scatter(*pr.T, s=10, c="tab:blue", label=f"real ({len(pr)})")
        ax.set_title(f"class {c}", fontsize=9)
        ax.legend(fontsize=6, loc="best")
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.suptitle("Real vs pseudo features (PCA of real features)", fontsize=10)
    return save_fig(fig, path)


def plot_drift(metrics: list[dict], path: Path) -> Path | None:
    """Mean per-class Fréchet distance of pseudo- to current real features against training step."""
    key = "frechet_rel" if any("frechet_rel" in r for r in metrics if r.get("event") == "drift") else "frechet"
    rows = [r for r in metrics if r.get("event") == "drift" and r.get(key) is not None]
    methods = list(dict.fromkeys(r["method"] for r in rows if "method" in r))
    if not methods:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for method in methods:
        by_step: dict[int, list[float]] = {}
        for r in rows:
            if r.get("method") == method:
                by_step.setdefault(r["step"], []).append(r[key])
        steps = sorted(by_step)
        mean = [float(np.nanmean(by_step[s])) for s in steps]
        if len(steps) == 1:  # frozen encoder: the drift stays at its value when sampled
            ax.axhline(mean[0], ls="--", c="k", lw=1, label=f"{method} (frozen E)")
        else:
            ax.plot(steps, mean, marker=".", label=method)
    ax.set_xlabel("training step of the method")
    ax.set_ylabel("mean per-class FD(pseudo, current real)" + (" / tr Cov(real)" if key == "frechet_rel" else ""))
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Drift of pseudo-features from the current real features (mean over seeds)", fontsize=9)
    return save_fig(fig, path)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table: one header row, a ``|---|`` separator, one line per row (cells via ``str``)."""
    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(c) for c in cells) + " |"

    return "\n".join([line(header), "|---" * len(header) + "|", *(line(r) for r in rows)])


# balanced accuracy sits right beside few: a method can win "few" by giving up the head (over-correction)
TABLE_COLUMNS = ("top1", *GROUPS, "balanced")


def _label(method: str, results: dict) -> str:
    """The method's name, marked where its generation branch produced nothing (every sample filtered out):
    such a row is not a test of generation."""
    f = results.get("e2e", {}).get(method.partition("+")[0], {}).get("filter")
    if f and f.get("no_generation_runs"):
        return f"{method} (no generation in {plural(f['no_generation_runs'], 'run')})"
    return method


def results_table(results: dict) -> str:
    """Accuracy per group with balanced beside few, and the budget: encoder optimiser steps and wall seconds."""
    n = n_runs(results)
    rows = [[_label(method, results), *(mean_spread(row[c], n) for c in TABLE_COLUMNS),
             f"{row['encoder_steps']['mean']:.0f}" if "encoder_steps" in row else "–",
             f"{row['seconds']['mean']:.1f}" if "seconds" in row else "–"]
            for method, row in results["methods"].items()]
    return markdown_table(["method", *TABLE_COLUMNS, "E steps", "seconds"], rows)


def e2e_section(results: dict) -> list[str]:
    """Per E2E variant: gradient routing, warm start, steps, each term's share of L_total, filter kept fraction."""
    e2e = results.get("e2e")
    if not e2e:
        return []
    rows = []
    for name, d in e2e.items():
        r = d["routing"]
        routing = "coupled" if all(r.values()) else ("detached" if not any(r.values()) else
                                                     ", ".join(k for k, v in r.items() if v))
        f = d.get("filter")
        kept = "–" if not f else ("–" if f["kept_fraction"] is None else f"{f['kept_fraction']:.2f}")
        rows.append([name, routing, d.get("warm_start") or "none", d["steps"],
                     *(f"{d['loss_shares'].get(k, 0.0):.3f}" for k in ("real", "ldm", "proto", "shape", "ge")), kept])
    return ["", "## End-to-end variants", "",
            "Routing: which gradients of the coupled objective were on (L_LDM → E, L_ge → θ through the sampler, "
            "L_ge → E through the scaler's batch statistics). Shares: Σ|weighted term| over the run's steps / Σ of "
            "all terms (mean over runs). Kept: fraction of on-the-fly pseudo-features the filter kept.", "",
            markdown_table(["variant", "routing", "warm start", "steps", "real", "ldm", "proto", "shape", "ge", "kept"],
                           rows)]


def group_mean(values: list[float | None], classes: list[int]) -> float | None:
    """Mean of per-class ``values`` over ``classes`` (skipping None); None when nothing is left."""
    vals = [values[c] for c in classes if values[c] is not None]
    return float(np.mean(vals)) if vals else None


def coverage_section(results: dict) -> list[str]:
    """Coverage of held-out features per group: recall of the pseudo-features vs that of the training features."""
    cov = results.get("coverage")
    if not cov:
        return []
    g = results["split"]["groups"]
    rows = []
    for name, c in cov.items():
        cells = []
        for group in ("many", "few"):
            classes = g[group]
            vals = [group_mean(c[k], classes) for k in ("precision", "recall", "recall_train")]
            cells += ["–" if v is None else f"{v:.2f}" for v in vals]
        rows.append([name, *cells])
    return ["", "## Coverage of held-out (validation) features", "",
            "Improved precision / recall (Kynkäänniemi et al. 2019, k-NN manifolds) of each method's class-balanced "
            "pseudo-features against the validation features of the same class and encoder; `train recall` is the "
            "recall of the class's own training features — what copying them would give. A generator adds coverage "
            "only where its recall exceeds it. Means over the classes of each group and over runs.", "",
            markdown_table(["method", "many precision", "many recall", "many train recall",
                            "few precision", "few recall", "few train recall"], rows)]


def plot_coverage(results: dict, path: Path) -> Path | None:
    """Per-class recall of held-out features by each method's pseudo-features, and by the training features."""
    cov = results.get("coverage")
    if not cov:
        return None
    C = results["split"]["num_classes"]
    fig, ax = plt.subplots(figsize=(max(6.5, 0.5 * C), 3.8))
    x = np.arange(C)
    for name, c in cov.items():
        ax.plot(x, [np.nan if v is None else v for v in c["recall"]], marker="o", label=f"{name} pseudo")
    first = next(iter(cov.values()))
    ax.plot(x, [np.nan if v is None else v for v in first["recall_train"]], "k--", marker="x",
            label=f"training features ({next(iter(cov))}'s encoder)")
    ax.set_xlabel("class (by training count, head → tail)")
    ax.set_ylabel("recall of validation features")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Coverage: how much of each class's held-out features the generator reaches", fontsize=9)
    return save_fig(fig, path)


BASELINES = ("ce", "logit_adjust", "ce+la", "resample")  # results written before results["baselines"] existed


def _compare(diff: float, spread: float) -> str:
    """"beats" only where the few-class difference exceeds the spread (the sum of the two stds, so that
    the mean ± std intervals do not overlap); "does not beat" where it falls below minus the spread."""
    if diff > spread:
        return "beats"
    if diff < -spread:
        return "does not beat"
    return f"is within the spread ({spread:.3f}) of"


def verdict(results: dict) -> list[str]:
    """Honest sentences: does each diffusion method beat CE and the strongest baseline on the few classes,
    and at what balanced accuracy? A claim needs a spread: with one run the numbers are given, no claim."""
    table = results["methods"]
    few = {m: r["few"]["mean"] for m, r in table.items()}
    std = {m: r["few"].get("std", 0.0) for m, r in table.items()}
    bal = {m: r["balanced"]["mean"] for m, r in table.items()}
    names = results.get("baselines", BASELINES)
    baselines = {m: v for m, v in few.items() if m in names}
    ours = [m for m in table if m not in names]
    if not baselines or not ours:
        return []
    best = max(baselines, key=baselines.get)
    n = n_runs(results)
    lines = [f"Strongest baseline on the few classes: {best} (few {baselines[best]:.3f}, balanced {bal[best]:.3f})."]
    if n < 2:
        lines.append("One run (1 seed): no spread, so no method is claimed to beat another; the differences below "
                     "are of one draw.")
    for m in ours:
        delta = f", {few[m] - few['ce']:+.3f} vs CE" if "ce" in few else ""
        claim = "" if n < 2 else f"; {_compare(few[m] - few[best], std[m] + std[best])} {best}"
        lines.append(f"- {m}: few {few[m]:.3f}{delta} (balanced {bal[m]:.3f}, {bal[m] - bal[best]:+.3f} vs {best})"
                     f"{claim}.")
    return lines


def _g(v) -> str:
    return "–" if v is None else f"{v:g}"


def _per_run(values: list) -> str:
    """One value per run, or the value once when every run has it."""
    return _g(values[0]) if len(set(values)) == 1 else ", ".join(_g(v) for v in values)


def protocol_lines(results: dict) -> list[str]:
    """How the numbers were obtained: (split seed, seed) pairs, the validation split and what was chosen on it."""
    proto, split = results.get("protocol"), results["split"]
    if proto is None:  # results of a run before the validation protocol
        return []
    md = ["", "## Protocol", ""]
    n = len(results["per_seed"])
    md.append(f"Mean ± std over {plural(n, 'run')}" + (" (no spread)" if n < 2 else "")
              + f": split seeds {proto['split_seeds']} × training seeds {proto['seeds']} "
              "(each split seed draws its own test, validation and long-tailed training sets).")
    if proto["val_per_class"]:
        md += ["", f"Validation: {plural(proto['val_per_class'], 'example')} per class ({split.get('val_size')} in all), held out "
                   "of the training pool before the long-tailed subsampling, never trained on. Every choice is made "
                   f"on it by balanced accuracy: τ of +la from {proto['la_tau_grid']} (the smallest among equals)"
                   + (f", the pseudo weight from {proto['pseudo_weight_grid']}" if proto["pseudo_weight_grid"] else "")
                   + ". The test set is sealed until the final evaluation (a read before it raises)."]
    else:
        md += ["", f"No validation split (data.val_per_class = 0): τ of +la is the configured "
                   f"logit_adjust_tau = {proto['logit_adjust_tau']:g}, nothing is chosen."]
    rows = []
    for method, picks in results.get("choices", {}).items():
        if not any(c.get("tau") is not None or c.get("pseudo_weight") is not None for c in picks):
            continue
        val = [c["val_balanced"] for c in picks if c.get("val_balanced") is not None]
        fixed = not any("pseudo_weight" in c.get("chosen_on_validation", ["pseudo_weight"]) for c in picks)
        rows.append([method, _per_run([c.get("tau") for c in picks]),
                     _per_run([c.get("pseudo_weight") for c in picks]) + (" (fixed)" if fixed and picks[0].get(
                         "pseudo_weight") is not None else ""),
                     f"{np.mean(val):.3f}" if val else "–"])
    if rows:
        pairs = ", ".join(f"({a}, {b})" for a, b in results.get("pairs", []))
        md += ["", f"Chosen per run, in the order of the (split seed, seed) pairs {pairs}:", "",
               markdown_table(["method", "τ of +la", "pseudo weight", "validation balanced (mean)"], rows)]
    return md


NOT_PRIVATE = ("This run is **not private**: every release (encoder, classifier and denoiser weights, "
               "pseudo-features, the feature-scaler statistics and the class counts) is derived from the "
               "training data without a differential-privacy guarantee.")


def privacy_section(results: dict) -> list[str]:
    """Each release and its ε (per seed, from the ledgers), or the plain statement that nothing is private."""
    seeds = [(s["seed"], s["diagnostics"]["privacy"]) for s in results["per_seed"] if "privacy" in s["diagnostics"]]
    md = ["", "## Privacy", ""]
    if not seeds:
        return md + [NOT_PRIVATE]
    _, first = seeds[0]
    dp_encoder = first.get("encoder") == "dp"
    stage1_note = ("`ce`, `logit_adjust` and `resample` use the DP encoder and stage-1 classifier (covered by the "
                   "encoder's event below)" if dp_encoder else
                   "`ce`, `logit_adjust` and `resample`, which use the public part only (ε = 0)")
    encoder_row = ("| encoder E, stage-1 classifier G | private part | DP-SGD (`privacy.encoder: dp`), in the ledger |\n"
                   "| feature scaler (mean/std) | public part | public (ε = 0) |" if dp_encoder else
                   "| encoder E, stage-1 classifier, feature scaler | public part | public (ε = 0) |")
    md += ["The long-tailed training set is split per class into a declared **public** part and a **private** "
           "part (`privacy.public_fraction`). Methods other than `dp-…` are **not private** with respect to the "
           f"private part, except {stage1_note}.", "",
           "What `dp-ldmlr` releases and how each release is covered:", "",
           "| release | derived from | guarantee |", "|---|---|---|",
           encoder_row,
           "| class counts of the private part (also the logit-adjustment prior under `privacy.encoder: dp`) "
           "| private part | " +
           ("Gaussian mechanism, in the ledger |" if first["count_event"] else "declared public (count_epsilon = 0) |"),
           f"| denoiser ε_θ | private part | {'DP-SGD in two phases (t ≥ S, then t < S; dp-promise curriculum)' if first['phase1_steps'] else 'DP-SGD'}"
           " with noise multiplicity, in the ledger |",
           *(["| denoiser warm start (`privacy.public_pretrain`) | public part | public (ε = 0) |"]
             if first.get("public_pretrain") else []),
           "| pseudo-features, fine-tuned classifier G | denoiser + public part | post-processing (no extra ε) |", "",
           f"Budget: target ε = {first['target_epsilon']:g} at δ = {first['delta']:g} per seed "
           f"(σ = {first['sigma']:.4f}, q = {first['sample_rate']:.4f}). Spent, per seed "
           "(PLD is the primary accountant; RDP and PRV cross-check it):", "",
           "| seed | PLD ε | RDP ε | PRV ε | events (name: noise multiplier, sample rate, steps) |", "|---|---|---|---|---|"]
    for seed, d in seeds:
        events = "; ".join(f"{e['name']}: {e['noise_multiplier']:.4g}, {e['sample_rate']:.4g}, {e['steps']}"
                           for e in d["entries"])
        eps = d["epsilon"]
        md.append(f"| {seed} | {eps['pld']:.3f} | {eps['rdp']:.3f} | {eps['prv']:.3f} | {events} |")
    md += ["", "Not written to the run directory: per-step losses, gradient norms, clip fractions and batch sizes "
               "of the DP training (they describe the private part without a guarantee; they appear on the "
               "console only, and only as step counters on the progress bar). The private part's exact class counts "
               "appear nowhere: `split.json` holds the public part's counts and N_private only."]
    md += ["", f"Neighbouring relation of every ε above: {first.get('neighbouring_relation', 'add/remove one example')}. "
               f"Noise: {first.get('noise', 'unknown')}."]
    if first.get("private") is False:
        md[3:3] = ["**NOT PRIVATE — debugging run.** `privacy.reproducible_noise` derived every DP noise draw from "
                      "the run seed printed in config.yaml: anyone can re-draw and subtract it, so the ε figures "
                      "below are arithmetic, not a guarantee.", ""]
    if "paper_claimed_epsilon" in first:
        c = first["paper_claimed_epsilon"]
        md += ["", f"For reference, dp-promise's own accounting of its Phase I would give ε = {c['epsilon']:.3f} for "
                   f"this schedule — {c['label']}. pfdiff does not run that Phase I; both phases here are DP-SGD."]
    if first.get("declared_public"):
        md += ["", "Declared public (no privacy cost): " + "; ".join(first["declared_public"]) + "."]
    if "all_seeds_epsilon" in results:
        e = results["all_seeds_epsilon"]
        md += ["", f"Each seed is a separate training run on the same private data: releasing the models of all "
                   f"{plural(len(seeds), 'seed')} together costs their composition, PLD ε = {e['pld']:.3f} "
                   f"(RDP {e['rdp']:.3f}, PRV {e['prv']:.3f}). Ledgers: `privacy/seedN.json`."]
    return md


def membership_section(run: RunDir) -> list[str]:
    """Membership-inference results of ``pfdiff attack`` (``attack.json``), if the run was attacked."""
    path = run.path / "attack.json"
    if not path.exists():
        return []
    att = json.loads(path.read_text())
    rows, copy_rows = [], []
    for seed, targets in att["seeds"].items():
        for target, res in targets.items():
            control = res.get("control") or {}
            for name in [*att["attacks"], *(["lira"] if "lira" in res else [])]:
                m, c = res[name], control.get(name)
                rows.append([seed, target, name, f"{m['auc']:.3f}", "–" if c is None else f"{c['auc']:.3f}",
                             f"{m['tpr_at_1pct_fpr']:.3f}", "–" if c is None else f"{c['tpr_at_1pct_fpr']:.3f}",
                             f"{m['tpr_at_0.1pct_fpr']:.3f}", res["n_members"]])
            c = res["copying"]
            copy_rows.append([seed, target, f"{c['mean_ratio']:.3f}", f"{c['copy_fraction']:.3f}", c["n_pseudo"]])
    md = ["", "## Membership inference (`pfdiff attack`)", "",
          "Members: the examples each denoiser was trained on; non-members: held-out examples of the same "
          "classes (never trained on, chosen before training), balanced per class. AUC 0.5 = no leak. "
          "TPR at a low FPR is what matters for a worst-case individual; with a few hundred examples the "
          "0.1 % point rests on no more than one non-member.", "",
          "The control is a denoiser trained the same way on data that contains neither set (see attack.md): its "
          "AUC is what 'no membership signal' looks like in this pipeline. Per-class and per-group figures: "
          "attack.json / attack.md.", "",
          markdown_table(["seed", "denoiser", "attack", "AUC", "control AUC", "TPR@1%FPR", "control TPR@1%FPR",
                          "TPR@0.1%FPR", "members"], rows), "",
          "Copying check of pseudo-features: distance to the nearest member over the distance to the nearest "
          "held-out example of the same class (equal-size reference sets; ≈ 1: no preference for training "
          "points; 'copies': ratio < 0.5).", "",
          markdown_table(["seed", "denoiser", "mean ratio", "copies", "pseudo-features"], copy_rows)]
    if (run.plots / "roc.png").exists():
        md += ["", "![ROC curves](plots/roc.png)"]
    return md


def _other_splits(results: dict) -> list[str]:
    """With several split seeds: each split's sizes, and its groups where they differ from the first's."""
    splits = results.get("splits")
    if not splits:
        return []
    first = results["split"]["groups"]
    out = []
    for seed, sp in splits.items():
        g = sp["groups"]
        same = all(g[k] == first[k] for k in ("many", "medium", "few", "rule"))
        out.append(f"- split seed {seed}: {sp['train_size']} training, {sp.get('val_size', 0)} validation, "
                   f"{sp['test_size']} test examples; groups "
                   + ("as above" if same else f"({g['rule']}) many {g['many']}, medium {g['medium']}, few {g['few']}"))
    return ["Splits:", "", *out, ""]


def render_report(run: RunDir) -> Path:
    """Write plots/*.png and report.md from results.json, metrics.jsonl and the saved features."""
    results: dict[str, Any] = run.read_json("results.json")
    seed = results["seeds"][0]
    key = results.get("run_keys", [f"seed{seed}"])[0]
    split_seed = results["per_seed"][0].get("split_seed")
    metrics = [r for r in run.metrics() if r.get("split_seed", split_seed) == split_seed]
    drawn = {"per_class_accuracy.png": plot_per_class(results, run.plots / "per_class_accuracy.png"),
             "training_curves.png": plot_training_curves(metrics, seed, run.plots / "training_curves.png"),
             "feature_projection.png": plot_projection(run.checkpoints / key / "features.safetensors",
                                                       run.plots / "feature_projection.png"),
             # drift is measured as the encoder moves: without an E2E variant it is one flat line per method
             "drift.png": plot_drift(run.metrics(), run.plots / "drift.png") if results.get("e2e") else None,
             "coverage.png": plot_coverage(results, run.plots / "coverage.png")}
    for name, p in drawn.items():
        if p is None:  # a figure of an earlier render that this one does not draw is not left beside the report
            (run.plots / name).unlink(missing_ok=True)
    plots = [p for p in drawn.values() if p is not None]
    short = short_stages(metrics, seed)
    n = n_runs(results)
    over = plural(n, "run") + (" (one seed: no spread)" if n < 2 else "")
    split = results["split"]
    g = split["groups"]
    md = [f"# pfdiff run: {run.path.name}", "",
          f"Dataset **{split['dataset']}**: {split['train_size']} long-tailed training examples, "
          f"{split['test_size']} balanced test examples, {plural(split['num_classes'], 'class')}; " +
          (f"split seeds {results['protocol']['split_seeds']} × seeds {results['protocol']['seeds']}"
           if "protocol" in results else f"seeds {results['seeds']}") + f"; device {results['device']}.", "",
          (f"Training counts per class: {split['train_counts']}" if "train_counts" in split else
           f"Private run: {split['n_public']} public and {split['n_private']} private training examples (both sizes "
           f"declared public); public counts per class: {split['public_counts']} (the private part's counts are "
           "released only through the accountant, see Privacy)"), "",
          f"Class groups by training count, rule used: {g['rule']}: many {g['many']}, medium {g['medium']}, "
          f"few {g['few']}.", "", *_other_splits(results),
          f"## Test accuracy (mean ± std over {over})", "", results_table(results), ""]
    md += verdict(results)
    md += protocol_lines(results) + [""]
    md += ["Methods:", ""] + [f"- `{m}`: {d}" for m, d in results["method_names"].items()] + [""]
    md += [f"## Wall time per stage (s, mean ± std over {over})", "",
           markdown_table(["stage", "seconds"], [(k, mean_spread(v, n_runs(results)))
                                                 for k, v in results["timings"].items()])]
    diag = results["per_seed"][0]["diagnostics"].get("ldmlr")
    if diag:
        fd = ", ".join("–" if d is None else f"{d:.2f}" for d in diag["frechet_per_class"])
        md += ["", f"## Pseudo-features ({key})", "",
               f"Generated per class: {diag['generated_per_class']}", "",
               f"Fréchet distance of each class's pseudo-features to its real training features: {fd}"]
    aid = results["per_seed"][0]["diagnostics"].get("aid", {})
    if aid:
        rows = [[m, *("–" if f is None else f"{f:.2f}" for f in a["kept_fraction_per_class"])]
                for m, a in aid.items()]
        md += ["", f"## AID/OOD filter: kept fraction per class ({key})", "",
               markdown_table(["method", *range(split["num_classes"])], rows)]
    md += e2e_section(results)
    md += coverage_section(results)
    md += privacy_section(results)
    md += membership_section(run)
    md += ["", "## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    if short:
        md += ["", f"Too short to plot a training curve (fewer than {MIN_CURVE_POINTS} logged losses, seed {seed}): "
                   + ", ".join(f"`{s.split('· ', 1)[-1]}`" for s in short) + "."]
    atomic_write_text(run.report_path, "\n".join(md) + "\n")
    return run.report_path
