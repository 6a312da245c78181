"""Config loading/overrides, atomic run files and nested safetensors state."""

import pytest
import torch

from pfdiff.config import ConfigError, RunConfig, dump_config, list_presets, load_config
from pfdiff.runs import RunDir, atomic_write_text, load_state, save_state


def test_quickstart_preset_and_overrides():
    assert "quickstart" in list_presets()
    cfg = load_config(None, ["diffusion.steps=123", "seeds=[4, 5]", "data.imbalance_factor=10"])
    assert cfg.diffusion.steps == 123 and cfg.seeds == [4, 5] and cfg.data.imbalance_factor == 10


@pytest.mark.parametrize("override,needle", [
    ("diffusion.stepz=3", "stepz"),             # misspelt key
    ("diffusion.steps=-1", "steps"),            # out of range
    ("noequals", "key=value"),                  # malformed
    ("seeds=[]", "seed"),
])
def test_bad_overrides_name_the_problem(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, [override])


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="no config file or preset"):
        load_config("no-such-preset")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(bad)


def test_config_round_trips_through_run_dir(tmp_path):
    cfg = load_config(None, ["name=rt", "diffusion.eta=0.5"])
    run = RunDir.create(cfg, tmp_path)
    assert run.path.name.startswith("rt-")
    assert RunDir.open(run.path).config() == cfg
    assert RunConfig.model_validate(load_config(run.config_path).model_dump()) == cfg
    assert "eta: 0.5" in dump_config(cfg)


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")
    import os

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temp file left behind


