"""Membership inference against the global denoisers of a federated run (members: the clients' data).

Members are the examples the clients held (the union of the partitions: the federation as a whole
is attacked, as an outside observer of the final model would), non-members examples nothing was
trained on (``LongTailSplit.heldout`` + half of the test split, ``membership.candidate_pools``),
balanced per class; features from the run's global encoder and scaler. With ``fed.encoder: public``
the encoder, G and scaler saw only the server's public part, i.e. neither set; with a FedAvg encoder
they were trained on the members, and the control below is what measures that confound.

Control (one per run, beside every method): a denoiser of the global model's architecture trained
centrally, as LDMLR's stage 2, on data containing neither the members nor the non-members (the public
part; without one, the reserved half of the test split and unused candidates with the clients' class
counts where available). It is not trained federatedly: its AUC says what the features alone give a denoiser of
this kind, not what a federation of the same size would leak.

Device: models, features and attacks on ``task.device_of(cfg)`` (as the run's server).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pfdiff.config import load_config
from pfdiff.evaluation.mia import balanced_pairs
from pfdiff.federated import task
from pfdiff.federated.server_app import METHODS, method_checkpoint
from pfdiff.longtail.common import encode
from pfdiff.longtail.ldmlr import FeatureScaler
from pfdiff.longtail.membership import (NONMEMBERS, Target, candidate_pools, draw_per_class, group_dict,
                                        outside_pool, trained_control, upstream_scores)
from pfdiff.runs import load_state


def _control(cfg, split, enc, scaler: FeatureScaler, pub: np.ndarray, pools, non: np.ndarray, run_dir: Path):
    """The run's control denoiser (see the module doc), cached at ``<run>/attack-control.safetensors``."""
    device = task.device_of(cfg)
    y_all = torch.as_tensor(split.train.y).to(device)
    if len(pub):
        u = scaler.transform(encode(enc, torch.as_tensor(split.train.x[pub]).to(device)))
        y, source = y_all[pub], "the server's public part, trained centrally as LDMLR's stage 2"
    else:
        cand, reserve = pools
        z_pool, y_pool = outside_pool(enc, (reserve, []), (cand, non))
        pick = draw_per_class(y_pool.cpu().numpy(), split.counts, np.random.default_rng([cfg.seeds[0], 13]))
        u, y = scaler.transform(z_pool[pick]), y_pool[pick]
        source = ("reserved half of the test split + unused non-member candidates (the FedAvg encoder saw none), "
                  "trained centrally")
    return trained_control(cfg, u, y, split.num_classes, cfg.seeds[0], run_dir / "attack-control.safetensors",
                           source, lambda m: task.sampling_view(m, cfg))


def load_fed_targets(run_dir: Path, seed: int = 0) -> list[Target]:
    """The final global denoiser of every method of a federated run directory, all sharing one control."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    split = task.split_of(cfg)
    device = task.device_of(cfg)
    enc_clf = task.load_arrays(task.build_encoder_classifier(cfg), load_state(run_dir / "encoder.safetensors")["model"])
    enc, g = enc_clf["encoder"].eval(), enc_clf["classifier"].eval()
    sc = load_state(run_dir / "scaler.safetensors", device)
    scaler = FeatureScaler(sc["mean"], sc["std"])
    pub, priv = task.public_private_indices(cfg)
    x, y = torch.as_tensor(split.train.x[priv]).to(device), torch.as_tensor(split.train.y[priv]).to(device)
    cand, reserve = candidate_pools(split, seed)
    x_out, y_out = torch.as_tensor(cand.x).to(device), torch.as_tensor(cand.y).to(device)
    mem, non = balanced_pairs(y.cpu().numpy(), y_out.cpu().numpy(), split.num_classes, seed)
    z, z_out = encode(enc, x[mem]), encode(enc, x_out[non])
    u, u_out = scaler.transform(z), scaler.transform(z_out)
    upstream = upstream_scores(g, z, y[mem], z_out, y_out[non])
    control = _control(cfg, split, enc, scaler, pub, (cand, reserve), non, run_dir)
    setup = {"members": "every client's data (the union of the partitions)",
             "nonmembers": NONMEMBERS,
             "encoder_saw": "the public part only" if len(pub) else "every client's data (FedAvg: the members)",
             "members_seen_by_encoder": not len(pub)}
    targets = []
    for m in METHODS:  # every method finished in this directory (a resumed run may list fewer in its config)
        path = method_checkpoint(run_dir, m)
        if path.exists():
            model = task.load_arrays(task.build_global_denoiser(cfg), load_state(path)["model"]).eval()
            model = task.sampling_view(model, cfg)  # as the server samples it (labels withheld on t ≥ S)
            targets.append(Target(f"fed-{m}", model, (u, y[mem]), (u_out, y_out[non]), None, control,
                                  group_dict(split), upstream, setup={**setup, "trained_on": f"federated {m}"}))
    if not targets:
        raise FileNotFoundError(f"{run_dir} has no finished federated method to attack")
    return targets


def attack_fed_targets(run_dir: Path, cfg, attacks: tuple[str, ...]) -> dict[str, Any]:
    """Attack every method of a federated run; their shared control is attacked once (nested in every entry)."""
    from pfdiff.longtail.membership import attack_targets

    results, curves = attack_targets(load_fed_targets(run_dir), cfg, 0, attacks)
    return {"attacks": list(attacks), "seeds": {"0": results}, "roc_curves": curves}


def attack_fed_run(run_dir: Path, attacks: tuple[str, ...] = ("loss", "secmi", "pia")) -> Path:
    """``pfdiff attack`` on a federated run directory: ``attack.json``, ``attack.md`` and ``roc.png`` next to
    its results."""
    from pfdiff.evaluation.mia import plot_roc
    from pfdiff.longtail.membership import write_attack_markdown
    from pfdiff.runs import atomic_write_json

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    out = attack_fed_targets(run_dir, cfg, attacks)
    curves = out.pop("roc_curves")
    atomic_write_json(run_dir / "attack.json", out)
    write_attack_markdown(out, run_dir / "attack.md", f"federated {run_dir.name}")
    plot_roc(curves, run_dir / "roc.png", title=f"membership inference: federated {run_dir.name}")
    return run_dir / "attack.json"
