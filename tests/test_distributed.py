"""Data-parallel stages 1 and 2 (pfdiff.distributed): 2 CPU processes (gloo, DDP) give a single process's result.

Each process draws the same global batch, takes its rows through the DDP-wrapped modules and DDP averages the
gradients, so training gives one process's result up to float32 rounding: the all-reduce adds the two
processes' partial gradients in another order than one process's backward sums the rows (TOLERANCE; measured
here: ≤ 2.4e-7 on the weights, 3.9e-7 on the features, 5.5e-6 on LDAM's logits of scale s = 30).

What is compared: with SGD, every weight. With Adam(W), the trained *function* (E's features and G's logits
on the training set) and, for stage 2, every weight: a conv bias just before a GroupNorm of one channel per
group does not change the loss at all, its gradient is rounding noise, and Adam scales that noise up to
lr-sized steps, so such biases differ between any two runs that sum in another order — as much (≈ 6e-3)
between one process on 1 and on 2 threads as between 1 and 2 processes — while the function they compute
does not.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import pfdiff
from pfdiff import distributed
from pfdiff.config import load_config
from pfdiff.diffusion import DiffusionLoss, make_schedule
from pfdiff.longtail.baselines import train_stage1
from pfdiff.longtail.common import init_encoder_classifier, make_split
from pfdiff.longtail.ldmlr import train_feature_diffusion
from pfdiff.longtail.losses import stage1_loss
from pfdiff.models import FeatureDenoiser

TOLERANCE = dict(rtol=1e-4, atol=1e-5)  # float32 sums in another order; a training step moves weights by ~1e-3

# digits-LT: 357 training images, batch 32 → 11 full batches and a last one of 5 (shares of 2 and 3: uneven);
# crop-flip on (each process augments the whole batch with one process's draws and keeps its rows)
STAGE1 = ["stage1.epochs=2", "stage1.batch_size=32", "model.width=8", "stage1.augment=crop-flip",
          "stage1.augment_pad=1", "stage1.drw_start=0.5", "diffusion.steps=30", "diffusion.batch_size=64",
          "diffusion.T=100", "model.denoiser_hidden=32", "model.denoiser_depth=2", "model.time_dim=8"]
SGD = ["stage1.optimizer=sgd", "stage1.lr=0.05"]  # momentum 0.9, the CIFAR-LT recipe's optimiser


def _weights(enc: nn.Module, g: nn.Module) -> dict[str, torch.Tensor]:
    return {**{f"E.{k}": v.clone() for k, v in enc.state_dict().items()},
            **{f"G.{k}": v.clone() for k, v in g.state_dict().items()}}


def _train_all() -> dict[str, dict[str, torch.Tensor]]:
    """As the pipeline calls them: stage 1 with CE and SGD (its initial and trained weights), stage 1 with
    LDAM-DRW and AdamW (class-weighted from step 12 on; its features and logits on the training set), and
    stage 2 on 150 features (batch 64: a last batch of 22; its EMA weights)."""
    cpu = torch.device("cpu")
    cfg, cfg_sgd = load_config(None, STAGE1), load_config(None, STAGE1 + SGD)
    split = make_split(cfg)
    out = {"stage1-sgd-init": _weights(*init_encoder_classifier(cfg_sgd, split.train.input_shape, 10, 0, cpu)),
           "stage1-sgd": _weights(*train_stage1(split, cfg_sgd, 0, cpu, None, None, "ce"))}
    enc, g = train_stage1(split, cfg, 0, cpu, None, None, "ldam-drw")
    with torch.no_grad():
        z = enc.eval()(torch.as_tensor(split.train.x))
        out["stage1-adamw-ldam-drw"] = {"features": z, "logits": g.eval()(z)}
    gen = torch.Generator().manual_seed(1)
    u, y = torch.randn(150, 16, generator=gen), torch.randint(0, 10, (150,), generator=gen)
    out["stage2-ema"] = {k: v.clone() for k, v in train_feature_diffusion(u, y, 10, cfg, 0, None, None)[0]
                         .state_dict().items()}
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    assert distributed.init_from_env() and distributed.world_size() == world and distributed.rank() == rank
    try:
        assert isinstance(distributed.wrap(nn.Linear(2, 2)), nn.parallel.DistributedDataParallel)
        out = _train_all()
        out["mean-over-processes"] = {"rank": torch.tensor(distributed.mean_over_processes(float(rank)))}
        if distributed.is_main():
            torch.save(out, path)
    finally:
        distributed.finish()


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_stages_1_and_2_on_two_ddp_processes_equal_one_process(tmp_path):
    path = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(path)), nprocs=2, join=True)
    ddp = torch.load(path)
    single = _train_all()  # this process: no process group, the single-process code path
    assert distributed.world_size() == 1 and type(distributed.wrap(nn.Linear(2, 2))) is nn.Linear
    assert _max_diff(single["stage1-sgd"], single["stage1-sgd-init"]) > 1e-2  # stage 1 did train
    assert ddp["mean-over-processes"]["rank"].item() == 0.5  # (0 + 1) / 2: what run_steps logs as the batch loss
    assert distributed.mean_over_processes(3.0) == 3.0  # no process group: the value itself
    for name in ("stage1-sgd", "stage1-adamw-ldam-drw", "stage2-ema"):
        for k in single[name]:
            torch.testing.assert_close(ddp[name][k], single[name][k], **TOLERANCE, msg=f"{name}: {k}")
        print(f"{name}: max |DDP − single| = {_max_diff(ddp[name], single[name]):.1e}")


# ---- the pieces, in one process ---------------------------------------------------------------------------


def _as_world(monkeypatch, world: int, rank: int = 0) -> None:
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    monkeypatch.setattr(distributed, "rank", lambda: rank)


def test_rows_partition_every_batch_and_batch_sizes_must_divide(monkeypatch):
    for n in (0, 1, 5, 32):
        parts = []
        for r in range(3):
            _as_world(monkeypatch, 3, r)
            parts.append(distributed.rows(n))
        assert [p.start for p in parts] == [0, parts[0].stop, parts[1].stop] and parts[-1].stop == n
        assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1
    _as_world(monkeypatch, 4)
    distributed.check_batch_size(128, "stage1.batch_size")
    with pytest.raises(ValueError, match=r"^stage1\.batch_size=130 is not divisible by the 4 processes"):
        distributed.check_batch_size(130, "stage1.batch_size")


def test_prepare_refuses_undivisible_batches_and_private_methods_under_torchrun(monkeypatch):
    from pfdiff.longtail.pipeline import prepare

    _as_world(monkeypatch, 3)
    with pytest.raises(ValueError, match=r"^stage1\.batch_size=64 is not divisible by the 3"):
        prepare(load_config(None, []))
    with pytest.raises(ValueError, match=r"^diffusion\.batch_size=256 is not divisible by the 3"):
        prepare(load_config(None, ["stage1.batch_size=63"]))
    _as_world(monkeypatch, 2)
    with pytest.raises(ValueError, match="dp-… methods do not run under torchrun"):
        prepare(load_config("dp", []))


def test_commands_other_than_run_are_refused_under_torchrun():
    from typer.testing import CliRunner

    from pfdiff.cli import app

    result = CliRunner().invoke(app, ["presets"], env={"WORLD_SIZE": "2"})
    assert result.exit_code == 2 and "only `pfdiff run` runs under torchrun" in result.output


def test_shards_of_a_batch_get_the_draws_and_loss_of_the_whole_batch():
    schedule = make_schedule("linear", 50)
    loss = DiffusionLoss(schedule, prediction="v", cond_drop_prob=0.3, null_label=4)
    net = FeatureDenoiser(6, 4, 16, 1, 8)
    z, y = torch.randn(11, 6), torch.randint(0, 4, (11,))
    whole = loss(net, z, y, noise_multiplicity=2, generator=torch.Generator().manual_seed(3))
    cuts = [0, 4, 4, 11]  # uneven, one empty
    parts = [loss(net, z[a:b], y[a:b], noise_multiplicity=2, generator=torch.Generator().manual_seed(3),
                  shard=(a, 11)) for a, b in zip(cuts, cuts[1:])]
    for field in ("t", "y_used", "loss"):
        torch.testing.assert_close(torch.cat([getattr(p, field) for p in parts]), getattr(whole, field))

    o = load_config(None, ["stage1.epochs=10", "stage1.drw_start=0.5"]).stage1
    crit = stage1_loss("ldam-drw", [50, 20, 5, 1], o, 1)
    logits, labels = torch.randn(9, 4), torch.tensor([0, 0, 1, 2, 3, 0, 1, 1, 3])
    for step in (0, 9):  # before and after DRW's class weights start
        terms = [crit.shard_terms(logits[s], labels, s, step) for s in (slice(0, 4), slice(4, 9))]
        total = terms[0][1]
        torch.testing.assert_close(sum(t for t, _ in terms) / total, crit(logits, labels, step))


# ---- the command: torchrun … -m pfdiff run ------------------------------------------------------------------

TINY_RUN = ["quickstart", "--set", "seeds=[0]", "--set", "methods=[ce,ldmlr]", "--set", "stage1.epochs=2",
            "--set", "diffusion.steps=40", "--set", "diffusion.T=100", "--set", "diffusion.sample_steps=5",
            "--set", "pseudo.finetune_epochs=1", "--set", "model.denoiser_hidden=32", "--set", "model.width=8"]


def _pfdiff(args: list[str], tmp: Path, nproc: int = 1) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp),
           "PYTHONPATH": os.pathsep.join([str(Path(pfdiff.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    subprocess.run([sys.executable, *launcher, "-m", "pfdiff", "-q", "run", *args], env=env, check=True,
                   timeout=600, stdout=subprocess.DEVNULL)


def _metrics(run: Path) -> dict:
    return {m: {k: v for k, v in row.items() if k in ("top1", "balanced", "many", "medium", "few")}
            for m, row in json.loads((run / "results.json").read_text())["methods"].items()}


def _close(a: dict, b: dict) -> bool:
    """Accuracies within 2 test images (a float tie may flip one): of 350 overall, of 35 per class in a group."""
    return all(abs(a[m][k]["mean"] - b[m][k]["mean"]) <= (2 / 350 if k in ("top1", "balanced") else 2 / 35)
               for m in a for k in a[m])


@pytest.mark.slow
def test_torchrun_pfdiff_run_writes_one_run_directory_with_one_process_numbers_and_resumes(tmp_path):
    """The same command on 2 processes: rank 0 alone writes (one run directory; the other rank's scratch is
    gone), the numbers are one process's, and --resume sends rank 0's checkpoints to the other rank (else
    it would train stage 1 alone and the processes would fall out of step)."""
    (tmp_path / "tmp").mkdir()
    _pfdiff([*TINY_RUN, "--out", str(tmp_path / "one")], tmp_path / "tmp")
    _pfdiff([*TINY_RUN, "--out", str(tmp_path / "two")], tmp_path / "tmp", nproc=2)
    (one,), (two,) = (tmp_path / "one").iterdir(), (tmp_path / "two").iterdir()
    assert not [p for p in (tmp_path / "tmp").iterdir() if p.name.startswith("pfdiff-rank")]
    assert _close(_metrics(one), _metrics(two))
    trained = [r for r in map(json.loads, (two / "metrics.jsonl").read_text().splitlines()) if "stage" in r]
    # the logged loss is the batch's (the mean of the processes' parts), not rank 0's part
    single = {(r["stage"], r["step"]): r["loss"] for r in map(json.loads, (one / "metrics.jsonl").read_text()
                                                                .splitlines()) if "loss" in r}
    logged = {(r["stage"], r["step"]): r["loss"] for r in trained if "loss" in r}
    assert logged.keys() == single.keys() and all(abs(logged[k] - single[k]) <= 1e-3 * max(1.0, abs(single[k]))
                                                  for k in single)
    (two / "results.json").unlink()
    (two / "seeds" / "seed0.json").unlink()
    _pfdiff(["--resume", str(two)], tmp_path / "tmp", nproc=2)
    assert _close(_metrics(one), _metrics(two))
    again = [r for r in map(json.loads, (two / "metrics.jsonl").read_text().splitlines()) if "stage" in r]
    assert again == trained  # every stage loaded from its checkpoint, none trained again