def test_nested_state_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"step": 7, "modules": {"m": model.state_dict()}, "optimizer": opt.state_dict(), "tags": ["a", 1.5]}
    save_state(tmp_path / "s.safetensors", state)
    back = load_state(tmp_path / "s.safetensors")
    assert back["step"] == 7 and back["tags"] == ["a", 1.5]
    torch.testing.assert_close(back["modules"]["m"]["weight"], model.weight.detach())
    opt2 = torch.optim.Adam(torch.nn.Linear(3, 2).parameters())
    opt2.load_state_dict(back["optimizer"])
    assert opt2.param_groups[0]["lr"] == 0.01
    torch.testing.assert_close(back["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert set(back["optimizer"]["state"]) == {0, 1}


def test_run_dir_open_rejects_non_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a pfdiff run"):
        RunDir.open(tmp_path)


def test_metrics_jsonl_skips_a_cut_line(tmp_path):
    run = RunDir.create(load_config(None), tmp_path)
    run.log({"a": 1})
    with open(run.metrics_path, "a") as f:
        f.write('{"b": ')  # a crash in the middle of a line
    assert run.metrics() == [{"a": 1}]


def test_encoder_names_of_the_config_are_the_registry():
    from typing import get_args

    from pfdiff.config import ModelConfig
    from pfdiff.models import ENCODERS

    assert set(get_args(ModelConfig.model_fields["encoder"].annotation)) == {"auto", *ENCODERS}


@pytest.mark.parametrize("override,needle", [
    ("model.encoder=vgg", "model.encoder: Input should be"),
    ("device=gpu", "unknown device 'gpu'"),
    ("methods=[ldmrl]", "ldmrl"),
    ("data.name=imagenet", "unknown dataset 'imagenet'"),
])
def test_cli_refuses_bad_values_in_one_line_before_writing(tmp_path, override, needle):
    """Exit 2, one error line naming the problem (no traceback, no pydantic dump), and no run folder."""
    from typer.testing import CliRunner

    from pfdiff.cli import app

    res = CliRunner().invoke(app, ["run", "quickstart", "--set", override, "--out", str(tmp_path / "runs")],
                             terminal_width=400)
    assert res.exit_code == 2 and needle in res.output, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) <= 3
    assert not (tmp_path / "runs").exists()


def test_metrics_of_a_resumed_run_hold_each_event_once(tmp_path):
    """A resume re-logs the steps after its checkpoint: the later record replaces the earlier, in place;
    records without a key are all kept; compact_metrics rewrites the file that way."""
    run = RunDir.create(RunConfig(), tmp_path)
    for step in (50, 100, 150):
        run.log({"stage": "seed 0 · stage 1", "step": step, "loss": 1.0, "seed": 0, "split_seed": 0})
    run.log({"event": "test", "method": "ce", "seed": 0, "split_seed": 0, "top1": 0.5})
    run.log({"note": "free"})
    for step in (150,):  # resumed from the checkpoint at step 100
        run.log({"stage": "seed 0 · stage 1", "step": step, "loss": 0.5, "seed": 0, "split_seed": 0})
    run.log({"stage": "seed 0 · stage 1", "step": 150, "loss": 0.7, "seed": 0, "split_seed": 1})  # other split
    run.log({"event": "test", "method": "ce", "seed": 0, "split_seed": 0, "top1": 0.6})
    run.log({"note": "free"})
    rows = run.metrics()
    assert [r.get("step") for r in rows if "stage" in r] == [50, 100, 150, 150]
    assert [r["loss"] for r in rows if r.get("step") == 150] == [0.5, 0.7]
    assert [r["top1"] for r in rows if r.get("event") == "test"] == [0.6]
    assert sum(1 for r in rows if "note" in r) == 2
    run.compact_metrics()
    assert len(run.metrics_path.read_text().splitlines()) == len(rows) and run.metrics() == rows


def test_fed_alpha_is_validated_before_any_run(tmp_path):
    from typer.testing import CliRunner

    from pfdiff.cli import app

    res = CliRunner().invoke(app, ["fed", "--alpha", "0.5", "--alpha", "-1", "--out", str(tmp_path / "fed")])
    assert res.exit_code == 2 and "fed.alpha" in res.output and "(got -1.0)" in res.output, res.output
    assert not (tmp_path / "fed").exists()  # the valid α = 0.5 did not start either


def test_tidy_for_resume_removes_stale_temporaries_only(tmp_path):
    run = RunDir.create(RunConfig(), tmp_path)
    (run.checkpoints / "seed0").mkdir(parents=True)
    stale = run.checkpoints / "seed0" / ".stage1.safetensors.abc123.tmp"
    stale.write_bytes(b"half")
    keep = run.checkpoints / "seed0" / "stage1.safetensors"
    keep.write_bytes(b"whole")
    run.log({"stage": "s", "step": 1, "loss": 2.0})
    run.log({"stage": "s", "step": 1, "loss": 1.0})
    assert run.tidy_for_resume() == [stale]
    assert not stale.exists() and keep.read_bytes() == b"whole"
    assert len(run.metrics_path.read_text().splitlines()) == 1


@pytest.fixture
def umask():
    """Set the process umask for one test (``umask(0o027)``), restored afterwards."""
    import os

    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_atomic_writes_give_files_the_mode_of_a_plain_open(tmp_path, umask, mask):
    """mkstemp's temporaries are 0o600: the final file gets 0o666 & ~umask instead, as open(path, "w") gives a
    new file, and an existing file keeps its own mode, as open(path, "w") leaves it."""
    umask(mask)
    with open(tmp_path / "plain.txt", "w") as f:
        f.write("x")
    expected = 0o666 & ~mask
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == expected  # what open() does, for reference
    atomic_write_text(tmp_path / "a.txt", "new")
    save_state(tmp_path / "s.safetensors", {"step": 1, "w": torch.zeros(2)})
    run = RunDir.create(RunConfig(), tmp_path / "runs")
    run.write_json("results.json", {"a": 1})
    for path in (tmp_path / "a.txt", tmp_path / "s.safetensors", run.config_path, run.results_path,
                 run.path / "environment.json"):
        assert path.stat().st_mode & 0o777 == expected, path
    (tmp_path / "a.txt").chmod(0o640)
    (tmp_path / "s.safetensors").chmod(0o604)
    atomic_write_text(tmp_path / "a.txt", "newer")
    save_state(tmp_path / "s.safetensors", {"step": 2, "w": torch.zeros(2)})
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "s.safetensors").stat().st_mode & 0o777 == 0o604
    assert (tmp_path / "a.txt").read_text() == "newer" and load_state(tmp_path / "s.safetensors")["step"] == 2


