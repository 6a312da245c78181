"""The training loop: exact resume, EMA, stateless batching, device resolution; models are Opacus-valid."""

import pytest
import torch
from opacus.validators import ModuleValidator

from pfdiff.models import FeatureDenoiser, create_classifier, create_encoder
from pfdiff.runs import load_state
from pfdiff.training import (EMA, Stopwatch, balanced_batch, derive_seed, resolve_device, run_steps, shuffled_batch,
                              train)


def _problem(init_seed=0):
    torch.manual_seed(0)
    x = torch.randn(64, 5)
    y = x @ torch.randn(5, 1) + 0.1 * torch.randn(64, 1)
    torch.manual_seed(init_seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def step_fn(step):
        idx = shuffled_batch(64, 16, step, seed=3)
        return torch.nn.functional.mse_loss(model(x[idx]), y[idx]), {}

    return model, opt, step_fn


def test_interrupted_and_resumed_training_equals_uninterrupted(tmp_path):
    model_a, opt_a, fn_a = _problem()
    ema_a = EMA(model_a, 0.9)
    train({"m": model_a}, opt_a, fn_a, 40, description="a", ema=ema_a)

    model_b, opt_b, fn_b = _problem()
    ema_b = EMA(model_b, 0.9)
    ck = tmp_path / "ck.safetensors"
    train({"m": model_b}, opt_b, fn_b, 40, description="b", ema=ema_b, checkpoint=ck, checkpoint_every=10)
    # simulate a crash after step 20: a fresh process rebuilds everything and resumes from the checkpoint
    model_c, opt_c, fn_c = _problem()
    ema_c = EMA(model_c, 0.9)
    ck_mid = tmp_path / "mid.safetensors"
    train({"m": model_c}, opt_c, fn_c, 20, description="c1", ema=ema_c, checkpoint=ck_mid)
    model_d, opt_d, fn_d = _problem(init_seed=99)  # different init: must be overwritten by the checkpoint
    ema_d = EMA(model_d, 0.9)
    train({"m": model_d}, opt_d, fn_d, 40, description="c2", ema=ema_d, checkpoint=ck_mid)
    for p_a, p_b, p_d in zip(model_a.parameters(), model_b.parameters(), model_d.parameters()):
        torch.testing.assert_close(p_a, p_b)
        torch.testing.assert_close(p_a, p_d)
    for p_a, p_d in zip(ema_a.module.parameters(), ema_d.module.parameters()):
        torch.testing.assert_close(p_a, p_d)


def test_checkpoints_carry_the_seconds_of_every_attempt(tmp_path, monkeypatch):
    """Bookkeeping on a fake clock (each step takes one second): a checkpoint holds the loop's seconds up to its
    step over all attempts; a resume credits them to the open stopwatch; the steps after the last checkpoint,
    lost to the crash and redone, count once; the time between the attempts not at all."""
    from pfdiff import training

    now = [0.0]
    monkeypatch.setattr(training, "_clock", lambda: now[0])
    ck = tmp_path / "ck.safetensors"

    def attempt(steps, crash_at=None):
        model, opt, fn = _problem()

        def ticking(step):
            if step == crash_at:
                raise KeyboardInterrupt
            now[0] += 1.0
            return fn(step)

        with Stopwatch() as watch:
            train({"m": model}, opt, ticking, steps, description="t", checkpoint=ck, checkpoint_every=10)
        return watch

    with pytest.raises(KeyboardInterrupt), Stopwatch() as killed:
        attempt(40, crash_at=25)  # steps 20–24 ran after the step-20 checkpoint: lost
    assert killed.seconds == 25 and load_state(ck)["step"] == 20 and load_state(ck)["seconds"] == 20
    now[0] += 1000.0  # the machine was down: not the stage's time
    resumed = attempt(40)
    assert resumed.restored == 20 and resumed.seconds == 40  # 20 before the kill + 20 after
    assert load_state(ck)["seconds"] == 40 and not Stopwatch._open
    finished = attempt(40)  # a finished loop restored: its seconds credited, no step run
    assert finished.restored == 40 and finished.seconds == 40 and load_state(ck)["seconds"] == 40


def test_non_finite_loss_stops_with_a_clear_error():
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(FloatingPointError, match="learning rate"):
        train({"m": model}, opt, lambda s: (model(torch.full((1, 2), float("nan"))).sum(), {}), 3, description="nan")


def test_run_steps_without_progress_bar_runs_the_same_steps_silently(capsys):
    def run(progress):
        model, opt, fn = _problem()
        modes = []

        def update(step):
            modes.append(model.training)
            loss, _ = fn(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return {"loss": loss.item()}

        model.eval()
        capsys.readouterr()
        run_steps({"m": model}, opt, update, 7, description="silent-or-not", progress=progress)
        return model, modes, capsys.readouterr().out

    quiet, modes, out = run(progress=False)
    loud, _, _ = run(progress=True)
    assert "silent-or-not" not in out and modes == [True] * 7 and not quiet.training  # train during, eval after
    for p_q, p_l in zip(quiet.parameters(), loud.parameters()):
        torch.testing.assert_close(p_q, p_l, rtol=0, atol=0)


def test_ema_tracks_weights():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.5)
    before = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(2.0)
    ema.update()  # warm-up: first decay is min(0.5, 1/10) = 0.1
    torch.testing.assert_close(ema.module.weight, before + 1.8)
    for _ in range(20):
        ema.update()
    torch.testing.assert_close(ema.module.weight, model.weight, atol=1e-5, rtol=0)
    ema2 = EMA(torch.nn.Linear(2, 2), decay=0.5)
    ema2.load_state_dict(ema.state_dict())
    assert ema2.num_updates == 21


def test_shuffled_batches_cover_each_epoch_once():
    idx = torch.cat([shuffled_batch(10, 4, s, seed=1) for s in range(3)])
    assert sorted(idx.tolist()) == list(range(10))
    assert not torch.equal(torch.cat([shuffled_batch(10, 4, s, seed=1) for s in range(3, 6)]), idx)
    assert torch.equal(shuffled_batch(10, 4, 2, seed=1), shuffled_batch(10, 4, 2, seed=1))


def test_balanced_batches_are_class_balanced():
    y = torch.tensor([0] * 90 + [1] * 9 + [2] * 1)
    idx = torch.cat([balanced_batch(y, 3, 300, s, seed=0) for s in range(10)])
    freq = torch.bincount(y[idx], minlength=3).float() / len(idx)
    assert torch.allclose(freq, torch.full((3,), 1 / 3), atol=0.03)


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(1, "a", 2) == derive_seed(1, "a", 2)
    assert len({derive_seed(1, "a", s) for s in range(100)}) == 100


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.parametrize("module", [
    create_encoder("cnn", (1, 8, 8)), create_encoder("resnet32", (3, 32, 32)), create_encoder("mlp", (20,)),
    create_classifier("linear", 64, 10),
    create_classifier("cosine", 64, 10), FeatureDenoiser(64, 10, hidden=32, depth=2)])
def test_every_model_is_opacus_compatible(module):
    assert ModuleValidator.validate(module, strict=False) == []


def test_encoder_shapes_and_errors():
    assert create_encoder("auto", (1, 28, 28), feature_dim=32)(torch.randn(2, 1, 28, 28)).shape == (2, 32)
    assert create_encoder("auto", (16,))(torch.randn(3, 16)).shape == (3, 16)
    assert create_encoder("mlp", (16,), feature_dim=8)(torch.randn(3, 16)).shape == (3, 8)
    with pytest.raises(ValueError, match="choose one of"):
        create_encoder("vit", (1, 8, 8))
    with pytest.raises(ValueError, match="feature vectors"):
        create_encoder("identity", (1, 8, 8))
    with pytest.raises(ValueError, match="feature vectors"):
        create_encoder("mlp", (1, 8, 8))


def test_verbosity_levels_of_the_progress_bar(capsys):
    """--quiet: no bar at all; default: the bar, plus a plain line whenever metrics are shown if the output is not a
    terminal (here: captured, as in a log file); --verbose: those lines on a terminal too."""
    from pfdiff.training import progress_bar, set_verbosity

    outputs = {}
    try:
        for level in (0, 1, 2):
            set_verbosity(level)
            with progress_bar(f"level{level}", 3) as advance:
                for _ in range(3):
                    advance({"loss": 0.5})
            outputs[level] = capsys.readouterr().out
    finally:
        set_verbosity(1)
    assert outputs[0] == "" and "level1" in outputs[1]
    assert "level1 · step 3/3: loss=0.5" in outputs[1] and "level2 · step 3/3: loss=0.5" in outputs[2]
    with pytest.raises(ValueError, match="verbosity"):
        set_verbosity(3)


def test_cli_quiet_and_verbose_exclude_each_other():
    from typer.testing import CliRunner

    from pfdiff.cli import app

    assert CliRunner().invoke(app, ["-q", "presets"]).exit_code == 0
    res = CliRunner().invoke(app, ["-q", "-v", "presets"])
    assert res.exit_code == 2 and "exclude each other" in res.output


def test_a_non_finite_loss_is_caught_within_log_every_steps_and_never_checkpointed(tmp_path):
    """The finiteness check reads the losses once per log_every window (no host sync per step): a NaN at step 3
    raises at the end of its window naming step 3, before the checkpoint of that window is written."""
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 2)

    def step_fn(step):
        loss = model(x).square().mean()
        return (loss * float("nan") if step == 3 else loss), {}

    ck = tmp_path / "ck.safetensors"
    with pytest.raises(FloatingPointError, match="at step 3"):
        train({"m": model}, opt, step_fn, 20, description="nan", checkpoint=ck, checkpoint_every=5, log_every=5)
    assert not ck.exists()


