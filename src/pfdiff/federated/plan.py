"""What ``pfdiff fed`` would do for one (α, seed), without doing it (``pfdiff fed --dry-run``).

``pfdiff check`` plans the centralised pipeline (``pfdiff.plan``); a federated run has other stages: the clients'
partition, the FedAvg rounds of E + G (or the public encoder), the statistics phase, the baselines, the warm-up
and every method's diffusion rounds, with the bytes a round moves and, under ``fed.dp = example``, each client's
DP-SGD noise. :func:`fed_plan` computes them from the config alone (the same partition and σ calibration the run
uses; nothing is trained, sent or written); :func:`render_fed_plan` turns the plan into lines.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pfdiff.config import RunConfig
from pfdiff.federated import task
from pfdiff.federated.wire import record_bytes
from pfdiff.text import plural

AUX = ("fedddpm", "fedddpm+", "progressive")  # the methods with the warm-up pool (server_app.AUX_METHODS)
MB = 1e6


def fed_plan(cfg: RunConfig) -> dict[str, Any]:
    """The plan of one federated run (call ``server_app.check_plan`` first: this does not re-check)."""
    f = cfg.fed
    sizes = [len(i) for i in task.client_indices(cfg, f.num_clients)]
    per_round = min(f.clients_per_round or f.num_clients, f.num_clients)
    model_bytes = record_bytes(task.to_wire(task.build_global_denoiser(cfg, device="cpu").state_dict()))
    model_mb = model_bytes / MB
    enc_mb = record_bytes(task.to_wire(task.build_encoder_classifier(cfg, device="cpu").state_dict())) / MB
    stages = []
    if f.encoder == "public":
        stages.append({"stage": "encoder", "what": f"E + G on the server's public part, "
                       f"{f.encoder_rounds * f.encoder_local_steps} steps", "mb": 0.0})
    else:
        stages.append({"stage": "encoder", "what": f"FedAvg of E + G: {f.encoder_rounds} rounds × "
                       f"{f.encoder_local_steps} local steps, {per_round} clients per round",
                       "mb": 2 * per_round * f.encoder_rounds * enc_mb})
    stages.append({"stage": "stats", "what": "every client encodes its data once and reports class counts"
                   + (" (noisy)" if f.dp == "example" and cfg.privacy.count_epsilon > 0 else ""), "mb": None})
    if f.dp == "none" and f.reweight_rounds > 0:
        stages.append({"stage": "fedavg-reweight", "what": f"FedAvg of G with class weights: {f.reweight_rounds} "
                       "rounds", "mb": None})
    if "creff" in f.baselines and f.dp != "client":
        stages.append({"stage": "creff", "what": f"{f.rounds} rounds of per-class gradient sums, "
                       f"{f.creff_features_per_class} federated features per class", "mb": None})
    if any(m in AUX for m in f.methods):
        stages.append({"stage": "warm-up", "what": f"every client trains a denoiser for {f.warmup_steps} steps and "
                       f"uploads {'it' if f.warmup_upload == 'model' else 'pseudo-features'}; pool of "
                       f"{f.aux_size} ({f.pool_quota} quotas)", "mb": None})
    for m in f.methods:
        server = (f" + {f.server_steps} server steps per round" if m in ("fedddpm", "progressive") else
                  " (stops early on the quick test)" if m == "fedddpm+" else "")
        stages.append({"stage": m, "what": f"{f.rounds} rounds × {f.local_steps} local steps, {per_round} clients "
                       f"per round{server}", "mb": 2 * per_round * f.rounds * model_mb, "at_most": m == "fedddpm+"})
    return {"alpha": f.alpha, "seed": cfg.seeds[0], "clients": f.num_clients, "per_round": per_round,
            "client_sizes": sizes, "denoiser_bytes": model_bytes, "stages": stages, "privacy": _privacy(cfg, sizes)}


def _privacy(cfg: RunConfig, sizes: list[int]) -> dict[str, Any]:
    f, p = cfg.fed, cfg.privacy
    if f.dp == "none":
        return {"mode": "none", "line": "no differential privacy (every release is exact)"}
    if f.dp == "client":
        return {"mode": "client", "line": f"client-level DP of the FedAvg rounds (noise multiplier "
                                          f"{f.client_noise_multiplier:g}); ε computed at the end"}
    small, large = task.client_dp_plan(cfg, min(sizes)), task.client_dp_plan(cfg, max(sizes))
    return {"mode": "example", "sigma": [small.sigma, large.sigma],
            "line": f"example-level DP-SGD on every client: ε ≤ {p.target_epsilon:g} per method at δ = {p.delta:g}; "
                    f"σ {small.sigma:.3g} (client of {min(sizes)} examples) … {large.sigma:.3g} ({max(sizes)}); "
                    "releasing every method together composes (the report states it)"}


def render_fed_plan(plan: dict[str, Any]) -> list[str]:
    sizes = np.asarray(plan["client_sizes"])
    total = sum(s["mb"] for s in plan["stages"] if s["mb"])
    out = [f"  {plural(plan['clients'], 'client')} ({plan['per_round']} per round), examples per client "
           f"{sizes.min()}–{sizes.max()} (median {int(np.median(sizes))}); denoiser {plan['denoiser_bytes']:,} B"]
    for s in plan["stages"]:
        mb = "" if s["mb"] is None else f" — {'≤ ' if s.get('at_most') else ''}{s['mb']:.1f} MB sent+received"
        out.append(f"  {s['stage']}: {s['what']}{mb}")
    out += [f"  bytes of the stages above: ≈ {total:.1f} MB (stats, baselines and warm-up not estimated)",
            f"  privacy: {plan['privacy']['line']}"]
    return out
