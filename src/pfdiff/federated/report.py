"""report.md and fed_rounds.png comparing the federated methods across Dirichlet partitions.

Input: per partition (``iid`` or ``alpha-<α>``, see :func:`pfdiff.federated.simulation.alpha_dir`) one
``<root>/<sub>/results.json`` (one seed) or one ``<root>/<sub>/seed-<s>/results.json`` per seed, as written by
:func:`pfdiff.federated.server_app.run_server`. Every sentence of the report, the verdict included, is computed
from those files; keys added later (``fd_reference``, ``client_histograms``) are optional.

Several seeds: the headline table is mean ± std over seeds (sample std) of every method and baseline, and a
method "beats" another only where the gap in means exceeds the sum of the two stds (``pfdiff.report``'s rule);
with one seed the cells read "± n/a" and nothing is claimed.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from pfdiff.report import _compare as compare_with_spread  # noqa: E402
from pfdiff.report import group_mean, markdown_table, mean_spread, save_fig  # noqa: E402
from pfdiff.text import plural  # noqa: E402
from pfdiff.runs import atomic_write_text  # noqa: E402

Results = dict[str, dict[str, Any]]

ACCURACY = ("top1", "balanced", "few", "medium", "many")
DASH = "–"
MB = 1e6
PLOT_NAME = "fed_rounds.png"
# (method, the method it is measured against): FedDDPM's server correction vs plain FedAvg; the quick
# test (FedDDPM+) and the progressive pool vs FedDDPM with its fixed pool and all rounds.
PAIRS = (("fedddpm", "fedavg"), ("fedddpm+", "fedddpm"), ("progressive", "fedddpm"))


# ---------------------------------------------------------------- loading


def partition_label(alpha: float) -> str:
    """"IID" for α = 0, else "α=<α>"."""
    return "IID" if alpha == 0 else f"α={alpha:g}"


def _alpha_of(path: Path, data: dict[str, Any]) -> float:
    """α from results.json, or from its directory name (``iid`` / ``alpha-<α>``)."""
    if data.get("alpha") is not None:
        return float(data["alpha"])
    name = path.parent.name
    return 0.0 if name == "iid" else float(name.removeprefix("alpha-"))


SEED_DIR = re.compile(r"^seed-(\d+)$")


def _seed_of(run_dir: Path, data: dict[str, Any]) -> int | None:
    """The run's seed: its ``seed-<s>`` folder, else its results or config.yaml (``seeds[0]``), else None."""
    if m := SEED_DIR.match(run_dir.name):
        return int(m.group(1))
    if data.get("seed") is not None:
        return int(data["seed"])
    cfg = run_dir / "config.yaml"
    if cfg.is_file():
        import yaml

        seeds = (yaml.safe_load(cfg.read_text()) or {}).get("seeds") or []
        return int(seeds[0]) if seeds else None
    return None


def load_results(root: Path) -> Results:
    """Every partition under ``root``, keyed "IID" or "α=<α>", IID first then by increasing α: the results of
    its first seed and, when it has several (``<sub>/seed-<s>/results.json``, also a ``<sub>/results.json``
    of another seed), ``"per_seed"``: {seed: results} in seed order (a ``seed-<s>`` folder wins over a
    ``<sub>/results.json`` of the same seed)."""
    found: dict[float, dict[int | None, dict[str, Any]]] = {}
    for path in sorted(Path(root).glob("*/results.json")):
        data = json.loads(path.read_text())
        found.setdefault(_alpha_of(path, data), {})[_seed_of(path.parent, data)] = data
    for path in sorted(Path(root).glob("*/seed-*/results.json")):
        if SEED_DIR.match(path.parent.name):
            data = json.loads(path.read_text())
            found.setdefault(_alpha_of(path.parent, data), {})[_seed_of(path.parent, data)] = data
    out = {}
    for a in sorted(found):
        runs = dict(sorted(found[a].items(), key=lambda t: (t[0] is None, t[0] or 0)))
        first = next(iter(runs.values()))
        out[partition_label(a)] = {**first, "per_seed": runs} if len(runs) > 1 else first
    return out


def with_variants(base: Results, other: Results, tag: str, what: str = "the other root") -> Results:
    """``base`` with the methods of ``other`` (runs of another configuration: e.g. another pool quota) added to
    each (partition, seed) run as ``<method>@<tag>``, so that one report compares — and picks on the validation
    split among — the variants of several roots. Baselines, privacy and the rest stay ``base``'s. The variants
    must stand on the same encoder: a run whose ``fedavg-ce`` numbers differ from ``base``'s, or a (partition,
    seed) ``base`` lacks, is refused (ValueError, one line)."""
    out = copy.deepcopy(base)
    for label, res in other.items():
        if label not in out:
            raise ValueError(f"{what} has partition {label}, which the base root lacks")
        mine = seed_runs(out[label])
        for seed, run in seed_runs(res).items():
            if seed not in mine:
                raise ValueError(f"{what} has {label}, seed {seed}, which the base root lacks")
            target = mine[seed]
            a, b = (r.get("baselines", {}).get("fedavg-ce") for r in (target, run))
            if a and b and any(a.get(k) != b.get(k) for k in ("top1", "balanced", "few", "validation")):
                raise ValueError(f"{what}'s {label}, seed {seed} has another fedavg-ce than the base root's (another "
                                 "encoder): variants compare only on one encoder (same data, seed and encoder rounds)")
            for name, m in run.get("methods", {}).items():
                m = target.setdefault("methods", {})[f"{name}@{tag}"] = copy.deepcopy(m)
                if m.get("upload_bytes") is None:  # older results: the uploads from the other run's wire
                    m["upload_bytes"] = ((run.get("bytes") or {}).get("received") or {}).get(f"diffusion/{name}")
    return out


def seed_runs(res: dict[str, Any]) -> dict[int | None, dict[str, Any]]:
    """A partition's runs by seed (one run, seed unknown, for results without ``per_seed``)."""
    return res.get("per_seed") or {res.get("seed"): res}


def each_run(results: Results) -> dict[str, dict[str, Any]]:
    """Every (partition, seed) run, labelled "α=0.1" (one seed) or "α=0.1, seed 2" (several)."""
    out = {}
    for label, res in results.items():
        runs = seed_runs(res)
        out.update({label: res} if len(runs) == 1 else {f"{label}, seed {s}": r for s, r in runs.items()})
    return out


