"""The CIFAR-LT presets end to end on tiny CIFAR-format files the test writes (users bring the real ones)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pfdiff.cli import app
from pfdiff.config import load_config


def write_tiny_cifar10(folder: Path, per_class: int = 24) -> None:
    """Six CIFAR-10 'python version' batches (Python-2 pickles with bytes keys), ``per_class`` images per class."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), per_class)
    rng.shuffle(labels)
    for i, (name, part) in enumerate(zip([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"],
                                         np.array_split(labels, 6))):
        data = rng.integers(0, 256, size=(len(part), 3072), dtype=np.uint8)
        data[:, :1024] = (part[:, None] * 25).astype(np.uint8)  # the red plane tells the class: learnable
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": b"batch", b"labels": part.tolist(), b"data": data}, f, protocol=2)


@pytest.mark.parametrize("preset", ["cifar10lt", "cifar100lt"])
def test_cifar_presets_follow_the_papers_recipe(preset):
    cfg = load_config(preset)
    s = cfg.stage1
    assert cfg.model.encoder == "resnet32" and s.epochs == 200 and s.batch_size == 128 and s.optimizer == "sgd"
    assert s.augment == "crop-flip" and cfg.data.imbalance_factor == 100
    assert "ldmlr-paper+la" in cfg.methods and "ldam-drw" in cfg.methods


def test_cifar10lt_runs_end_to_end_on_tiny_files(tmp_path):
    write_tiny_cifar10(tmp_path / "cifar-10-batches-py")
    tiny = ["stage1.epochs=1", "stage1.batch_size=16", "stage1.warmup_epochs=0", "diffusion.steps=4",
            "diffusion.T=50", "diffusion.sample_steps=2", "diffusion.batch_size=32", "pseudo.finetune_epochs=1",
            "seeds=[0]", "data.val_per_class=2", "data.imbalance_factor=4", "methods=[ce,ldmlr-paper+la]",
            "model.width=8", f"data.path={tmp_path / 'cifar-10-batches-py'}", "checkpoint_every=1000"]
    res = CliRunner().invoke(app, ["run", "cifar10lt", "--out", str(tmp_path / "runs"),
                                   *sum((["--set", s] for s in tiny), [])])
    assert res.exit_code == 0, res.output
    run_dir = next((tmp_path / "runs").iterdir())
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["methods"]) == {"ce", "ldmlr-paper+la"} and results["split"]["dataset"] == "cifar10"
    assert (run_dir / "report.md").exists()
