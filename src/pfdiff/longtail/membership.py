"""Membership inference against the feature denoisers of a finished run (``pfdiff attack RUN_DIR``).

What is attacked, and why the comparison is fair (issue 13, item 12):

- **Members** are examples the attacked denoiser was trained on; **non-members** are examples nothing was
  trained on: the training pool's examples that the long-tailed subset left out (``LongTailSplit.heldout``:
  same distribution, decided by ``data.split_seed`` before any training) plus half of the test split, so
  that the head class has non-members too (``candidate_pools``). Both are balanced per class
  (``balanced_pairs``: k_c = min of the two), so the label alone tells nothing.
- **Same member population for ε = ∞ and DP.** In a private run (a ``dp-…`` method configured) the
  non-private ``ldmlr`` denoiser is trained on public + private features, the DP one on the private part
  only; both are attacked on the *same* private members and the same non-members. Members the encoder saw
  (the public part) are never attacked, so the encoder cannot separate them for the denoiser.
- **Upstream treatment.** A private run's encoder, stage-1 classifier and scalers see only the public part
  (``privacy.encoder: public``), i.e. neither the attacked members nor the non-members. A non-private run's
  encoder is trained on every training example — the members — and never on the non-members: that
  confound cannot be removed after the fact, so every result carries (a) the AUC of statistics that use
  no denoiser at all (feature norm, stage-1 classifier loss: ``upstream``) and (b) a **control**.
- **Control**: a denoiser trained the same way on a set that contains neither the members nor the
  non-members (the public part in a private run; else the other half of the test split plus unused
  candidates, drawn with the target's class counts where available), attacked with the same scores.
  Its AUC is what "no membership signal" looks like through this pipeline; the target's excess over it is
  what the denoiser itself leaks.

Features are computed with the run's own stage-1 encoder and scaled (and, for DP, clipped) exactly as the
denoiser saw them during training. Results per class and per class group (many / medium / few) sit
beside the pooled ones (``mia.grouped_metrics``).

Device: the run's models, features and attacks run on ``resolve_device(cfg.device)`` (CUDA when present,
else CPU); the attack scores come back on the CPU (``mia``), as numpy for the metrics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from pfdiff.config import RunConfig
from pfdiff.data import ArrayDataset
from pfdiff.evaluation.mia import attack_settings, balanced_pairs
from pfdiff.longtail.common import LongTailSplit, encode, init_encoder_classifier, make_split
from pfdiff.longtail.ldmlr import FeatureScaler, build_denoiser, sample_features
from pfdiff.longtail.private import clip_rows, public_private_split, sampling_view
from pfdiff.runs import RunDir
from pfdiff.training import load_modules, module_device, resolve_device

CONTROL = "control"
NONMEMBERS = ("never trained on: LongTailSplit.heldout + half of the test split (candidate_pools), balanced per "
              "class with the members")


def control_name(target: str) -> str:
    """The name of a target's control model in curves and tables."""
    return f"{target} ({CONTROL})"


@dataclass
class Control:
    """A denoiser that saw neither the attacked members nor the non-members, trained like the target.

    ``build`` trains (or loads) it on first use, so listing targets stays cheap; ``source`` says in words
    what it was trained on, ``counts`` how many examples per class, ``data`` the (features, labels) it was
    trained on, in the target's space (kept so that disjointness from both attacked sets can be checked)."""

    source: str
    counts: list[int]
    build: Callable[[], nn.Module]
    data: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _model: nn.Module | None = field(default=None, repr=False)

    def model(self) -> nn.Module:
        if self._model is None:
            self._model = self.build().eval()
        return self._model


@dataclass
class Target:
    """One released denoiser with its members and non-members in the space it was trained in."""

    name: str
    model: nn.Module
    members: tuple[torch.Tensor, torch.Tensor]
    nonmembers: tuple[torch.Tensor, torch.Tensor]
    pseudo: tuple[torch.Tensor, torch.Tensor] | None  # released (or freshly sampled) pseudo-features, same space
    control: Control | None = None
    groups: dict[str, list[int]] | None = None  # class groups for per-group metrics (many / medium / few)
    upstream: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # no-denoiser scores
    population: tuple[torch.Tensor, torch.Tensor] | None = None  # attacker-held data outside the attack set
    train_counts: np.ndarray | None = None  # the target's training examples per class (LiRA mimics them)
    setup: dict[str, Any] = field(default_factory=dict)  # who saw what, in words (JSON-ready)