# ---------------------------------------------------------------- formatting


def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _num(x: Any, fmt: str = ".3f") -> str:
    return DASH if _missing(x) else format(x, fmt)


def _int(x: Any) -> str:
    return DASH if _missing(x) else f"{int(x):,}"


def _mb(n_bytes: Any) -> str:
    return DASH if _missing(n_bytes) else f"{n_bytes / MB:.1f}"


def _history(method: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """(round, row) pairs of a method's history, in round order (JSON keys are strings)."""
    return sorted((int(r), row) for r, row in method.get("history", {}).items())


def _by_client(d: dict[Any, Any]) -> list[tuple[int, Any]]:
    return sorted((int(k), v) for k, v in d.items())


# ---------------------------------------------------------------- comparison table and verdict


def comparison_table(res: dict[str, Any]) -> str:
    """Baselines (accuracy only) and methods: FD, repair accuracy, rounds, steps, server time, bytes."""
    header = ["method", "FD ↓", *ACCURACY, "val. balanced", "rounds (saved)", "client steps", "server steps",
              "server s", "MB sent+received"]
    rows = [[name, DASH, *(_num(acc.get(k)) for k in ACCURACY), _num(_val_balanced(acc)), acc.get("rounds", DASH),
             *[DASH] * 3, _mb(acc.get("bytes"))] for name, acc in res.get("baselines", {}).items()]  # rounds, MB: creff
    best = _lowest_fd(res.get("methods", {}))
    for name, m in res.get("methods", {}).items():
        fd, rep = _num(m.get("fd"), ".2f"), m.get("repair", {})
        rows.append([name, f"**{fd}**" if name == best else fd, *(_num(rep.get(k)) for k in ACCURACY),
                     _num(_val_balanced(rep)), f"{m.get('rounds', DASH)} ({m.get('rounds_saved', 0)})",
                     m.get("client_steps", DASH),
                     m.get("server_steps", DASH), _num(m.get("server_seconds"), ".1f"), _mb(m.get("bytes"))])
    return markdown_table(header, rows)


def _val_balanced(acc: dict[str, Any]) -> float | None:
    """Balanced accuracy of a row on the validation split (None for results without one)."""
    return (acc.get("validation") or {}).get("balanced")


def _lowest_fd(methods: dict[str, dict[str, Any]]) -> str | None:
    fds = {name: m["fd"] for name, m in methods.items() if not _missing(m.get("fd"))}
    return min(fds, key=fds.get) if fds else None


def _versus(metric: str, a: float, b: float, fmt: str) -> str:
    """"<metric> a vs b (+d): lower / higher / equal": one run per partition has no spread, so the
    direction is stated, never a win; equal is a difference that rounds to 0 at the printed precision."""
    diff = a - b
    word = "equal" if float(format(abs(diff), fmt)) == 0 else ("lower" if diff < 0 else "higher")
    return f"{metric} {a:{fmt}} vs {b:{fmt}} ({diff:+{fmt}}): {word}"


def _pair_sentence(methods: dict[str, dict[str, Any]], ours: str, theirs: str) -> str:
    a, b = methods[ours], methods[theirs]
    parts = []
    if not (_missing(a.get("fd")) or _missing(b.get("fd"))):
        parts.append(_versus("FD", a["fd"], b["fd"], ".2f"))
    fa, fb = a.get("repair", {}).get("few"), b.get("repair", {}).get("few")
    if not (_missing(fa) or _missing(fb)):
        parts.append(_versus("few-class accuracy", fa, fb, ".3f"))
    return f"`{ours}` vs `{theirs}`: " + ("; ".join(parts) or "no comparable numbers") + "."


def _savings_sentence(methods: dict[str, dict[str, Any]]) -> str | None:
    """What FedDDPM+'s quick test saved against FedDDPM (rounds, client steps, bytes), or that it saved nothing."""
    plus, full = methods.get("fedddpm+"), methods.get("fedddpm")
    if plus is None:
        return None
    planned = plus.get("rounds", 0) + plus.get("rounds_saved", 0)
    if not plus.get("rounds_saved"):
        return f"`fedddpm+` ran all {plural(planned, 'round')} (the quick test never stopped it): it saved nothing."
    text = (f"`fedddpm+` stopped after {plus['rounds']} of {plural(planned, 'round')}, saving "
            f"{plural(plus['rounds_saved'], 'round')}")
    if full is not None:
        steps = full.get("client_steps", 0) - plus.get("client_steps", 0)
        text += f", {plural(steps, 'client step')} and {_mb(full.get('bytes', 0) - plus.get('bytes', 0))} MB vs `fedddpm`"
    return text + "."


def _few_sentence(res: dict[str, Any]) -> str | None:
    """Which repaired methods score above the strongest baseline on the few classes (one run: no spread)."""
    base = {n: a["few"] for n, a in res.get("baselines", {}).items() if not _missing(a.get("few"))}
    ours = {n: m["repair"]["few"] for n, m in res.get("methods", {}).items()
            if not _missing(m.get("repair", {}).get("few"))}
    if not base or not ours:
        return None
    best = max(base, key=base.get)
    won = [f"`{n}` ({v:.3f})" for n, v in ours.items() if v > base[best]]
    lost = [f"`{n}` ({v:.3f})" for n, v in ours.items() if v <= base[best]]
    return (f"Strongest baseline on the few classes: `{best}` ({base[best]:.3f}). Repaired G above it: "
            f"{', '.join(won) or 'none'}; not above it: {', '.join(lost) or 'none'}.")


def verdict(label: str, res: dict[str, Any]) -> list[str]:
    """Bullet points for one partition, every claim with its numbers: with several seeds claims against the
    spread (:func:`seeds_verdict`), with one run the differences without a claim."""
    if len(seed_runs(res)) > 1:
        return seeds_verdict(label, res)
    methods = res.get("methods", {})
    best = _lowest_fd(methods)
    lines = [f"- **{label}**: lowest FD: " + (f"`{best}` ({methods[best]['fd']:.2f})." if best else "none recorded.")]
    lines += [f"  - {_pair_sentence(methods, a, b)}" for a, b in PAIRS if a in methods and b in methods]
    lines += [f"  - {s}" for s in (_savings_sentence(methods), _few_sentence(res), _filter_sentence(methods)) if s]
    return lines


def _filter_sentence(methods: dict[str, Any]) -> str | None:
    """The repair's AID filter: its kept fraction, and where it was not used because a class kept nothing."""
    parts = []
    for name, m in methods.items():
        f = m.get("repair_filter")
        if not f:
            continue
        gen, kept = sum(f["generated_per_class"]), sum(f["kept_per_class"])
        note = "" if f["used"] else " — a class kept nothing, so the repair used the unfiltered samples"
        parts.append(f"`{name}` kept {kept}/{gen}{note}")
    return ("Repair filter (AID on the pool scorer): " + "; ".join(parts) + ".") if parts else None


def _clients(n: Any) -> str:
    return "? clients" if n is None else plural(int(n), "client")


def _skipped_lines(res: dict[str, Any]) -> list[str]:
    """The baselines the run skipped (no row in the table), each with its reason."""
    skipped = res.get("skipped_baselines") or {}
    return ["", *(f"`{name}` skipped: {why}." for name, why in skipped.items())] if skipped else []


def _baseline_lines(res: dict[str, Any]) -> list[str]:
    """The logit-adjustment prior's provenance, and CReFF's rounds and bytes next to the diffusion methods'."""
    out, prior = [], res.get("la_prior")
    la = res.get("baselines", {}).get("fedavg-ce+la")
    if prior and la is not None:
        tau = ("" if la.get("tau") is None else f"; τ = {la['tau']:g}, " + (
            "chosen on the validation split by balanced accuracy" if la.get("validation") else
            "`logit_adjust_tau` (no validation split)"))
        out.append(f"`fedavg-ce+la` prior: {prior['source']} ({prior['privacy']}){tau}.")
    c = res.get("baselines", {}).get("creff")
    if c and c.get("rounds") is not None:
        others = "; ".join(f"`{n}` {plural(int(m['rounds']), 'round')}, {_mb(m.get('bytes'))} MB"
                           for n, m in res.get("methods", {}).items() if m.get("rounds") is not None)
        chosen = ("" if c.get("chosen_round") is None else
                  f"; its classifier from round {c['chosen_round']}, chosen on the validation split")
        out.append(f"`creff`: {plural(int(c['rounds']), 'round')}, {_mb(c.get('bytes'))} MB sent+received "
                   f"({_mb(c.get('upload_bytes'))} MB uploaded by the clients){chosen}"
                   + (f"; diffusion rounds: {others}." if others else "."))
    return ["", *out] if out else []


def _fd_reference_line(res: dict[str, Any]) -> list[str]:
    ref = res.get("fd_reference") or {}
    if not ref:
        return []
    parts = ", ".join(f"{k.replace('_', ' ')} {_num(v, '.2f')}" for k, v in ref.items())
    return ["", f"FD of reference feature sets to the test features: {parts}."]


def comparison_section(results: Results) -> list[str]:
    """Per partition: mean ± std over its seeds, each run's comparison table (and FD references); then the
    verdict of every partition."""
    md = ["## Comparison", "",
          "FD ↓: Fréchet distance of features generated by the final global denoiser to the real test features "
          "(bold: lowest). Accuracies: G re-trained on class-balanced pseudo-features sampled by the server "
          "(the long-tail repair); the `fedavg-*` baselines generate nothing; `creff` re-trains G on its "
          "federated features (Shang et al. 2022). Rounds (saved): rounds run "
          "(rounds skipped by an early stop). MB: diffusion rounds, server→clients plus clients→server."]
    for label, res in results.items():
        runs = seed_runs(res)
        n = len(runs)
        md += ["", f"### {label}", "",
               f"{_clients(res.get('num_clients'))}; class counts {res.get('counts', DASH)}; "
               f"wall time {_num(_mean([r.get('seconds') for r in runs.values()]), '.1f')} s"
               + (f" per run (mean of {n})." if n > 1 else "."), "",
               (f"Mean ± std over {plural(n, 'seed')} ({', '.join(str(s) for s in runs)}):" if n > 1 else
                "One seed: no spread (± n/a)."), "", seeds_table(res)]
        for seed, run in runs.items():
            md += ([""] + ([f"#### seed {seed}", ""] if n > 1 else []) + [comparison_table(run)]
                   + _skipped_lines(run) + _baseline_lines(run) + _fd_reference_line(run))
    md += ["", "## Verdict", "", "A method *beats* another only where the gap in mean exceeds the sum of the two "
           "stds over seeds (FD: lower, accuracies: higher); a partition with one run (one seed) has no spread, so "
           "its differences are stated, not claimed as wins.", ""]
    for label, res in results.items():
        md += verdict(label, res) + creff_verdict(label, res)
    return md


# ---------------------------------------------------------------- several seeds: mean ± std and claims


# (key, column, format): the headline metrics, each a number per run (None where a row has none)
SEED_METRICS = (("fd", "FD ↓", ".2f"), ("few", "few", ".3f"), ("balanced", "balanced", ".3f"),
                ("top1", "top-1", ".3f"), ("val_balanced", "val. balanced", ".3f"), ("mb", "MB", ".1f"),
                ("upload_mb", "upload MB", ".1f"), ("rounds", "rounds", ".1f"))


def _mean(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if not _missing(v)]
    return sum(vals) / len(vals) if vals else None


def _cell(values: list[Any]) -> dict[str, float] | None:
    """{"mean", "std" (sample std; 0 with one value), "n"} of the values that are there, or None."""
    vals = [float(v) for v in values if not _missing(v)]
    if not vals:
        return None
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(vals)}


