"""MNIST-1D sanity check (issue 14, item 1): the dataset paper's balanced table, reproduced with pfdiff's data
loader, encoders and training code before any long-tail result rests on them.

Greydanus 2020 ("Scaling down deep learning", README table): logistic regression 32 %, MLP 68 %, CNN 94 % test
accuracy on the default 4 000 / 1 000 split. Training as in the paper's code (mnist1d notebooks/train.py,
quickstart): Adam, lr 1e-2, no weight decay, batch 100, 6 000 steps (= 150 epochs of 4 000). The data is the
package's own procedural generator with its default arguments (seed 42), never its download. Accuracy is the
one at the last step: nothing is selected on the test set.

Rows (``MODELS``): ``logistic`` = pfdiff's identity encoder + linear G on the 40 raw values; ``mlp`` = the paper's
residual MLP with its train.py ``hidden_size`` (256); ``cnn`` = pfdiff's ``cnn1d`` encoder + linear G. The first
and last go through ``train_stage1`` (the pipelines' stage 1), the MLP through the same loop (``pfdiff.training.
train``, same batches). Extra rows, not checked: ``mlp-h100`` (the MLP class's default width, which the notebooks
use) and ``mlp-pfdiff`` (pfdiff's MLPEncoder). The check: MLP and CNN within 3 points of the paper.

Writes benchmarks/results/mnist1d_sanity.json. Run: .venv/bin/python benchmarks/mnist1d_sanity.py [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pfdiff.config import DataConfig, RunConfig, load_config
from pfdiff.data import ArrayDataset, class_counts, class_groups, load_mnist1d
from pfdiff.longtail.baselines import train_stage1
from pfdiff.longtail.common import LongTailSplit, encode, predict_logits, seeded_init
from pfdiff.runs import atomic_write_json
from pfdiff.training import shuffled_batch, train

OUT = Path(__file__).parent / "results" / "mnist1d_sanity.json"
PAPER = {"logistic": 32.0, "mlp": 68.0, "cnn": 94.0, "mlp-h100": 68.0, "mlp-pfdiff": 68.0}  # % test accuracy
CHECKED = ("mlp", "cnn")  # the criterion: these within TOLERANCE points of the paper
TOLERANCE = 3.0
PAPER_SAMPLES, PAPER_SEED, PAPER_TRAIN = 5000, 42, 4000  # get_dataset_args(): num_samples, seed, train_split·N
LR, BATCH, STEPS = 1e-2, 100, 6000
RECIPE = [f"stage1.lr={LR}", "stage1.weight_decay=0", f"stage1.batch_size={BATCH}",
          f"stage1.epochs={STEPS * BATCH // PAPER_TRAIN}", "model.classifier=linear", "model.feature_dim=64"]


class PaperMLP(nn.Module):
    """The paper's MLP (two ReLU layers, the second residual): its accuracy depends on the width, see docs."""

    def __init__(self, in_dim: int, classes: int, hidden: int):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(in_dim, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, classes)

    def forward(self, x):
        h = self.l1(x).relu()
        return self.l3(h + self.l2(h).relu())


def paper_split(cache_dir: str | Path | None = None) -> tuple[ArrayDataset, ArrayDataset]:
    """The paper's split: the generator's first 4 000 signals train, the last 1 000 test."""
    d = load_mnist1d(PAPER_SAMPLES, PAPER_SEED, cache_dir)
    idx = np.arange(len(d.y))
    return d.subset(idx[:PAPER_TRAIN]), d.subset(idx[PAPER_TRAIN:])


def flat(ds: ArrayDataset) -> ArrayDataset:
    """The same 40 values as a feature vector [N, 40] (logistic regression, MLPs)."""
    return ArrayDataset(ds.x.reshape(len(ds.x), -1), ds.y, ds.num_classes, ds.name)


def _config(encoder: str, width: int) -> RunConfig:
    return load_config(None, RECIPE + [f"model.encoder={encoder}", f"model.width={width}"])


def stage1_model(encoder: str, width: int, layout=lambda d: d):
    """A row trained by ``train_stage1``: pfdiff's ``encoder`` + linear G; returns predict(x) after training."""
    def fit(tr: ArrayDataset, seed: int):
        tr = layout(tr)
        counts = class_counts(tr.y, tr.num_classes)
        split = LongTailSplit(train=tr, test=tr, counts=counts, groups=class_groups(counts))  # test is never read
        enc, g = train_stage1(split, _config(encoder, width), seed, torch.device("cpu"), None, None)
        return (lambda ds: predict_logits(g, encode(enc, torch.as_tensor(layout(ds).x))).argmax(1).numpy()), [enc, g]
    return fit