# ---------------------------------------------------------------------------------------------------
# pieces
# ---------------------------------------------------------------------------------------------------

def _stage1(cfg: RunConfig, split: LongTailSplit, ck: Path, seed: int, device: torch.device
            ) -> tuple[nn.Module, nn.Module, str]:
    """The run's stage-1 E and G (the DP ones under ``privacy.encoder: dp``) on ``device`` and the checkpoint
    name."""
    name = "dp-stage1" if (ck / "dp-stage1.safetensors").exists() else "stage1"
    enc, g = init_encoder_classifier(cfg, split.train.input_shape, split.num_classes, seed, device)
    load_modules(ck / f"{name}.safetensors", {"encoder": enc, "classifier": g})
    return enc.eval(), g.eval(), name


def _denoiser(cfg: RunConfig, path: Path, dim: int, num_classes: int, device: torch.device) -> nn.Module:
    model = build_denoiser(cfg, dim, num_classes).to(device)
    load_modules(path, {"denoiser": model}, use_ema_for="denoiser")
    return model.eval()


def check_split(run: RunDir, split: LongTailSplit) -> None:
    """Refuse to attack when the split recomputed from the run's config differs from the one it was trained on
    (``split.json``): the data code changed since, and the 'members' would not be the training examples."""
    path = run.path / "split.json"
    if not path.exists():
        return
    import json

    saved = json.loads(path.read_text())
    now = {"train_size": len(split.train.y), "test_size": len(split.test.y), "train_counts": split.counts.tolist(),
           "test_counts": np.bincount(split.test.y, minlength=split.num_classes).tolist()}
    for key in ("train_size", "test_size", "train_counts", "test_counts"):
        if key in saved and key in now and saved[key] != now[key]:
            raise ValueError(f"{run.path}: the split recomputed from config.yaml has {key} {now[key]}, the run was "
                             f"trained on {saved[key]} (split.json); the data code changed since, so the members "
                             "would be wrong — attack with the code version that trained the run")


def private_mode(cfg: RunConfig) -> bool:
    """True when the run trains a DP method: then E, G and the scaler saw only the declared public part."""
    from pfdiff.longtail.methods import parse_method

    return any(parse_method(m).base.startswith("dp-") for m in cfg.methods)


def group_dict(split: LongTailSplit) -> dict[str, list[int]]:
    g = split.groups.as_dict()
    return {k: list(g[k]) for k in ("many", "medium", "few")}


@torch.no_grad()
def upstream_scores(classifier: nn.Module, z_mem: torch.Tensor, y_mem: torch.Tensor, z_non: torch.Tensor,
                    y_non: torch.Tensor) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Membership statistics that use no denoiser (higher = member): the raw feature norm ‖E(x)‖ and the
    negated stage-1 classifier loss −CE(G(E(x)), y). If these separate members from non-members, the
    encoder (not the denoiser) is leaking, and a denoiser attack inherits it."""
    def both(fn):
        return fn(z_mem, y_mem).double().cpu().numpy(), fn(z_non, y_non).double().cpu().numpy()

    ce = lambda z, y: -nn.functional.cross_entropy(classifier(z), y, reduction="none")  # noqa: E731
    return {"feature_norm": both(lambda z, y: z.norm(dim=1)), "stage1_loss": both(ce)}


def draw_per_class(y: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of min(counts[c], available) random examples of each class c of ``y``."""
    picks = []
    for c, want in enumerate(np.asarray(counts, dtype=np.int64)):
        pool = np.flatnonzero(y == c)
        picks.append(rng.choice(pool, min(int(want), len(pool)), replace=False))
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, dtype=np.int64)