@pytest.mark.parametrize("source, overrides, folder", [
    ("quickstart", [], "quickstart"),  # a preset on its own data: short
    ("ablation", [], "ablation"),
    ("ablation", ["data.name=npz", "data.path=/x/mine.npz"], "ablation-mine"),  # a user file: its stem
    ("ablation", ["data.name=digits"], "ablation-digits"),  # another dataset: its name
    ("cifar10lt", ["data.path=/data/cifar"], "cifar10lt"),  # where its own dataset is stored: still its own
    ("quickstart", ["name=tiny"], "tiny-digits"),  # not a preset: always names its data
    ("quickstart", ["data.name=npz", "data.path=/x/my data (v2).npz"], "quickstart-my_data_v2_"),
])
def test_run_folders_are_named_after_preset_and_data(tmp_path, source, overrides, folder):
    import re

    cfg = load_config(source, overrides)
    first, second = RunDir.create(cfg, tmp_path), RunDir.create(cfg, tmp_path)
    assert re.fullmatch(re.escape(folder) + r"-\d{8}-\d{6}", first.path.name), first.path.name
    # the same second: -2 appended (or, a second later, a new stamp)
    assert second.path != first.path and second.path.name.startswith(folder + "-")
    assert RunDir.open(second.path).config() == cfg


def _bad_npz(tmp_path, kind: str) -> str:
    """A user dataset that `pfdiff run` must refuse: one class, 10 examples of 2 classes, a label gap, noise."""
    import numpy as np

    rng = np.random.default_rng(0)
    path = tmp_path / f"{kind}.npz"
    if kind == "random":
        path.write_bytes(rng.bytes(2048))
        return str(path)
    y = {"one-class": np.zeros(60, dtype=np.int64), "ten": np.array([0, 1] * 5),
         "gap": np.repeat([0, 1, 3], 60)}[kind]  # gap: no class 2, no num_classes array
    np.savez(path, x=rng.standard_normal((len(y), 8)).astype(np.float32), y=y)
    return str(path)


_NPZ = ["quickstart", "--set", "data.name=npz", "--set"]


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("args,needles", [
    (["quickstart", "--set", "device=cuda"], ["device 'cuda'", "CUDA is not available"]),
    (["dp", "--set", "privacy.target_epsilon=0.001"], ["target 0.001"]),
    ([*_NPZ, "data.path={one-class}"], ["one-class.npz", "1 class with examples", "at least 2"]),
    ([*_NPZ, "data.path={ten}"], ["data.val_per_class=10", "class 0 has 4 examples"]),
    ([*_NPZ, "data.path={ten}", "--set", "data.val_per_class=0"],
     ["ten.npz", "class(es) [1] with [1] example(s)", "at least 2"]),
    ([*_NPZ, "data.path={ten}", "--set", "data.val_per_class=0", "--set", "data.imbalance_factor=1",
      "--set", "methods=[dp-ldmlr]"], ["ten.npz", "AID filter of dp-ldmlr", "needs at least 5"]),
    ([*_NPZ, "data.path={gap}"], ["gap.npz", "4 classes (inferred from the largest label)", "class(es) [2]"]),
    ([*_NPZ, "data.path={random}"], ["random.npz", "not a .npz archive"]),
])
def test_cli_refuses_bad_inputs_before_writing_also_on_a_dry_run(tmp_path, args, needles, dry_run):
    """Exit 2, one line naming the problem, no folder under --out: `pfdiff run` and `pfdiff run --dry-run` alike
    (make-data's bad arguments: tests/test_data.py::test_make_data_refuses_bad_arguments_and_writes_nothing)."""
    from typer.testing import CliRunner

    from pfdiff.cli import app

    if "device=cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is present: device=cuda is valid here")
    data = tmp_path / "data"
    data.mkdir()
    paths = {k: _bad_npz(data, k) for k in ("one-class", "ten", "gap", "random")}
    args = [a.format(**paths) for a in args]
    out = tmp_path / "runs"
    res = CliRunner().invoke(app, ["run", *args, "--out", str(out), *(["--dry-run"] if dry_run else [])],
                             terminal_width=400)
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert all(n in lines[0] for n in needles), lines[0]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["data"]