def _row_values(run: dict[str, Any], name: str) -> dict[str, Any]:
    """The headline numbers of one baseline or method in one run."""
    if name in run.get("baselines", {}):
        acc = run["baselines"][name]  # CReFF also has rounds and bytes; the fedavg-* rows generate nothing
        return {"few": acc.get("few"), "balanced": acc.get("balanced"), "top1": acc.get("top1"),
                "val_balanced": _val_balanced(acc), "mb": _in_mb(acc.get("bytes")),
                "upload_mb": _in_mb(acc.get("upload_bytes")), "rounds": acc.get("rounds")}
    m = run.get("methods", {}).get(name)
    if m is None:
        return {}
    rep = m.get("repair", {})
    upload = m.get("upload_bytes")  # the clients' uploads of its rounds; older results: the wire's total
    if upload is None:
        upload = (run.get("bytes") or {}).get("received", {}).get(f"diffusion/{name}")
    return {"fd": m.get("fd"), "few": rep.get("few"), "balanced": rep.get("balanced"), "top1": rep.get("top1"),
            "val_balanced": _val_balanced(rep), "mb": _in_mb(m.get("bytes")), "upload_mb": _in_mb(upload),
            "rounds": m.get("rounds")}


def _in_mb(n_bytes: Any) -> float | None:
    return None if _missing(n_bytes) else n_bytes / MB