def test_acceleration_defaults_keep_the_cpu_in_fp32_and_bf16_autocasts_the_step():
    from pfdiff.training import configure_acceleration, optimizer_options

    try:
        cpu = configure_acceleration("auto", False, "auto", torch.device("cpu"))
        assert (cpu.precision, cpu.compile, cpu.fused) == ("fp32", False, False) and optimizer_options() == {}
        assert configure_acceleration("fp32", False, "on", torch.device("cpu")).fused
        configure_acceleration("bf16", False, "off", torch.device("cpu"))
        model = torch.nn.Linear(4, 1)
        seen = []

        def step_fn(step):
            out = model(torch.randn(8, 4, generator=torch.Generator().manual_seed(step)))
            seen.append(out.dtype)
            return out.float().square().mean(), {}

        train({"m": model}, torch.optim.SGD(model.parameters(), lr=0.1), step_fn, 3, description="bf16")
        assert seen == [torch.bfloat16] * 3 and model.weight.dtype == torch.float32
        with pytest.raises(ValueError, match="precision"):
            configure_acceleration("fp16", False, "auto", torch.device("cpu"))
    finally:
        configure_acceleration("fp32", False, "off", torch.device("cpu"))


@pytest.mark.slow
def test_compiled_training_matches_eager():
    """compile: true changes how the step runs, not what it computes (inductor on the CPU; ~20 s to compile)."""
    from pfdiff.training import configure_acceleration

    def run(compile_: bool) -> torch.Tensor:
        configure_acceleration("fp32", compile_, "off", torch.device("cpu"))
        torch.manual_seed(0)
        model = FeatureDenoiser(4, 2, hidden=16, depth=1)
        x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
        train({"m": model}, torch.optim.Adam(model.parameters(), lr=1e-2),
              lambda s: (model(x, torch.full((16,), 5), y).square().mean(), {}), 5, description="compile")
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    try:
        torch.testing.assert_close(run(True), run(False), atol=1e-5, rtol=1e-4)
    finally:
        configure_acceleration("fp32", False, "off", torch.device("cpu"))