def candidate_pools(split: LongTailSplit, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """(non-member candidates, reserve): ``LongTailSplit.heldout`` plus a seeded half of every class of the
    test split, and the other half of the test split.

    Why not the held-out pool alone: it holds what the long-tailed subset left out, so the head class has
    almost nothing there (digits at IF = 50: class 0 keeps ~144 of its ~145 pool examples) and a head-group
    AUC would rest on one or two pairs. Test examples are never trained on either (same distribution, fixed
    by ``data.split_seed``; they serve only utility evaluation). The reserve half stays untouched for a
    control that needs data outside both attacked sets."""
    rng = np.random.default_rng([seed, 11])
    take, keep = [], []
    for c in range(split.num_classes):
        idx = rng.permutation(np.flatnonzero(split.test.y == c))
        h = (len(idx) + 1) // 2
        take.append(idx[:h]), keep.append(idx[h:])
    take, keep = np.sort(np.concatenate(take)), np.sort(np.concatenate(keep))
    held = split.heldout
    cand = ArrayDataset(np.concatenate([held.x, split.test.x[take]]), np.concatenate([held.y, split.test.y[take]]),
                        split.num_classes, split.train.name)
    return cand, split.test.subset(keep)


def outside_pool(enc: nn.Module, *parts: tuple[ArrayDataset, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw features and labels of every example of the given datasets except the listed indices (those in the
    attack set): data the attacker may hold that is neither an attacked member nor a non-member. On the
    encoder's device."""
    xs, ys = [], []
    for ds, used in parts:
        keep = np.setdiff1d(np.arange(len(ds.y)), np.asarray(used, dtype=np.int64))
        xs.append(ds.x[keep]), ys.append(ds.y[keep])
    device = module_device({"encoder": enc})
    return (encode(enc, torch.as_tensor(np.concatenate(xs)).to(device)),
            torch.as_tensor(np.concatenate(ys)).to(device))


def trained_control(cfg: RunConfig, u: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int,
                    checkpoint: Path | None, source: str, wrap: Callable[[nn.Module], nn.Module] = lambda m: m
                    ) -> Control:
    """A control trained exactly as LDMLR's stage 2 (``train_feature_diffusion``: same config, same seed) on
    (u, y), cached at ``checkpoint``."""
    from pfdiff.longtail.ldmlr import train_feature_diffusion

    def build() -> nn.Module:
        model, _ = train_feature_diffusion(u, y, num_classes, cfg, seed, checkpoint, None)
        return wrap(model.eval())

    counts = np.bincount(y.cpu().numpy(), minlength=num_classes).tolist()
    return Control(source, counts, build, (u, y))


# ---------------------------------------------------------------------------------------------------
# targets of a run
# ---------------------------------------------------------------------------------------------------

def load_targets(run_dir: Path, seed: int) -> list[Target]:
    """Every feature denoiser a run trained for ``seed`` (LDMLR's, DP-LDMLR's), each with its control, ready
    to attack. In a private run both are attacked on the same private members (see the module doc)."""
    # Long (73 lines) on purpose: the two targets share a dozen local values (encoder, features, pools, attack
    # pairs, groups, upstream scores); per-target helpers would pass them all and hide that they are the same.
    run = RunDir.open(run_dir)
    cfg = run.config()
    split = make_split(cfg)
    ck = run.checkpoints / f"seed{seed}"
    if not ck.exists():
        raise FileNotFoundError(f"{run_dir} has no checkpoints for seed {seed}")
    check_split(run, split)
    C = split.num_classes
    device = resolve_device(cfg.device)
    enc, g, stage1 = _stage1(cfg, split, ck, seed, device)
    cand, reserve = candidate_pools(split, seed)
    z = encode(enc, torch.as_tensor(split.train.x).to(device))
    z_out = encode(enc, torch.as_tensor(cand.x).to(device))
    y, y_out = torch.as_tensor(split.train.y).to(device), torch.as_tensor(cand.y).to(device)
    private = private_mode(cfg)
    if private:
        pub, priv = public_private_split(split.train.y, C, cfg.privacy.public_fraction, cfg.data.split_seed)
    else:
        pub, priv = np.zeros(0, dtype=np.int64), np.arange(len(split.train.y))
    mem, non = balanced_pairs(split.train.y[priv], cand.y, C, seed)
    m_idx = priv[mem]  # indices into split.train of the attacked members
    groups = group_dict(split)
    upstream = upstream_scores(g, z[m_idx], y[m_idx], z_out[non], y_out[non])
    encoder_saw = ("the private part under DP-SGD (privacy.encoder: dp)" if stage1 == "dp-stage1" else
                   "the public part only" if private else "every training example (the members included)")
    common = {"members": "private part" if private else "long-tailed training set",
              "nonmembers": NONMEMBERS,
              "encoder_saw": encoder_saw, "members_seen_by_encoder": stage1 == "dp-stage1" or not private}
    targets = []
    if (ck / "stage2.safetensors").exists():
        scaler = FeatureScaler.fit(z)  # as in training: fit on every training feature
        feats = (load_file(str(ck / "features.safetensors"), device=str(device))
                 if (ck / "features.safetensors").exists() else None)
        pseudo = (scaler.transform(feats["z_pseudo"]), feats["y_pseudo"]) if feats else None
        model = _denoiser(cfg, ck / "stage2.safetensors", z.shape[1], C, device)
        if private and len(pub):  # the public part: disjoint from the private members and the non-members
            z_c, y_c = z[pub], y[pub]
            source = "the public part (disjoint from the private members and from the non-members)"
        else:  # the members are all training examples: data outside the training set and the attack set
            z_pool, y_pool = outside_pool(enc, (reserve, []), (cand, non))
            pick = draw_per_class(y_pool.cpu().numpy(), split.counts, np.random.default_rng([seed, 13]))
            z_c, y_c = z_pool[pick], y_pool[pick]
            source = ("reserved half of the test split + unused non-member candidates, with the target's class "
                      "counts where available (the encoder saw none of them, as it saw none of the non-members)")
        control = trained_control(cfg, scaler.transform(z_c), y_c, C, seed, ck / "control-stage2.safetensors",
                                  source)
        z_pop, y_pop = outside_pool(enc, (reserve, []), (cand, non), (split.train, m_idx))
        targets.append(Target("ldmlr", model, (scaler.transform(z[m_idx]), y[m_idx]),
                              (scaler.transform(z_out[non]), y_out[non]), pseudo, control, groups, upstream,
                              (scaler.transform(z_pop), y_pop), np.asarray(split.counts),
                              {**common, "trained_on": "the whole long-tailed training set"}))
    if (ck / "dp-stage2.safetensors").exists():
        p = cfg.privacy
        scaler = FeatureScaler.fit(z[pub])
        space = lambda v: clip_rows(scaler.transform(v), p.feature_radius)  # noqa: E731 — as in training
        view = lambda m: sampling_view(m, p, C)  # noqa: E731
        model = view(_denoiser(cfg, ck / "dp-stage2.safetensors", z.shape[1], C, device))
        warm = ck / "public-stage2.safetensors"
        if not len(pub):
            raise ValueError(f"{run_dir}: the run has no public part, so its DP denoiser has no control")
        if warm.exists():  # DP-LDMLR's own public warm start: the DP target minus the private data
            control = Control("the public part: DP-LDMLR's public warm start (the target before its private "
                              "training)", np.bincount(split.train.y[pub], minlength=C).tolist(),
                              lambda: view(_denoiser(cfg, warm, z.shape[1], C, device)), (space(z[pub]), y[pub]))
        else:
            control = trained_control(cfg, space(z[pub]), y[pub], C, seed, ck / "control-dp-stage2.safetensors",
                                      "the public part, trained as the non-private stage 2 in the DP feature space",
                                      view)
        targets.append(Target("dp-ldmlr", model, (space(z[m_idx]), y[m_idx]), (space(z_out[non]), y_out[non]),
                              None, control, groups, upstream, None, None,
                              {**common, "trained_on": "the private part (DP-SGD)"}))
    return targets


# ---------------------------------------------------------------------------------------------------
# LiRA with shadows that mimic the target's training distribution
# ---------------------------------------------------------------------------------------------------

def shadow_split(y_attack: np.ndarray, y_population: np.ndarray, counts: np.ndarray, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One shadow training set with the target's class counts (Carlini et al. 2022 train shadows on the
    target's data distribution; here that distribution is long-tailed, so a balanced or arbitrary shadow
    set would calibrate the test on the wrong model).

    Per class c: half of the attack set's class-c examples go in (each example is in about half of the
    shadows — a random extra one when their number is odd — capped at ``counts[c]``), and the rest of
    ``counts[c]`` is drawn from the attacker's other data of class c (``y_population``). Returns
    (inside: bool mask over the attack set, population indices used, shortfall per class — examples the
    population lacked, 0 when the shadow has exactly the target's counts)."""
    y_attack, y_population = np.asarray(y_attack), np.asarray(y_population)
    inside = np.zeros(len(y_attack), dtype=bool)
    fill, short = [], np.zeros(len(counts), dtype=np.int64)
    for c, n_c in enumerate(np.asarray(counts, dtype=np.int64)):
        a = np.flatnonzero(y_attack == c)
        h = min(int(n_c), len(a) // 2 + int(len(a) % 2 == 1 and rng.random() < 0.5))
        inside[rng.choice(a, h, replace=False)] = True
        pool = np.flatnonzero(y_population == c)
        want = int(n_c) - h
        fill.append(rng.choice(pool, min(want, len(pool)), replace=False))
        short[c] = max(0, want - len(pool))
    return inside, np.sort(np.concatenate(fill)) if fill else np.zeros(0, dtype=np.int64), short


def lira_attack(t: Target, cfg: RunConfig, schedule, seed: int, shadows: int
                ) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray]]:
    """Online LiRA (Carlini et al. 2022) on a non-private LDMLR denoiser: ``shadows`` shadow denoisers, each
    trained exactly as the target's stage 2 (same config, its own seed) on a set with the *target's class
    counts* (``shadow_split``): half of the attack set plus the attacker's other data (the reserved test half,
    unused non-member candidates, unattacked training examples). The per-example statistic is the loss attack's score; the
    same test is applied to the control. Cost: ``shadows`` stage-2 trainings (``diffusion.steps`` each)."""
    from pfdiff.evaluation import mia
    from pfdiff.longtail.ldmlr import train_feature_diffusion

    if t.population is None or t.train_counts is None:
        raise ValueError(f"target {t.name!r} has no attacker population or training counts for LiRA shadows")
    u, y = torch.cat([t.members[0], t.nonmembers[0]]), torch.cat([t.members[1], t.nonmembers[1]])
    u_pop, y_pop = t.population
    kw = mia.attack_settings(schedule.T)["loss"]

    def score(model) -> np.ndarray:
        return np.asarray(mia.loss_scores(cfg.diffusion.denoiser(model, schedule), u, y, seed=seed, **kw))

    C = len(t.train_counts)
    s_in, s_out = np.full((shadows, len(y)), np.nan), np.full((shadows, len(y)), np.nan)
    rng = np.random.default_rng([seed, 17])
    shortfall = np.zeros(C, dtype=np.int64)
    for k in range(shadows):
        inside, fill, short = shadow_split(y.cpu().numpy(), y_pop.cpu().numpy(), t.train_counts, rng)
        shortfall = np.maximum(shortfall, short)
        x_s, y_s = torch.cat([u[inside], u_pop[fill]]), torch.cat([y[inside], y_pop[fill]])
        shadow, _ = train_feature_diffusion(x_s, y_s, C, cfg, seed * 1000 + k + 1, None, None)
        s = score(shadow)
        s_in[k, inside], s_out[k, ~inside] = s[inside], s[~inside]
    n = len(t.members[1])

    def test(model) -> tuple[dict[str, Any], np.ndarray]:
        stat = mia.lira_scores(score(model), s_out, s_in)
        return {**mia.attack_metrics(stat[:n], stat[n:]),
                **mia.grouped_metrics(stat[:n], stat[n:], t.members[1], t.nonmembers[1], t.groups or {})}, stat

    out, stat = test(t.model)
    out.update({"shadows": shadows, "shadow_counts": t.train_counts.tolist(), "shadow_shortfall": shortfall.tolist()})
    if t.control is not None:
        out["control"] = test(t.control.model())[0]
    return out, (stat[:n], stat[n:])


# ---------------------------------------------------------------------------------------------------
# attacking
# ---------------------------------------------------------------------------------------------------

def _copying(model, t: Target, cfg: RunConfig, schedule, seed: int, pseudo=None) -> dict[str, Any]:
    """The copying check on released pseudo-features (or 50 fresh samples per class of ``model``, sampled on
    the device of the target's features)."""
    from pfdiff.evaluation import mia

    if pseudo is None:
        C = int(max(t.members[1].max(), t.nonmembers[1].max())) + 1
        pseudo = sample_features(model, schedule, np.full(C, 50), cfg.diffusion, seed, t.members[0].device,
                                 tag="attack-pseudo")
    return mia.nearest_neighbour_check(*pseudo, *t.members, *t.nonmembers, seed=seed)


def _attack_model(model, t: Target, cfg: RunConfig, schedule, seed: int, attacks: tuple[str, ...]):
    from pfdiff.evaluation import mia

    return mia.run_attacks(cfg.diffusion.denoiser(model, schedule), *t.members, *t.nonmembers, attacks=attacks,
                           seed=seed, attack_kwargs=attack_settings(schedule.T), groups=t.groups or {})


def _upstream_metrics(t: Target) -> dict[str, Any]:
    from pfdiff.evaluation import mia

    return {name: {**mia.attack_metrics(m, n),
                   **mia.grouped_metrics(m, n, t.members[1], t.nonmembers[1], t.groups or {})}
            for name, (m, n) in t.upstream.items()}


def attack_targets(targets: list[Target], cfg: RunConfig, seed: int, attacks: tuple[str, ...], lira: int = 0
                   ) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Run the attacks and the copying check on each target and on its control:
    ({target: results, with results["control"] = the control's results}, {curve name: scores}). The control
    is nested, so the keys stay the released models; one control serving several targets is attacked once."""
    schedule = cfg.diffusion.make_schedule()
    results, curves, done = {}, {}, {}  # done: id(control) → its results
    for t in targets:
        t0 = time.perf_counter()
        metrics, scores = _attack_model(t.model, t, cfg, schedule, seed, attacks)
        entry: dict[str, Any] = dict(metrics)
        curves.update({f"{t.name} · {name} (seed {seed})": s for name, s in scores.items()})
        if lira and t.name == "ldmlr":  # shadows are trained as the (non-private) target was
            entry["lira"], curves[f"{t.name} · lira (seed {seed})"] = lira_attack(t, cfg, schedule, seed, lira)
        entry["copying"] = _copying(t.model, t, cfg, schedule, seed, t.pseudo)
        entry["n_members"] = int(len(t.members[1]))
        entry["upstream"] = _upstream_metrics(t)
        entry["setup"] = t.setup
        if t.control is not None:
            key = id(t.control)
            if key not in done:
                c_metrics, c_scores = _attack_model(t.control.model(), t, cfg, schedule, seed, attacks)
                if "loss" in c_scores:
                    curves[f"{control_name(t.name)} · loss (seed {seed})"] = c_scores["loss"]
                done[key] = {**c_metrics, "copying": _copying(t.control.model(), t, cfg, schedule, seed),
                             "n_members": entry["n_members"], "trained_on": t.control.source,
                             "train_counts": t.control.counts}
            entry[CONTROL] = done[key]
        entry["seconds"] = time.perf_counter() - t0
        results[t.name] = entry
    return results, curves


def attack_run(run_dir: Path, attacks: tuple[str, ...] = ("loss", "secmi", "pia"), lira: int = 0) -> dict[str, Any]:
    """Attack every denoiser of every seed: {"seeds": {seed: {target: …}}, "roc_curves": …}."""
    run = RunDir.open(run_dir)
    cfg = run.config()
    out: dict[str, Any] = {"attacks": list(attacks), "seeds": {}, "roc_curves": {}}
    for seed in cfg.seeds:
        targets = load_targets(run_dir, seed) if (run.checkpoints / f"seed{seed}").exists() else []
        if targets:
            results, curves = attack_targets(targets, cfg, seed, attacks, lira)
            out["seeds"][str(seed)] = results
            out["roc_curves"].update(curves)
    if not out["seeds"]:
        raise FileNotFoundError(f"{run_dir} has no trained denoiser to attack (no checkpoints/seedN/stage2 or dp-stage2)")
    return out


# ---------------------------------------------------------------------------------------------------
# the attack report (attack.md)
# ---------------------------------------------------------------------------------------------------

def _f(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def _pairs(att: dict[str, Any]):
    """(seed, target name, target results, control results or None) for every attacked target."""
    for seed, res in att["seeds"].items():
        for name, r in res.items():
            yield seed, name, r, r.get(CONTROL)


def attack_tables(att: dict[str, Any]) -> list[str]:
    """Markdown: pooled target-vs-control table, per-group table, no-denoiser statistics, setup."""
    from pfdiff.report import markdown_table

    pooled, grouped, upstream, setup = [], [], [], []
    for seed, name, r, c in _pairs(att):
        names = [*att["attacks"], *(["lira"] if "lira" in r else [])]
        for a in names:
            ca = (c or {}).get(a) if a != "lira" else r["lira"].get("control")
            pooled.append([seed, name, a, _f(r[a]["auc"]), _f(ca and ca["auc"]), _f(r[a]["tpr_at_1pct_fpr"]),
                           _f(ca and ca["tpr_at_1pct_fpr"]), r["n_members"]])
            for g, m in r[a].get("per_group", {}).items():
                cm = (ca or {}).get("per_group", {}).get(g, {})
                grouped.append([seed, name, a, g, m["n_members"], _f(m["auc"]), _f(cm.get("auc")),
                                _f(m["tpr_at_1pct_fpr"]), _f(cm.get("tpr_at_1pct_fpr"))])
        up = r.get("upstream", {})
        if up:
            upstream.append([seed, name, *(_f(up[k]["auc"]) for k in ("feature_norm", "stage1_loss"))])
        s = r.get("setup", {})
        setup.append([seed, name, s.get("trained_on", "–"), s.get("members", "–"), s.get("encoder_saw", "–"),
                      (c or {}).get("trained_on", "no control")])
    md = ["## Target against control", "",
          "Control: a denoiser trained the same way on data containing neither the members nor the non-members, "
          "attacked with the same scores; its AUC is what *no membership signal* looks like through this "
          "pipeline. Read the target's AUC against the control's, not against 0.5.", "",
          markdown_table(["seed", "denoiser", "attack", "AUC", "control AUC", "TPR@1%FPR", "control TPR@1%FPR",
                          "members"], pooled), "",
          "## Per class group", "",
          "Groups by training count (the run's rule). Few classes contribute every member they have; with fewer "
          "than 100 non-members in a group, TPR@1%FPR is the TPR at zero false positives.", "",
          markdown_table(["seed", "denoiser", "attack", "group", "members", "AUC", "control AUC", "TPR@1%FPR",
                          "control TPR@1%FPR"], grouped)]
    if upstream:
        md += ["", "## Statistics without a denoiser", "",
               "AUC of the raw feature norm ‖E(x)‖ and of the negated stage-1 classifier loss (higher = member): "
               "≈ 0.5 when the encoder treats members and non-members alike.", "",
               markdown_table(["seed", "member set of", "feature-norm AUC", "stage-1 loss AUC"], upstream)]
    md += ["", "## Who saw what", "",
           markdown_table(["seed", "denoiser", "trained on", "attacked members", "encoder saw", "control trained on"],
                          setup)]
    return md


def write_attack_markdown(att: dict[str, Any], path: Path, title: str) -> Path:
    from pfdiff.runs import atomic_write_text

    atomic_write_text(path, "\n".join([f"# Membership inference: {title}", "", *attack_tables(att), ""]))
    return path


def attack_and_report(run_dir: Path, attacks: tuple[str, ...] = ("loss", "secmi", "pia"), lira: int = 0) -> Path:
    """``pfdiff attack``: attack, write ``attack.json`` (each target's control nested under "control"),
    ``attack.md`` (target against control, per group, no-denoiser statistics) and ``plots/roc.png``, and
    re-render the report."""
    from pfdiff.evaluation.mia import plot_roc
    from pfdiff.report import render_report

    run = RunDir.open(run_dir)
    out = attack_run(run_dir, attacks, lira)
    curves = out.pop("roc_curves")
    run.write_json("attack.json", out)
    write_attack_markdown(out, run.path / "attack.md", run.path.name)
    plot_roc(curves, run.plots / "roc.png", title=f"membership inference: {run.path.name}")
    return render_report(run)