def aggregate(res: dict[str, Any]) -> dict[str, dict[str, dict[str, float] | None]]:
    """name (baselines, then methods) → metric → mean ± std over the partition's seeds."""
    runs = list(seed_runs(res).values())
    names = list(dict.fromkeys(n for r in runs for n in (*r.get("baselines", {}), *r.get("methods", {}))))
    return {name: {key: _cell([_row_values(r, name).get(key) for r in runs]) for key, _, _ in SEED_METRICS}
            for name in names}


def seeds_table(res: dict[str, Any]) -> str:
    """Every baseline and method: FD, few, balanced, top-1, MB and rounds as mean ± std over seeds."""
    agg = aggregate(res)

    def fmt(cell: dict[str, float] | None, f: str) -> str:
        return DASH if cell is None else mean_spread(cell, int(cell["n"]), f, why=False)

    rows = [[name, *(fmt(agg[name][key], f) for key, _, f in SEED_METRICS)] for name in agg]
    return markdown_table(["method", *(col for _, col, _ in SEED_METRICS)], rows)


def _claim(agg: dict, ours: str, theirs: str, key: str, fmt: str) -> str | None:
    """"`ours` beats / does not beat / is within the spread of `theirs` on <key> (m ± s vs m ± s)", or None."""
    a, b = agg.get(ours, {}).get(key), agg.get(theirs, {}).get(key)
    if a is None or b is None:
        return None
    gap = a["mean"] - b["mean"]
    word = compare_with_spread(-gap if key == "fd" else gap, a["std"] + b["std"])
    name = "FD" if key == "fd" else f"{key} accuracy"
    return (f"`{ours}` {word} `{theirs}` on {name} ({a['mean']:{fmt}} ± {a['std']:{fmt}} vs "
            f"{b['mean']:{fmt}} ± {b['std']:{fmt}}, gap {gap:+{fmt}})")


def seeds_verdict(label: str, res: dict[str, Any]) -> list[str]:
    """Claims of one partition with several seeds: the PAIRS on FD and few-class accuracy, and every method
    against the strongest baseline on few and on balanced accuracy; each with its means and stds."""
    agg, runs = aggregate(res), seed_runs(res)
    methods = [n for n in agg if any(n in r.get("methods", {}) for r in runs.values())]
    baselines = [n for n in agg if n not in methods]
    fds = {n: agg[n]["fd"]["mean"] for n in methods if agg[n]["fd"]}
    best = min(fds, key=fds.get) if fds else None
    lines = [f"- **{label}** ({plural(len(runs), 'seed')}): lowest mean FD: "
             + (f"`{best}` ({fds[best]:.2f} ± {agg[best]['fd']['std']:.2f})." if best else "none recorded.")]
    for a, b in PAIRS:
        if a in methods and b in methods:
            parts = [c for c in (_claim(agg, a, b, "fd", ".2f"), _claim(agg, a, b, "few", ".3f")) if c]
            lines += [f"  - {'; '.join(parts)}."] if parts else []
    for key in ("few", "balanced"):
        base = {n: agg[n][key]["mean"] for n in baselines if agg[n][key]}
        if not base:
            continue
        top = max(base, key=base.get)
        claims = [c for m in methods if (c := _claim(agg, m, top, key, ".3f"))]
        if claims:
            lines.append(f"  - Strongest baseline on {key} accuracy: `{top}`. " + "; ".join(claims) + ".")
    rounds = agg.get("fedddpm+", {}).get("rounds")
    if rounds:
        lines.append(f"  - `fedddpm+` ran {rounds['mean']:.1f} ± {rounds['std']:.1f} rounds.")
    return lines


def _warmup_mb(res: dict[str, Any]) -> float | None:
    """Mean over seeds of the warm-up's client uploads (MB), paid once by the pool methods; None without."""
    ups = [sum(r["warmup"].get("upload_bytes_per_client", [])) / MB for r in seed_runs(res).values() if r.get("warmup")]
    return sum(ups) / len(ups) if ups else None


def _against_creff(a: dict, c: dict, seeds: int) -> tuple[str, bool]:
    """(the words and numbers of one variant against CReFF, whether it meets the bar): beats CReFF on few-class
    accuracy (gap beyond the sum of the stds) without losing balanced accuracy beyond the spread."""
    gap_few, gap_bal = a["few"]["mean"] - c["few"]["mean"], a["balanced"]["mean"] - c["balanced"]["mean"]
    spread_few, spread_bal = a["few"]["std"] + c["few"]["std"], a["balanced"]["std"] + c["balanced"]["std"]
    nums = (f"few {a['few']['mean']:.3f} ± {a['few']['std']:.3f} vs {c['few']['mean']:.3f} ± {c['few']['std']:.3f} "
            f"(gap {gap_few:+.3f}, spread {spread_few:.3f}); balanced {a['balanced']['mean']:.3f} vs "
            f"{c['balanced']['mean']:.3f} (gap {gap_bal:+.3f}, spread {spread_bal:.3f})")
    if seeds < 2:
        return f"one seed, no claim: {nums}", False
    if gap_few > spread_few and gap_bal >= -spread_bal:
        return f"**beats CReFF on few-class accuracy without losing balanced accuracy**: {nums}", True
    if gap_few > spread_few:
        return f"beats CReFF on few-class accuracy but **loses balanced accuracy** beyond the spread: {nums}", False
    return f"does not beat CReFF on few-class accuracy (short of the spread by {spread_few - gap_few:.3f}): {nums}", False


def validation_pick(agg: dict[str, dict[str, Any]], methods: list[str]) -> str | None:
    """The pfdiff variant with the highest mean balanced accuracy on the validation split over the seeds (the
    first in table order among equals): the one variant the report holds against CReFF. None without
    validation numbers."""
    vals = {m: agg[m]["val_balanced"]["mean"] for m in methods if agg[m].get("val_balanced")}
    return max(vals, key=vals.get) if vals else None


