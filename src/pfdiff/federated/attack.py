"""Membership inference against the global denoisers of a federated run (members: the clients' data).

Members are the examples the clients held (the union of the partitions: the federation as a whole
is attacked, as an outside observer of the final model would), non-members the held-out pool
examples of ``LongTailSplit.heldout``, balanced per class; features from the run's global encoder
and scaler, clipped to the feature radius under example-level DP as the clients did.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pfdiff.config import load_config
from pfdiff.federated import task
from pfdiff.federated.server_app import METHODS, method_checkpoint
from pfdiff.longtail.common import encode
from pfdiff.longtail.ldmlr import FeatureScaler
from pfdiff.evaluation.mia import balanced_pairs
from pfdiff.longtail.membership import Target
from pfdiff.runs import load_state


def load_fed_targets(run_dir: Path, seed: int = 0) -> list[Target]:
    """The final global denoiser of every method of a federated run directory."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    split = task.split_of(cfg)
    enc_clf = task.load_arrays(task.build_encoder_classifier(cfg), load_state(run_dir / "encoder.safetensors")["model"])
    sc = load_state(run_dir / "scaler.safetensors")
    scaler = FeatureScaler(sc["mean"], sc["std"])
    _, priv = task.public_private_indices(cfg)
    x, y = torch.as_tensor(split.train.x[priv]), torch.as_tensor(split.train.y[priv])
    x_out, y_out = torch.as_tensor(split.heldout.x), torch.as_tensor(split.heldout.y)
    mem, non = balanced_pairs(y.numpy(), y_out.numpy(), split.num_classes, seed)
    u, u_out = scaler.transform(encode(enc_clf["encoder"], x[mem])), scaler.transform(encode(enc_clf["encoder"], x_out[non]))
    targets = []
    for m in METHODS:  # every method finished in this directory (a resumed run may list fewer in its config)
        path = method_checkpoint(run_dir, m)
        if path.exists():
            model = task.load_arrays(task.build_global_denoiser(cfg), load_state(path)["model"]).eval()
            model = task.sampling_view(model, cfg)  # as the server samples it (labels withheld on t ≥ S)
            targets.append(Target(f"fed-{m}", model, (u, y[mem]), (u_out, y_out[non]), None))
    if not targets:
        raise FileNotFoundError(f"{run_dir} has no finished federated method to attack")
    return targets


def attack_fed_run(run_dir: Path, attacks: tuple[str, ...] = ("loss", "secmi", "pia")) -> Path:
    """``pfdiff attack`` on a federated run directory: ``attack.json`` and ``roc.png`` next to its results."""
    from pfdiff.evaluation.mia import plot_roc
    from pfdiff.longtail.membership import attack_targets
    from pfdiff.runs import atomic_write_json

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    results, curves = attack_targets(load_fed_targets(run_dir), cfg, 0, attacks)
    atomic_write_json(run_dir / "attack.json", {"attacks": list(attacks), "seeds": {"0": results}})
    plot_roc(curves, run_dir / "roc.png", title=f"membership inference: federated {run_dir.name}")
    return run_dir / "attack.json"
