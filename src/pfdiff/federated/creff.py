"""CReFF as a federated baseline: classifier re-training with federated features (Shang et al., IJCAI 2022).

Each round every client sends, for the current re-trained classifier φ, the per-class sums of the gradient of
φ's cross-entropy on its real features (``task.class_gradient_sums``) and its class counts; without DP it also
trains G locally (FedAvg of G goes on, as the paper's FedAvg of the model). The server

1. aggregates the real gradients per class, weighted by the clients' class counts (paper, eq. 6):
   g_c = Σ_k S_c^k / Σ_k n_c^k with S_c^k client k's gradient sum of class c;
2. optimises ``fed.creff_features_per_class`` learnable *federated features* per class for
   ``fed.creff_match_steps`` SGD steps (``fed.creff_lr_feature``) so that the gradient of φ's CE on them matches
   g_c (:class:`GradientMatch`, the dataset-condensation distance);
3. re-trains a copy of G on the federated features for ``fed.creff_retrain_epochs`` epochs: the new φ, which is
   what is evaluated (and where the next round's gradients are taken).

In pfdiff the encoder E is fixed after phase 1, so CReFF works on E's cached features; only G is federated.
Under ``fed.dp = example`` the gradient sums are clipped per example and noised on the clients (the server sees
only the noisy sums and the already-noisy counts) and G is not trained locally. See docs/federated.md.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import nn

from pfdiff.config import RunConfig
from pfdiff.federated import task
from pfdiff.federated.strategy import make_strategy
from pfdiff.federated.wire import MESSAGE_TYPES
from pfdiff.privacy.dpsgd import per_example_grads
from pfdiff.runs import load_state, save_state
from pfdiff.training import generator

if TYPE_CHECKING:
    from flwr.app import Message

    from pfdiff.federated.server_app import Server

log = logging.getLogger("pfdiff.federated")

PHASE = "creff"
BASELINES = ("fedavg-reweight", "creff")


def skip_reasons(cfg: RunConfig) -> dict[str, str]:
    """The federated baselines this configuration does not run because of ``fed.baselines`` or of CReFF's
    privacy story, each with its one-line reason (``server_app.skipped_baselines`` gives the others)."""
    f, out = cfg.fed, {}
    for name in BASELINES:
        if name not in f.baselines:
            out[name] = "not in fed.baselines"
    if "creff" in f.baselines and f.dp == "client":
        out["creff"] = ("not run under fed.dp = client: its per-class gradients are not covered by the "
                        "client-level FedAvg noise")
    return out


# ---------------------------------------------------------------- the matching loss


def _rows(g: torch.Tensor) -> torch.Tensor:
    """[C, out, rest] per class: a weight's output rows; a vector parameter (bias) is one row."""
    return g[:, None, :] if g.dim() == 2 else g.flatten(2)


class GradientMatch:
    """Gradient-matching distance of dataset condensation (Zhao et al. 2021, eq. 10; CReFF's ``match_loss``):
    per class, Σ over parameters and their output rows of 1 − cos(g_syn, g_real). Unreduced: one value per
    class, ``[C]``; the caller sums over the classes it matches."""

    eps = 1e-6

    def __call__(self, g_syn: dict[str, torch.Tensor], g_real: dict[str, torch.Tensor]) -> torch.Tensor:
        out = 0.0
        for k, real in g_real.items():
            s, r = _rows(g_syn[k]), _rows(real)
            cos = (s * r).sum(-1) / (s.norm(dim=-1) * r.norm(dim=-1) + self.eps)
            out = out + (1 - cos).sum(-1)
        return out


def synthetic_gradients(classifier: nn.Module, features: torch.Tensor) -> dict[str, torch.Tensor]:
    """∇_φ of the mean CE of φ on the federated features of each class, ``{name: [C, *shape]}``, differentiable
    in ``features`` [C, M, d] (the second-order term the matching step needs)."""
    # one "example" of per_example_grads per class: the block of its M features, [1, M, d]
    def class_loss(model, f: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(f[0]), c.expand(f.shape[1]))[None]

    labels = torch.arange(len(features), device=features.device)
    return per_example_grads(classifier, class_loss, features, labels,
                             names=[k for k, _ in classifier.named_parameters()])


# ---------------------------------------------------------------- server steps