def creff_verdict(label: str, res: dict[str, Any]) -> list[str]:
    """The issue's bar — does pfdiff beat CReFF on few-class accuracy without losing balanced accuracy? — for the
    variant picked on the validation split (:func:`validation_pick`), then, for information, for every variant
    (picking the best of those on the test set would be a choice on the test set). With several seeds a claim
    needs the gap to exceed the sum of the stds, and a shortfall is stated as the missing margin; with one seed
    no claim is made. Then the bytes of both and the few classes' coverage of held-out features (the
    mechanism)."""
    agg, runs = aggregate(res), seed_runs(res)
    methods = [n for n in agg if any(n in r.get("methods", {}) for r in runs.values()) and agg[n]["few"]
               and agg[n]["balanced"]]
    c = agg.get("creff")
    if not methods or not c or not c["few"] or not c["balanced"]:
        return []
    verdicts = {m: _against_creff(agg[m], c, len(runs)) for m in methods}
    pick = validation_pick(agg, methods)
    if pick is None:
        lines = ["  - Against CReFF: no validation numbers in these results, so no variant is picked."]
    else:
        v = agg[pick]["val_balanced"]
        lines = [f"  - Against CReFF, the variant picked on the validation split (highest mean validation balanced "
                 f"accuracy of {plural(len(methods), 'variant')}: {v['mean']:.3f} ± {v['std']:.3f}): `{pick}` "
                 f"{verdicts[pick][0]}."]
    met = [m for m, (_, ok) in verdicts.items() if ok]
    lines.append(f"  - Every variant against CReFF (for information: the best of them on the test set is not a "
                 f"pick): {len(met)} of {len(methods)} meet the bar"
                 + (f" ({', '.join(f'`{m}`' for m in met)})" if met else "") + ".")
    lines += [f"    - `{m}`: {text}." for m, (text, _) in verdicts.items()]
    mb = {m: agg[m]["mb"]["mean"] for m in methods if agg[m]["mb"]}
    if mb and c["mb"]:
        warm, theirs = _warmup_mb(res), c["mb"]["mean"]
        near = [m for m, v in mb.items() if v <= 1.5 * theirs]  # "comparable": within 1.5× of CReFF's
        far = [v for m, v in mb.items() if m not in near]
        text = (f"  - Bytes: the diffusion methods {min(mb.values()):.1f}–{max(mb.values()):.1f} MB in their rounds"
                + (f" (+ {warm:.1f} MB of warm-up uploads for the pool methods)" if warm else "")
                + f" vs CReFF {theirs:.1f} MB")
        if not near:
            text += f" ({min(far) / theirs:.0f}× or more): not an equal-bytes comparison."
        elif not far:
            text += ": comparable bytes."
        else:
            text += (f": comparable bytes (within 1.5×) only for {', '.join(f'`{m}`' for m in near)}; the others "
                     f"{min(far) / theirs:.0f}×–{max(far) / theirs:.0f}×.")
        lines.append(text)
    cov = coverage_cells(res)
    shown = [m for m in methods if m in cov and cov[m]["recall"] and cov[m]["precision"]]
    if shown and "creff" in cov and cov["creff"]["recall"]:
        parts = ", ".join(f"`{m}` {cov[m]['precision']['mean']:.3f} / {cov[m]['recall']['mean']:.3f}" for m in shown)
        lines.append(f"  - Few classes' precision / recall of held-out features: {parts}; CReFF's federated "
                     f"features {cov['creff']['precision']['mean']:.3f} / {cov['creff']['recall']['mean']:.3f}; "
                     f"the clients' own training features reach recall {cov[shown[0]]['recall_train']['mean']:.3f} "
                     "(Coverage section).")
    return lines


# ---------------------------------------------------------------- coverage of held-out (tail) features


COVERAGE_KEYS = (("precision", "precision"), ("recall", "recall"), ("recall_train", "train recall"))


def _coverage_of(run: dict[str, Any], name: str, group: str) -> dict[str, float | None]:
    """Mean over the classes of ``group`` of one row's per-class coverage (empty without coverage)."""
    row = run.get("methods", {}).get(name) or run.get("baselines", {}).get(name) or {}
    cov, classes = row.get("coverage"), (run.get("groups") or {}).get(group)
    if not cov or not classes:
        return {}
    return {k: group_mean(cov[k], classes) for k, _ in COVERAGE_KEYS}


def coverage_cells(res: dict[str, Any], group: str = "few") -> dict[str, dict[str, dict[str, float] | None]]:
    """name → precision / recall / recall_train on ``group``'s classes, mean ± std over the partition's seeds."""
    runs = list(seed_runs(res).values())
    names = dict.fromkeys(n for r in runs for n in (*r.get("baselines", {}), *r.get("methods", {})))
    out = {}
    for name in names:
        per_run = [_coverage_of(r, name, group) for r in runs]
        if any(per_run):
            out[name] = {k: _cell([v.get(k) for v in per_run]) for k, _ in COVERAGE_KEYS}
    return out


def coverage_section(results: Results) -> list[str]:
    """Per partition: how much of the held-out features of the few and the many classes the features G is
    re-trained on reach (each method's repair pseudo-features, CReFF's federated features), beside the clients'
    own training features."""
    md = []
    for label, res in results.items():
        groups = {g: coverage_cells(res, g) for g in ("few", "many")}
        if not groups["few"]:
            continue
        n = len(seed_runs(res))
        ref = next((r.get("methods", {}).get(m, {}).get("coverage") or {} for r in seed_runs(res).values()
                    for m in r.get("methods", {})), {})

        def fmt(cell):
            return DASH if cell is None else mean_spread(cell, n, ".3f", why=False)

        rows = [[name, *(fmt(groups[g].get(name, {}).get(k)) for g in ("few", "many") for k, _ in COVERAGE_KEYS)]
                for name in groups["few"]]
        md += ["", f"### {label}", "", f"Reference: {ref.get('reference', 'held-out features')}, per class "
               f"{_classes(ref.get('reference_per_class'))}.", "",
               markdown_table(["features", *(f"{g} {col}" for g in ("few", "many") for _, col in COVERAGE_KEYS)], rows)]
    if not md:
        return []
    return ["", "## Coverage of held-out features", "",
            "Improved precision / recall (Kynkäänniemi et al. 2019, k-NN manifolds) of the features each G is "
            "re-trained on — a method's repair pseudo-features, CReFF's federated features — against held-out "
            "features of the same class (examples no client holds, encoded by the global encoder); `train recall`: "
            "the recall of the clients' own training features of the class, what copying them would give. Means "
            "over the classes of the group, then mean ± std over seeds. Evaluation only (no protocol message)."] + md


