"""Membership-inference cost (issue 7): seconds per attack on a quickstart-sized feature denoiser.

Data: sklearn's bundled 8×8 digits as 64-d standardised feature vectors (no download), 500 members
(the denoiser's training set) + 500 non-members. Model: ``build_denoiser(RunConfig(), 64, 10)``
(hidden 256, depth 3) with the default schedule and prediction, trained briefly (``--steps``, 300 by
default; the cost of an attack does not depend on training). Target: every attack on 500 + 500
examples in < 120 s. The AUCs are reported too, but after a short training they say little. Settings are
``attack_settings(T)`` (the ones ``pfdiff attack`` uses: SecMI at the official t_sec = 100, k = 10, plus the
non-default ``secmi-long``); per-class metrics are computed too (``groups``), since every attack table has them.

Writes benchmarks/results/mia.json. Run: .venv/bin/python benchmarks/bench_mia.py [--steps N] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits

from pfdiff.config import RunConfig
from pfdiff.diffusion import DiffusionLoss, make_schedule
from pfdiff.evaluation.mia import ATTACK_FNS, attack_settings, run_attacks, secmi_timesteps
from pfdiff.longtail.ldmlr import build_denoiser
from pfdiff.runs import atomic_write_json
from pfdiff.training import resolve_device

OUT = Path(__file__).parent / "results" / "mia.json"
TARGET_S = 120.0
N_EACH = 500


def digits_split(device) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """500 members and 500 non-members of the standardised digits, a seeded disjoint split."""
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    m, n = perm[:N_EACH], perm[N_EACH:2 * N_EACH]
    return (x[m].to(device), y[m].to(device)), (x[n].to(device), y[n].to(device))


def train_briefly(cfg: RunConfig, members, steps: int, device):
    """Adam on the members with the default diffusion loss; returns (model, schedule, seconds)."""
    d = cfg.diffusion
    schedule = make_schedule(d.schedule, d.T).to(device)
    torch.manual_seed(0)
    model = build_denoiser(cfg, 64, 10).to(device)
    loss_fn = DiffusionLoss(schedule, **d.loss_options())
    opt = torch.optim.Adam(model.parameters(), lr=d.lr)
    x, y = members
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(x), (d.batch_size,), generator=torch.Generator().manual_seed(step)).to(device)
        loss = loss_fn(model, x[idx], y[idx], generator=torch.Generator(device).manual_seed(step)).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), schedule, time.perf_counter() - t0


def calls_per_example(name: str, kw: dict) -> int:
    """Model calls per attacked example: loss 2 draws per timestep; SecMI its inversion steps (grid − 1), the
    step up and the step back; PIA 2."""
    if name == "loss":
        return 2 * len(kw["timesteps"])
    if name.startswith("secmi"):
        return len(secmi_timesteps(kw["t_sec"], kw["k"])[0]) + 1
    return 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps of the denoiser before attacking")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=OUT, help="where to write the JSON report")
    args = parser.parse_args()
    device = resolve_device(args.device)
    cfg = RunConfig()
    members, nonmembers = digits_split(device)
    model, schedule, train_s = train_briefly(cfg, members, args.steps, device)
    settings = attack_settings(schedule.T)
    metrics, _ = run_attacks(cfg.diffusion.denoiser(model, schedule), *members, *nonmembers,
                             attacks=tuple(ATTACK_FNS), attack_kwargs=settings, groups={})
    attacks = {name: {**{k: v for k, v in m.items() if k != "per_class"}, "under_target": m["seconds"] < TARGET_S}
               for name, m in metrics.items()}
    report = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "python": sys.version.split()[0], "machine": platform.machine(),
              "model": {"hidden": cfg.model.denoiser_hidden, "depth": cfg.model.denoiser_depth, "dim": 64,
                        "classes": 10, "prediction": cfg.diffusion.prediction, "schedule": cfg.diffusion.schedule,
                        "T": cfg.diffusion.T, "train_steps": args.steps, "train_seconds": train_s},
              "n_members": N_EACH, "n_nonmembers": N_EACH, "target_seconds": TARGET_S,
              "settings": {name: {**kw, "calls_per_example": calls_per_example(name, kw)}
                           for name, kw in settings.items()},
              "attacks": attacks, "all_under_target": all(a["under_target"] for a in attacks.values())}
    atomic_write_json(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