def aggregate_gradients(sums: list[dict[str, torch.Tensor]], counts: list[np.ndarray]
                        ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """g_c = Σ_k S_c^k / Σ_k n_c^k (the clients' gradients weighted by their class counts) and the classes
    with a positive total count (the others are not matched this round, as in CReFF's code)."""
    n = torch.as_tensor(np.sum(counts, axis=0), dtype=torch.float32, device=next(iter(sums[0].values())).device)
    valid = n > 0
    g = {k: sum(s[k] for s in sums) / n.clamp_min(1).view(-1, *[1] * (sums[0][k].dim() - 1)) for k in sums[0]}
    return g, valid


def init_features(num_classes: int, per_class: int, dim: int, seed: int, device) -> torch.Tensor:
    """The federated features before the first match, [C, M, d] ~ N(0, 1) as in CReFF's code (seeded). Tried
    and dropped: starting from the scaler's Gaussian (E's feature mean/std) matched far more slowly on digits-LT
    (distance 106 → 80 in 800 steps against 104 → 48 in 100), the larger features saturating φ's softmax."""
    z = torch.randn(num_classes, per_class, dim, generator=generator("cpu", seed, "creff-init"))
    return z.to(device)


def match_features(classifier: nn.Module, features: torch.Tensor, g_real: dict[str, torch.Tensor],
                   valid: torch.Tensor, steps: int, lr: float) -> tuple[torch.Tensor, list[float]]:
    """``steps`` SGD steps on the federated features of the ``valid`` classes minimising Σ_c GradientMatch
    (CReFF's ``update_feature_syn``); the features and the loss before and after."""
    match, f = GradientMatch(), features.detach().clone().requires_grad_(True)
    opt = torch.optim.SGD([f], lr=lr)
    # the loss at φ is fixed during the steps: φ's parameters are detached inside ``synthetic_gradients``

    def loss() -> torch.Tensor:
        return match(synthetic_gradients(classifier, f), g_real)[valid].sum()

    before = float(loss().detach())
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        value = loss()
        value.backward()
        opt.step()
    return f.detach(), [before, float(loss().detach())]


def retrain_classifier(classifier: nn.Module, features: torch.Tensor, epochs: int, lr: float, batch_size: int,
                       seed: int, tag: tuple) -> nn.Module:
    """``epochs`` epochs of plain SGD on the federated features (CReFF's ``feature_re_train``); ``classifier``
    is trained in place and returned in eval mode."""
    # our own loop, not longtail.common.train_classifier_on_features: CReFF re-trains with plain SGD (lr_net),
    # thousands of tiny steps per round, where the pipeline's trainer (AdamW, checkpoints, logs) only adds cost
    z, y = labelled(features)
    opt = torch.optim.SGD(classifier.parameters(), lr=lr)
    classifier.train()
    for e in range(epochs):
        order = torch.randperm(len(y), generator=generator("cpu", seed, "creff-retrain", *tag, e)).to(z.device)
        for idx in order.split(batch_size):
            loss = nn.functional.cross_entropy(classifier(z[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return classifier.eval()


# ---------------------------------------------------------------- the phase (checkpointed after every round)


def split_reply(reply: Message, device) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """A client's gradient sums (on ``device``) and counts; its arrays keep only G's (``g.*`` → plain keys) for
    FedAvg."""
    arrays = reply.content["arrays"]
    state = arrays.to_torch_state_dict()
    sums = {k.removeprefix("grad."): v.to(device) for k, v in state.items() if k.startswith("grad.")}
    reply.content["arrays"] = task.to_wire({k.removeprefix("g."): v for k, v in state.items() if k.startswith("g.")})
    return sums, np.asarray(reply.content["metrics"]["counts"], dtype=np.float64)


def _save(path, g, phi, features, st, best, best_features) -> None:
    save_state(path, {"g": g.state_dict(), "phi": phi.state_dict(), "features": features, "state": st,
                      "best": best.state_dict(), "best_features": best_features})


def run_creff(srv: Server, enc_clf: nn.ModuleDict, score: Callable[[nn.Module], float] | None = None
              ) -> dict[str, Any]:
    """CReFF's ``fed.rounds`` rounds (``<run-dir>/creff/checkpoint.safetensors`` after every round) and the round
    state (history with bytes, rounds started). Returned classifier: with ``score`` (the validation balanced
    accuracy of a classifier, ``fed.creff_round = validation``) the round's re-trained φ that scored best (the
    earliest among equals; ``state["chosen_round"]``), else the final φ. Taking the best round on validation
    only strengthens the baseline: its φ can fall far from the previous round's when the matched features move."""
    cfg, f = srv.cfg, srv.cfg.fed
    path = srv.dir / "creff" / "checkpoint.safetensors"
    g, phi = copy.deepcopy(enc_clf["classifier"]), copy.deepcopy(enc_clf["classifier"])
    best = copy.deepcopy(phi)
    features = init_features(srv.C, f.creff_features_per_class, enc_clf["encoder"].feature_dim, srv.seed,
                             srv.device)
    best_features = features
    st: dict[str, Any] = {"round": 0, "rounds_started": 0, "client_rounds": {}, "history": {},
                          "chosen_round": None, "chosen_score": None}
    if path.exists():
        saved = load_state(path, srv.device)
        g.load_state_dict(saved["g"])
        phi.load_state_dict(saved["phi"])
        best.load_state_dict(saved["best"] if "best" in saved else saved["phi"])
        features, st = saved["features"], saved["state"]
        best_features = saved.get("best_features", features)
        st.setdefault("chosen_round", None)
        st.setdefault("chosen_score", None)
        # a checkpoint from before client sampling: every client took part in every round started
        st.setdefault("client_rounds", {str(p): st["rounds_started"] for p in range(len(srv.nodes))})
        log.info("creff: resuming after round %s", st["round"])
    # CReFF's round r goes to the clients of the diffusion methods' round r (fed.clients_per_round): same draw
    strategy = make_strategy(cfg, len(srv.nodes), client_dp=False, message_type=MESSAGE_TYPES[PHASE],
                             select=srv.selector("diffusion"))
    private = f.dp == "example"
    for r in range(st["round"] + 1, f.rounds + 1):
        # write-ahead, as the diffusion rounds: a round re-sent after a resume draws new noise
        st["rounds_started"] = st["rounds_started"] + 1 if srv.private_noise else max(st["rounds_started"], r)
        st["client_rounds"] = srv.count_rounds(st["client_rounds"], "diffusion", r)
        _save(path, g, phi, features, st, best, best_features)
        t0, b0, up0 = time.perf_counter(), srv.wire.totals()["total"], srv.wire.received.get(PHASE, 0)
        # under DP the clients take no G steps (they would be a release without a guarantee): φ only
        arrays = task.to_wire({**({} if private else {f"g.{k}": v for k, v in g.state_dict().items()}),
                               **{f"phi.{k}": v for k, v in phi.state_dict().items()}})
        replies = srv.wire.exchange(strategy.configure_train(r, arrays, srv.config(PHASE), srv.grid), PHASE, r)
        row: dict[str, Any] = {"replies": len(replies)}
        if len(replies) < f.min_replies:
            log.warning("creff round %s: %s replies (< minimum); nothing is updated", r, len(replies))
            row["skipped"] = True
        else:
            parts = [split_reply(rep, srv.device) for rep in replies]
            if not private:
                g.load_state_dict(strategy.aggregate_train(r, replies)[0].to_torch_state_dict())
            g_real, valid = aggregate_gradients([p[0] for p in parts], [p[1] for p in parts])
            features, row["match_loss"] = match_features(phi, features, g_real, valid, f.creff_match_steps,
                                                         f.creff_lr_feature)
            phi = retrain_classifier(copy.deepcopy(g), features, f.creff_retrain_epochs, f.creff_lr_net,
                                     f.creff_batch_size, srv.seed, (r,))
            row["matched_classes"] = int(valid.sum())
            if score is not None:
                row["val_balanced"] = value = score(phi)
                if st["chosen_score"] is None or value > st["chosen_score"]:
                    best.load_state_dict(phi.state_dict())
                    best_features = features
                    st["chosen_round"], st["chosen_score"] = r, value
        row.update(bytes=srv.wire.totals()["total"] - b0, upload_bytes=srv.wire.received.get(PHASE, 0) - up0,
                   seconds=time.perf_counter() - t0)
        st["history"][str(r)] = row
        st["round"] = r
        _save(path, g, phi, features, st, best, best_features)
    chosen = st["chosen_round"] is not None
    return {"classifier": best.eval() if chosen else phi, "features": best_features if chosen else features,
            "state": st}


def labelled(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The federated features [C, M, d] as rows [C·M, d] and their labels (class c for the c-th block)."""
    y = torch.arange(len(features), device=features.device).repeat_interleave(features.shape[1])
    return features.flatten(0, 1), y


def summary(out: dict[str, Any], accuracy: dict[str, Any]) -> dict[str, Any]:
    """CReFF's results row: the re-trained classifier's accuracy with its rounds and bytes."""
    hist = out["state"]["history"]
    return {**accuracy, "rounds": out["state"]["round"], "rounds_started": out["state"]["rounds_started"],
            "chosen_round": out["state"].get("chosen_round"),
            # each round's validation balanced accuracy (with fed.creff_round = validation), for the rounds plot
            "val_per_round": {r: h["val_balanced"] for r, h in hist.items() if "val_balanced" in h},
            "bytes": int(sum(h["bytes"] for h in hist.values())),
            "upload_bytes": int(sum(h["upload_bytes"] for h in hist.values()))}