# ---------------------------------------------------------------- the progressive pool's decisions


def _classes(values: Any) -> str:
    """"c:k" for the classes with k > 0 (a per-class list), or a dash."""
    return ", ".join(f"{c}:{k}" for c, k in enumerate(values or []) if k) or DASH


def _decision_row(r: int, row: dict[str, Any]) -> list[Any]:
    regen = row.get("regenerated") or {}
    return [r, row.get("score_source", "pool"), _num(row.get("score"), ".4f"), _num(row.get("gain"), "+.4f"),
            row.get("gate", DASH), regen.get("generated", 0), regen.get("kept", 0), regen.get("replaced", 0),
            _classes(regen.get("kept_per_class")), _classes(regen.get("replaced_per_class"))]


def pool_section(results: Results) -> list[str]:
    """Per partition: the pool's quotas and held-out slice, and every round's keep / evict decision of the
    progressive pool (score source, gain, gate; generated, kept by the AID filter, put in place of old samples
    of the same class)."""
    md = []
    for label, res in results.items():
        w, prog = res.get("warmup") or {}, (res.get("methods") or {}).get("progressive")
        if not w and prog is None:
            continue
        md += ["", f"### {label}", ""]
        if w:
            md.append(f"Pool quota `{w.get('pool_quota', 'histogram')}`: quotas {_classes(w.get('quotas'))}; warm-up "
                      f"pool per class {_classes(w.get('pool_per_class'))}; held-out slice per class "
                      f"{_classes(w.get('val_per_class'))}.")
        rows = [_decision_row(r, row) for r, row in _pool_rows(prog)]
        if rows:
            md += ["", markdown_table(["round", "score source", "score", "gain", "gate", "generated", "kept",
                                       "replaced", "kept per class", "evicted per class"], rows)]
    return ["", "## Auxiliary pool", "", "Classes as class:count. Evicted per class: old samples of that class "
            "replaced by the kept new ones (stalest or worst, `fed.evict`)."] + md if md else []


# ---------------------------------------------------------------- warm-up, bytes, histograms, failures


def _warmup_row(label: str, w: dict[str, Any]) -> list[Any]:
    up = w.get("upload_bytes_per_client", [])
    spread = f"{min(up):,}–{max(up):,}" if up else DASH
    cheaper = sum(b < w.get("model_bytes", 0) for b in up)
    return [label, w.get("upload", DASH), _int(w.get("model_bytes")), _num(w.get("bytes_per_feature"), ".1f"),
            _int(w.get("crossover_n")), spread, _mb(sum(up)), f"{cheaper}/{len(up)}",
            f"{w.get('pool_size', DASH)} ({w.get('val_size', DASH)})"]


def warmup_section(results: Results) -> list[str]:
    """Model bytes vs bytes per pseudo-feature, the crossover N and what the clients actually uploaded."""
    rows = [_warmup_row(label, res["warmup"]) for label, res in each_run(results).items() if res.get("warmup")]
    md = ["", "## Warm-up uploads", ""]
    if not rows:
        return md + ["No warm-up: no method used the auxiliary pool."]
    return md + ["Each client uploads either its warm-up denoiser (model bytes) or N pseudo-features "
                 "(bytes per feature each, float32 vector + int64 label); features are cheaper while N is below "
                 "the crossover N. Measured serialised sizes:", "",
                 markdown_table(["partition", "upload", "model (B)", "B / pseudo-feature", "crossover N",
                                 "uploaded per client (B)", "uploaded total (MB)", "clients below model size",
                                 "pool (held out)"], rows)]


def _phases(results: Results) -> list[str]:
    seen: dict[str, None] = {}
    for res in results.values():
        b = res.get("bytes", {})
        seen.update(dict.fromkeys([*b.get("sent", {}), *b.get("received", {})]))
    return list(seen)


def bytes_section(results: Results) -> list[str]:
    """MB per phase (server→clients / clients→server) and per client, one column per run."""
    results = each_run(results)
    labels = list(results)
    b = {label: res.get("bytes", {}) for label, res in results.items()}

    def cell(d: dict[str, Any], key: Any) -> str:
        return f"{_mb(d.get('sent', {}).get(key, 0))} / {_mb(d.get('received', {}).get(key, 0))}"

    phases = [[p, *(cell(b[label], p) for label in labels)] for p in _phases(results)]
    phases.append(["**total**", *(_mb(b[label].get("total")) for label in labels)])
    clients = sorted({int(k) for d in b.values() for k in d.get("per_client", {})})
    per_client = [[c, *(_client_cell(b[label].get("per_client", {}), c) for label in labels)] for c in clients]
    return ["", "## Bytes", "", "MB sent (server→clients) / received (clients→server), per phase:", "",
            markdown_table(["phase", *labels], phases), "", "Per client (all phases):", "",
            markdown_table(["client", *labels], per_client)]


def _client_cell(per_client: dict[Any, dict[str, int]], client: int) -> str:
    d = dict(_by_client(per_client)).get(client)
    return DASH if d is None else f"{_mb(d.get('sent'))} / {_mb(d.get('received'))}"


def histogram_section(results: Results) -> list[str]:
    """Per-client class counts (true partition, computed by the runner for the report only)."""
    md = []
    for label, res in results.items():
        hist = res.get("client_histograms")
        if not hist:
            continue
        rows = [[i, *h, sum(h)] for i, h in enumerate(hist)]
        md += ["", f"### {label}", "", markdown_table(["client", *range(len(hist[0])), "total"], rows)]
    return ["", "## Per-client class histograms"] + md if md else []


def failures_section(results: Results) -> list[str]:
    """Per run: the number of failed client exchanges ("none") and each failure."""
    md = ["", "## Failures", ""]
    for label, res in each_run(results).items():
        fails = res.get("failures") or []
        md.append(f"- {label}: {len(fails) if fails else 'none'}")
        md += [f"  - {f.get('phase')} round {f.get('round')}, client {f.get('partition')}: {f.get('reason')}"
               for f in fails]
    return md