def test_shuffled_batch_is_an_epoch_permutation_drawn_once_on_the_device():
    from pfdiff.training import _epoch_permutation

    _epoch_permutation.cache_clear()
    batches = [shuffled_batch(10, 4, s, 7) for s in range(3)]  # one epoch: 4 + 4 + 2
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    assert torch.equal(shuffled_batch(10, 4, 1, 7, "cpu"), batches[1])  # stateless: same arguments, same batch
    assert _epoch_permutation.cache_info().misses == 1  # the permutation was drawn once for the whole epoch
    assert not torch.equal(torch.cat([shuffled_batch(10, 4, s, 7) for s in range(3, 6)]), torch.cat(batches))


def test_default_threads_follow_the_cores_this_process_may_use(monkeypatch):
    import os

    from pfdiff import training as T

    assert T.default_threads(3) == 3  # an explicit setting wins
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert T.available_cores() == 1 and T.default_threads(None) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert T.available_cores() <= 64 and T.default_threads(None) <= torch.get_num_threads()


def test_the_denoiser_skip_is_linear_for_small_and_diagonal_for_large_features():
    from pfdiff.config import load_config
    from pfdiff.longtail.ldmlr import build_denoiser
    from pfdiff.models import DiagonalAffine, skip_for

    assert (skip_for(64), skip_for(512), skip_for(513), skip_for(64, "diagonal")) == ("linear", "linear",
                                                                                    "diagonal", "diagonal")
    cfg = load_config(None, [])
    assert isinstance(build_denoiser(cfg, 64, 10).skip, torch.nn.Linear)  # every preset: unchanged
    wide = build_denoiser(cfg, 2048, 10)
    assert isinstance(wide.skip, DiagonalAffine) and sum(p.numel() for p in wide.skip.parameters()) == 4096
    assert wide(torch.randn(3, 2048), torch.tensor([1, 2, 3]), torch.tensor([0, 1, 10])).shape == (3, 2048)
    with pytest.raises(ValueError, match="denoiser skip"):
        skip_for(64, "conv")