def paper_mlp(hidden: int):
    """A row trained by pfdiff's loop with stage 1's batches and optimiser: the paper's MLP of width ``hidden``."""
    def fit(tr: ArrayDataset, seed: int):
        tr = flat(tr)
        x, y = torch.as_tensor(tr.x), torch.as_tensor(tr.y)
        model = seeded_init(seed, f"paper-mlp-{hidden}", lambda: PaperMLP(x.shape[1], tr.num_classes, hidden),
                            torch.device("cpu"))
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)

        def step_fn(step: int):
            idx = shuffled_batch(len(y), BATCH, step, seed)
            return nn.functional.cross_entropy(model(x[idx]), y[idx]), {}

        train({"mlp": model}, opt, step_fn, STEPS, description=f"seed {seed} · paper MLP h={hidden}")
        model.eval()
        return (lambda ds: model(torch.as_tensor(flat(ds).x)).argmax(1).detach().numpy()), [model]
    return fit


MODELS = {"logistic": stage1_model("identity", 32, flat), "mlp": paper_mlp(256), "cnn": stage1_model("cnn1d", 32),
          "mlp-h100": paper_mlp(100), "mlp-pfdiff": stage1_model("mlp", 12, flat)}


def train_and_score(kind: str, train_ds: ArrayDataset, test_ds: ArrayDataset, seed: int) -> dict:
    """Train one row and score it once, at the last step (% accuracy)."""
    t0 = time.perf_counter()
    predict, modules = MODELS[kind](train_ds, seed)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        test_acc, train_acc = (100.0 * float((predict(d) == d.y).mean()) for d in (test_ds, train_ds))
    params = sum(p.numel() for m in modules for p in m.parameters())
    return {"seed": seed, "test_acc": round(test_acc, 2), "train_acc": round(train_acc, 2),
            "seconds": round(seconds, 1), "params": params}


def summarise(kind: str, runs: list[dict]) -> dict:
    """Mean ± std over seeds and, for the checked rows, the verdict against the paper."""
    acc = np.array([r["test_acc"] for r in runs])
    out = {"paper": PAPER[kind], "mean": round(float(acc.mean()), 2), "std": round(float(acc.std()), 2),
           "diff": round(float(acc.mean()) - PAPER[kind], 2),
           "seconds_per_seed": round(float(np.mean([r["seconds"] for r in runs])), 1), "runs": runs}
    if kind in CHECKED:
        out["within_tolerance"] = bool(abs(out["diff"]) <= TOLERANCE)
    return out


def generation_seconds(num_samples: int, seed: int) -> float:
    """Wall time of a cold generation (empty cache directory; nothing in memory for these args yet)."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        load_mnist1d(num_samples, seed, tmp)
        return round(time.perf_counter() - t0, 2)


def run(seeds: list[int], kinds: tuple[str, ...] = tuple(MODELS), time_default: bool = False) -> dict:
    """The whole check: cold generation time of the paper's data, then every row for every seed."""
    torch.set_num_threads(1)
    dataset = {"name": "mnist1d", "num_samples": PAPER_SAMPLES, "seed": PAPER_SEED,
               "generation_seconds": generation_seconds(PAPER_SAMPLES, PAPER_SEED)}
    if time_default:
        n = DataConfig().num_samples
        dataset |= {"default_num_samples": n, "default_generation_seconds": generation_seconds(n, 0)}
    train_ds, test_ds = paper_split()  # from memory now
    dataset |= {"train": len(train_ds.y), "test": len(test_ds.y)}
    results = {k: summarise(k, [train_and_score(k, train_ds, test_ds, s) for s in seeds]) for k in kinds}
    return {"dataset": dataset,
            "settings": {"optimizer": "AdamW, weight_decay 0 (= Adam)", "lr": LR, "batch_size": BATCH, "steps": STEPS,
                         "score": "test accuracy at the last step (no selection on test)",
                         "checked": list(CHECKED), "tolerance_points": TOLERANCE, "torch_threads": 1},
            "results": results,
            "machine": {"platform": platform.platform(), "torch": torch.__version__, "python": sys.version.split()[0]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--time-default", action="store_true", help="also time a cold generation of data.num_samples")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    report = run(args.seeds, tuple(args.models), args.time_default)
    atomic_write_json(args.out, report)
    for kind, r in report["results"].items():
        verdict = {True: "  ok", False: "  OUT OF TOLERANCE"}.get(r.get("within_tolerance"), "")
        print(f"{kind:10s} paper {r['paper']:.0f}  measured {r['mean']:.1f} ± {r['std']:.1f}"
              f"  ({r['seconds_per_seed']} s/seed){verdict}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