# ---------------------------------------------------------------- privacy


def _example_privacy(p: dict[str, Any]) -> list[str]:
    """Each client's example-level ε per method (the largest per method in bold), covered / public lists."""
    methods = p.get("methods", {})
    eps = {m: dict((c, e["epsilon"]) for c, e in _by_client(per)) for m, per in methods.items()}
    top = {m: max(v.values()) for m, v in eps.items() if v}
    clients = sorted({c for v in eps.values() for c in v})

    def cell(m: str, c: int) -> str:
        e = eps[m].get(c)
        return DASH if e is None else (f"**{e:.3f}**" if e == top.get(m) else f"{e:.3f}")

    composed = {int(c): e for c, e in (p.get("composed_over_methods") or {}).items()}
    rows = [[c, *(cell(m, c) for m in eps), *([_num(composed.get(c))] if composed else [])] for c in clients]
    rows.append(["**max**", *(_num(top.get(m)) for m in eps), *([_num(max(composed.values()))] if composed else [])])
    worst = (f" The largest ε of any client under any one method is {max(top.values()):.3f}; every method trains on "
             "the same client data with its own independent noise, so releasing all methods' outputs together costs "
             "their composition (last column: counts and the shared warm-up once)." if top else "")
    banner = ([f"**NOT PRIVATE — debugging run:** {p.get('noise')}.", ""] if p.get("private") is False else [])
    banner += _over_target(p, top)
    relation = f" Neighbouring relation: {p['neighbouring_relation']}; noise: {p.get('noise', '?')}." \
        if p.get("neighbouring_relation") else ""
    sampled = f" Client sampling: {p['participation']}." if p.get("participation") else ""
    return [*banner, f"Example-level DP-SGD on every client: target ε = {_num(p.get('target_epsilon'), 'g')} at "
            f"δ = {_num(p.get('delta'), 'g')} ({p.get('accountant', '?')} accountant).{relation}{sampled}{worst} "
            "ε spent per client and method (bold: the largest per method):",
            "", markdown_table(["client", *eps, *(["all methods"] if composed else [])], rows), "", *_public_lists(p)]


def _over_target(p: dict[str, Any], top: dict[str, float]) -> list[str]:
    """A warning where some method's largest client ε exceeds the target (never a silent "below target"), with
    the phases executed more than once: each execution after a resume is a new release with fresh noise."""
    target = p.get("target_epsilon")
    over = {m: e for m, e in top.items() if target is not None and e > target}
    if not over:
        return []
    repeats = {k: v for k, v in (p.get("private_sends") or {}).items() if v > 1}
    why = ("; phases executed more than once: " + ", ".join(f"{k} {v}×" for k, v in repeats.items())
           if repeats else "")
    return [f"**Over the target ε = {target:g}:** " + ", ".join(f"`{m}` {e:.3f}" for m, e in over.items())
            + f" (largest client){why}. A resumed or interrupted run re-sends private work, and every execution is "
            "a release with new noise: the ε in the table is what was spent.", ""]


def _public_lists(p: dict[str, Any]) -> list[str]:
    """What the guarantee covers and what is declared public, as bullets (when present)."""
    return [f"- {title}: " + "; ".join(p[key]) + "." for key, title in
            (("covered", "Covered"), ("declared_public", "Declared public (no ε)"),
             ("evaluation_only_no_guarantee", "Computed by the simulation runner for this report only, not sent "
              "by the protocol (no guarantee)")) if p.get(key)]


def _client_privacy(p: dict[str, Any]) -> list[str]:
    rows = [[m, _num(d.get("client_level_epsilon")), d.get("rounds", DASH)] for m, d in p.get("methods", {}).items()]
    return [f"Client-level DP (noisy FedAvg) at δ = {_num(p.get('delta'), 'g')}:", "",
            markdown_table(["method", "client-level ε", "rounds"], rows), "", *_public_lists(p)]


def privacy_section(results: Results) -> list[str]:
    """Per run: the DP mode, its claim, and the ε per client (example) or per method (client)."""
    md = ["", "## Privacy"]
    for label, res in each_run(results).items():
        p = res.get("privacy") or {"mode": "none"}
        mode = p.get("mode", "none")
        md += ["", f"### {label}: mode `{mode}`", ""]
        if p.get("claim"):
            md += [f"Claim: {p['claim']}.", ""]
        if mode == "example":
            md += _example_privacy(p)
        elif mode == "client":
            md += _client_privacy(p)
        else:
            md.append("There is **no differential-privacy claim** for this partition.")
    return md


# ---------------------------------------------------------------- the report and the plot


def write_report(root: Path, results: Results, name: str = "report.md", variants: dict[str, Path] | None = None
                 ) -> Path:
    """Write ``<root>/<name>`` (atomically) comparing the methods across the partitions of ``results``;
    ``variants``: tag → root of the methods added by :func:`with_variants` (named in the report)."""
    if not results:
        raise ValueError(f"no federated results to report under {root}")
    root = Path(root)
    md = ["# Federated feature diffusion: methods across partitions", "",
          f"Partitions: {', '.join(results)} (Dirichlet label skew; α = 0 is IID). Test-set numbers are for "
          "reporting only: no method's decision looks at them; the one choice among the pfdiff variants is made on "
          "the validation split.", ""]
    if variants:
        md += ["Variants from other roots (same encoder and baselines, checked; their privacy, warm-up and bytes "
               "sections are in their own reports): " + "; ".join(f"`…@{t}`: {p}" for t, p in variants.items()) + ".",
               ""]
    md += comparison_section(results) + coverage_section(results) + warmup_section(results) + pool_section(results)
    md += bytes_section(results)
    md += histogram_section(results) + failures_section(results) + privacy_section(results)
    if (root / PLOT_NAME).exists() and not variants:
        md += ["", "## Rounds", "", f"![score and pool per round]({PLOT_NAME})"]
    path = root / name
    atomic_write_text(path, "\n".join(md) + "\n")
    return path


def _round_axis(ax) -> None:
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


MIN_ROUNDS = 2  # a per-round series needs two rounds; FedAvg records no score, so FedAvg alone has none


def _scores(m: dict[str, Any]) -> list[tuple[int, float]]:
    return [(r, row["score"]) for r, row in _history(m) if not _missing(row.get("score"))]


def _pool_rows(m: dict[str, Any] | None) -> list[tuple[int, dict[str, Any]]]:
    return [(r, row) for r, row in _history(m or {}) if "pool" in row]


def _has_scores(res: dict[str, Any]) -> bool:
    return any(len(_scores(m)) >= MIN_ROUNDS for m in res.get("methods", {}).values())


def _has_pool(res: dict[str, Any]) -> bool:
    return len(_pool_rows(res.get("methods", {}).get("progressive"))) >= MIN_ROUNDS


def _plot_scores(ax, label: str, methods: dict[str, dict[str, Any]]) -> None:
    """Held-out aux-pool diffusion loss per round, one line per method with a score; FedDDPM+'s stop marked."""
    for name, m in methods.items():
        pts = _scores(m)
        if not pts:
            continue
        (line,) = ax.plot(*zip(*pts), marker=".", label=name)
        for r, row in _history(m):
            if row.get("quick_test_stop"):
                ax.plot([r], [row["score"]], marker="X", ms=10, color=line.get_color(), ls="none",
                        label=f"{name} stop (round {r})")
    ax.set_title(f"{label}: score per round")
    if not ax.get_legend_handles_labels()[0]:
        ax.text(0.5, 0.5, "no score per round", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    _round_axis(ax)
    ax.legend(fontsize=7)


def _creff_curves(res: dict[str, Any]) -> dict[Any, tuple[list[tuple[int, float]], Any]]:
    """seed → (CReFF's (round, validation balanced accuracy) points, its chosen round), for runs that have them."""
    out = {}
    for seed, run in seed_runs(res).items():
        c = run.get("baselines", {}).get("creff") or {}
        pts = sorted((int(r), v) for r, v in (c.get("val_per_round") or {}).items())
        if len(pts) >= MIN_ROUNDS:
            out[seed] = (pts, c.get("chosen_round"))
    return out


def _plot_creff(ax, label: str, res: dict[str, Any]) -> None:
    """CReFF's validation balanced accuracy per round, one line per seed, its chosen round marked."""
    curves = _creff_curves(res)
    if not curves:
        ax.text(0.5, 0.5, f"{label}: no CReFF series", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    for seed, (pts, chosen) in curves.items():
        (line,) = ax.plot(*zip(*pts), marker=".", ms=3, label="CReFF" if seed is None else f"seed {seed}")
        value = dict(pts).get(chosen)
        if value is not None:
            ax.plot([chosen], [value], marker="*", ms=11, color=line.get_color(), ls="none")
    ax.set_title(f"{label}: CReFF, validation balanced acc. (★ kept)", fontsize=9)
    _round_axis(ax)
    ax.legend(fontsize=7)


def _plot_pool(ax, label: str, progressive: dict[str, Any] | None) -> None:
    """The progressive pool's mean age (line) and the features replaced per round (bars)."""
    rows = _pool_rows(progressive)
    if not rows:
        ax.text(0.5, 0.5, f"{label}: no progressive pool", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    rounds = [r for r, _ in rows]
    bars = ax.twinx()
    bars.bar(rounds, [row.get("regenerated", {}).get("replaced", 0) for _, row in rows], color="0.8", width=0.6)
    bars.set_ylabel("replaced")
    ax.set_zorder(bars.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.plot(rounds, [row["pool"].get("mean_age") for _, row in rows], marker=".", color="tab:purple")
    ax.set_ylabel("pool mean age (rounds)", color="tab:purple")
    ax.set_title(f"{label}: progressive pool, mean age (line), replaced (bars)", fontsize=9)
    _round_axis(ax)


def plot_rounds(root: Path, results: Results) -> Path | None:
    """``<root>/fed_rounds.png``: per partition with a per-round series, the score per round, the progressive
    pool and CReFF's validation balanced accuracy per round with the round it kept (a row only where some
    partition has it). None, and no file, when there is nothing per round to show (FedAvg alone, or a single
    round): write_report then links no plot."""
    path = Path(root) / PLOT_NAME

    def has_creff(res: dict[str, Any]) -> bool:
        return bool(_creff_curves(res))

    checks = (("score", _has_scores), ("pool", _has_pool), ("creff", has_creff))
    shown = {label: res for label, res in results.items() if any(has(res) for _, has in checks)}
    kinds = [k for k, has in checks if any(has(r) for r in shown.values())]
    if not shown:
        path.unlink(missing_ok=True)  # an earlier render's plot would be linked as if it were this one's
        return None
    fig, axes = plt.subplots(len(kinds), len(shown), figsize=(4.5 * len(shown), 3.25 * len(kinds)), squeeze=False)
    for col, (label, res) in enumerate(shown.items()):
        methods = res.get("methods", {})
        for ax, kind in zip(axes[:, col], kinds):
            if kind == "score":
                _plot_scores(ax, label, methods)
            elif kind == "pool":
                _plot_pool(ax, label, methods.get("progressive"))
            else:
                _plot_creff(ax, label, res)
    if kinds[0] == "score":
        axes[0][0].set_ylabel("held-out aux-pool diffusion loss")
    fig.tight_layout()
    return save_fig(fig, path)


def render(root: Path, others: list[Path] = ()) -> Path:
    """Load every partition under ``root``, draw the rounds plot, write and return ``report.md``. With
    ``others`` (roots of other configurations on the same encoder): their methods join as ``<method>@<folder
    name>`` (:func:`with_variants`) in ``report-combined.md`` instead (no plot; ``report.md`` is left alone)."""
    results = load_results(root)
    if not results:
        raise FileNotFoundError(f"no */results.json under {root}")
    if not others:
        plot_rounds(root, results)
        return write_report(root, results)
    tags = {Path(o).resolve().name: Path(o) for o in others}
    if len(tags) < len(others) or Path(root).resolve().name in tags:
        raise ValueError("--with roots need folder names distinct from each other and from the base root: they tag "
                         "the variants")
    for tag, other in tags.items():
        more = load_results(other)
        if not more:
            raise FileNotFoundError(f"no */results.json under {other}")
        results = with_variants(results, more, tag, what=str(other))
    return write_report(root, results, "report-combined.md", tags)
