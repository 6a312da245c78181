"""The one training loop: step function, EMA, resumable checkpoints, progress bar, metrics."""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from pfdiff import distributed
from pfdiff.runs import load_state, save_state

StepFn = Callable[[int], tuple[torch.Tensor, dict[str, float]]]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when present, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available; use device=auto or cpu")
    return device


@dataclass
class Acceleration:
    """How the training loops run on the device (``configure_acceleration``). Process-wide, as torch's own
    autocast and TF32 switches are: one run per process sets it once."""

    precision: str = "fp32"  # fp32 | bf16 (autocast around each step's forward and loss)
    compile: bool = False  # nn.Module.compile() of the modules ``train`` updates
    fused: bool = False  # fused=True for the Adam/AdamW optimisers (``optimizer_options``)


_ACCELERATION = Acceleration()


def configure_acceleration(precision: str, compile: bool, fused: str, device: torch.device) -> Acceleration:
    """Resolve the config's ``precision`` / ``compile`` / ``fused_optimizer`` for ``device`` and apply them to
    every later training loop. ``auto``: bf16 autocast and TF32 matmuls on CUDA (bf16 where supported), fp32 and
    unfused on the CPU, so CPU runs compute exactly what they computed before these options existed."""
    global _ACCELERATION
    cuda = device.type == "cuda"
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision != "fp32"
    _ACCELERATION = Acceleration(precision, bool(compile), fused == "on" or (fused == "auto" and cuda))
    return _ACCELERATION


def optimizer_options() -> dict[str, Any]:
    """Keyword arguments for torch's Adam/AdamW under the configured acceleration (``fused``)."""
    return {"fused": True} if _ACCELERATION.fused else {}


def available_cores() -> int:
    """The CPU cores this process may actually use: its affinity mask, capped by a cgroup CPU quota (a container
    limited to 2 CPUs on a 64-core host gets 2, where torch's default would start 64 threads)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def default_threads(threads: int | None) -> int:
    """torch's intra-op threads for a run: ``threads`` when set, else torch's default capped by
    ``available_cores`` (equal to torch's default on an unconstrained machine, so its numbers are unchanged)."""
    return threads if threads else min(torch.get_num_threads(), available_cores())


def derive_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from (run seed, stage name, step, …), so any step can be replayed exactly."""
    h = 1469598103934665603
    for part in parts:
        for byte in str(part).encode() + b"\x1f":
            h = ((h ^ byte) * 1099511628211) % (1 << 64)
    return h % (1 << 63)


def generator(device: torch.device | str, *parts: int | str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimiser steps of one epoch: ⌈n / batch_size⌉, at least 1."""
    return max(1, -(-n // batch_size))


def shuffled_batch(n: int, batch_size: int, step: int, seed: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Indices of batch ``step`` of an epoch-wise shuffle (stateless: depends only on its arguments), on
    ``device``. The epoch's permutation is drawn once per epoch (cached), on the device with a generator of
    that device: no per-step host-to-device copy. The CPU draws are the ones this function always made; on
    CUDA the permutations are another (equally reproducible) stream."""
    epoch, i = divmod(step, steps_per_epoch(n, batch_size))
    return _epoch_permutation(n, seed, epoch, str(torch.device(device)))[i * batch_size:(i + 1) * batch_size]


@lru_cache(maxsize=8)  # a few epochs' permutations (n int64 each): one per epoch per stream, not one per step
def _epoch_permutation(n: int, seed: int, epoch: int, device: str) -> torch.Tensor:
    return torch.randperm(n, generator=generator(device, seed, "epoch", epoch), device=device)


def balanced_batch(y: torch.Tensor, num_classes: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Class-balanced sampling: pick a class uniformly, then an example of it (with replacement)."""
    g = generator("cpu", seed, "balanced", step)
    counts = torch.bincount(y.cpu(), minlength=num_classes)
    present = torch.nonzero(counts).flatten()
    classes = present[torch.randint(len(present), (batch_size,), generator=g)]
    order = torch.argsort(y.cpu(), stable=True)
    starts = torch.cumsum(counts, 0) - counts
    offsets = (torch.rand(batch_size, generator=g) * counts[classes]).long()
    return order[starts[classes] + offsets]


def lr_factor(step: int, schedule: str, total_steps: int, warmup_steps: int = 0,
              milestones: tuple[int, ...] = (), gamma: float = 0.1) -> float:
    """The learning-rate multiplier of optimiser step ``step`` (0-based): linear warm-up (step+1)/W over the
    first W steps, then ``constant`` 1, ``cosine`` ½(1 + cos(π·progress)) over the remaining steps, or
    ``step`` γ^(number of milestones ≤ step)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "step":
        return gamma ** sum(step >= m for m in milestones)
    raise ValueError(f"unknown lr schedule {schedule!r}; choose from ['constant', 'cosine', 'step']")


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup_steps: int = 0,
                   milestones: tuple[int, ...] = (), gamma: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR | None:
    """A per-step torch LR scheduler of :func:`lr_factor` for ``train``/``run_steps`` (None: constant lr)."""
    lr_factor(0, schedule, total_steps, warmup_steps, milestones, gamma)  # validates the name
    if schedule == "constant" and warmup_steps == 0:
        return None
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, schedule, total_steps, warmup_steps, tuple(milestones), gamma))


class EMA:
    """Exponential moving average of a module's parameters (Polyak averaging), kept as a frozen copy.

    The decay warms up as min(decay, (1 + n)/(10 + n)) after n updates: with a fixed 0.999 the average
    would still hold 0.999^2000 ≈ 14 % of the *random initial* weights after 2,000 steps (we measured
    the resulting pseudo-features far off the real ones).
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.source = model
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.num_updates = 0

    @torch.no_grad()
    def update(self) -> None:
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        self.num_updates += 1
        # one multi-tensor kernel per step instead of one lerp_ per parameter (bit-identical on CPU)
        torch._foreach_lerp_(list(self.module.parameters()), [p.detach() for p in self.source.parameters()],
                             1.0 - decay)
        for avg_b, b in zip(self.module.buffers(), self.source.buffers()):
            avg_b.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.module.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["weights"])
        self.num_updates = int(state["num_updates"])


_VERBOSITY = 1  # 0 quiet, 1 normal, 2 verbose: set once per process by the CLI (``pfdiff -q/-v``)


def set_verbosity(level: int) -> None:
    """How much the training loops print: 0 nothing (no progress bars), 1 progress bars (plain metric lines
    instead when the output is not a terminal), 2 progress bars and metric lines."""
    global _VERBOSITY
    if level not in (0, 1, 2):
        raise ValueError(f"verbosity must be 0, 1 or 2, got {level!r}")
    _VERBOSITY = level


def verbosity() -> int:
    """The level :func:`set_verbosity` set (0 quiet, 1 normal, 2 verbose)."""
    return _VERBOSITY


@contextmanager
def progress_bar(description: str, total: int, completed: int = 0
                 ) -> Iterator[Callable[[dict[str, float] | None], None]]:
    """A rich progress bar; yields ``advance(metrics)``, which moves it one step and, given metrics (the loops
    pass them every ``log_every`` steps, when they are read from the device), shows them. Verbosity 0
    (``pfdiff --quiet``) shows none; 2 (``--verbose``) also prints those metrics as a line, and so does
    verbosity 1 when the output is not a terminal (a log file keeps the progress of a run that died)."""
    if _VERBOSITY == 0:
        yield lambda metrics=None: None
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=total, completed=completed, info="")
        lines = _VERBOSITY >= 2 or not bar.console.is_terminal

        def advance(metrics: dict[str, float] | None = None) -> None:
            if metrics is None:
                bar.update(task, advance=1)
                return
            info = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            bar.update(task, advance=1, info=info)
            if lines:
                done = int(bar.tasks[0].completed)
                bar.console.print(f"{description} · step {done}/{total}" + (f": {info}" if info else ""))

        yield advance


def _read(pending: list[tuple[int, dict[str, Any]]], description: str) -> dict[str, float]:
    """The metrics of the last step of a window, as floats; the window's losses checked for non-finite values.
    One device → host transfer per window: the steps in between never wait for the device."""
    losses = [(step, m["loss"]) for step, m in pending if "loss" in m]
    if losses:
        vals = [torch.as_tensor(v).detach().double() for _, v in losses]
        device = next((v.device for v in vals if v.device.type != "cpu"), torch.device("cpu"))
        values = torch.stack([v.to(device) for v in vals]).tolist()  # one transfer for the window
        for (step, _), v in zip(losses, values):
            if not math.isfinite(v):
                raise FloatingPointError(f"{description}: loss is {v} at step {step}; lower the learning rate")
    return {k: float(v) for k, v in pending[-1][1].items()}


def train(modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer, step_fn: StepFn, steps: int, *,
          description: str, ema: EMA | None = None, checkpoint: Path | None = None, checkpoint_every: int = 500,
          log: Callable[[dict[str, Any]], None] | None = None, log_every: int = 50,
          grad_clip: float | None = None, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> None:
    """Run ``steps`` optimiser steps of ``step_fn(step) -> (loss, metrics)``.

    With ``checkpoint`` set, the modules, optimizer, EMA, LR scheduler, step and seconds so far are saved every
    ``checkpoint_every`` steps and at the end, and a call that finds the file resumes from it. Batches and
    noise must come from ``step`` (``shuffled_batch``, ``generator``) so that a resumed run repeats the same
    numbers. ``scheduler`` (e.g. :func:`make_scheduler`) is stepped once after every optimiser step.
    """

    acc = _ACCELERATION
    if acc.compile:
        for m in modules.values():
            m.compile()  # in place: parameters and state-dict keys stay those of the module
    device_type = module_device(modules).type

    def update(step: int) -> dict[str, Any]:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=acc.precision == "bf16"):
            loss, metrics = step_fn(step)  # finiteness: checked by run_steps every log_every steps (no host sync)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_([p for m in modules.values() for p in m.parameters()], grad_clip)
        optimizer.step()
        if ema is not None:
            ema.update()
        return {"loss": loss.detach(), **metrics}

    run_steps(modules, optimizer, update, steps, description=description, ema=ema, checkpoint=checkpoint,
              checkpoint_every=checkpoint_every, log=log, log_every=log_every, scheduler=scheduler)


_clock = time.perf_counter  # the stopwatches' clock (a test may substitute a fake one)


class Stopwatch:
    """Wall seconds of a piece of work across the attempts of a resumed run: the time measured inside the
    ``with`` block plus the seconds that the training loops run inside it restore from their checkpoints (what
    their steps before the kill took; ``run_steps`` credits every open stopwatch). Work after a loop's last
    checkpoint, lost to the kill and redone, counts once: as redone."""

    _open: list["Stopwatch"] = []

    def __init__(self) -> None:
        self.restored = 0.0
        self.seconds = 0.0

    def __enter__(self) -> "Stopwatch":
        self._t0 = _clock()
        Stopwatch._open.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        Stopwatch._open.remove(self)
        self.seconds = self.restored + _clock() - self._t0

    @staticmethod
    def credit(seconds: float) -> None:
        """Add the seconds a resumed loop restored (its steps run before the kill) to every open stopwatch."""
        for watch in Stopwatch._open:
            watch.restored += seconds


def run_steps(modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
              update: Callable[[int], dict[str, float]], steps: int, *, description: str, ema: EMA | None = None,
              checkpoint: Path | None = None, checkpoint_every: int = 500,
              log: Callable[[dict[str, Any]], None] | None = None, log_every: int = 50,
              log_metrics: bool = True, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
              progress: bool = True) -> None:
    """The loop under ``train``: ``update(step)`` does one whole step (e.g. a DP-SGD step) and returns
    its metrics; progress bar, logging, resumable checkpoints as in ``train``. ``log_metrics=False``
    logs and shows step counters only (metrics of private data — losses, norms, clip fractions, realised
    batch sizes — carry no DP guarantee, so they appear neither in the log nor on the progress bar).
    ``scheduler`` is stepped after every ``update`` and saved/restored with the checkpoint.
    ``progress=False`` shows no bar (short inner loops, e.g. a federated client's local steps of every
    round). The modules are put in train mode before the first step and in eval mode after the last.
    The checkpoint also holds ``seconds``, the loop's wall time over all attempts up to its step; a resume
    credits them to the open stopwatches (``Stopwatch``: pipeline.Timer's stage times)."""
    start, restored = _resume(checkpoint, modules, optimizer, ema, scheduler)
    Stopwatch.credit(restored)
    t0 = _clock()
    for m in modules.values():
        m.train()
    bar = progress_bar(description, steps, start) if progress else nullcontext(lambda metrics=None: None)
    pending: list[tuple[int, dict[str, Any]]] = []  # steps since the metrics were last read from the device
    with bar as advance:
        for step in range(start, steps):
            pending.append((step, update(step)))
            if scheduler is not None:
                scheduler.step()
            save = checkpoint is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps)
            report = (step + 1) % log_every == 0 or step + 1 == steps
            if not (report or save):
                advance()
                continue
            metrics = _read(pending, description)  # raises on a non-finite loss before anything is saved
            pending.clear()
            if "loss" in metrics:  # under torchrun each process has its part of the batch loss: log the batch's
                metrics["loss"] = distributed.mean_over_processes(metrics["loss"])
            advance(metrics if log_metrics else {})
            if log is not None and report:
                log({"stage": description, "step": step + 1, **(metrics if log_metrics else {})})
            if save:
                _save(checkpoint, modules, optimizer, ema, step + 1, scheduler, restored + _clock() - t0)
    for m in modules.values():
        m.eval()


def module_device(modules: dict[str, nn.Module]) -> torch.device:
    """The device of the first parameter; modules without parameters have no device of their own: the CPU."""
    for m in modules.values():
        for p in m.parameters():
            return p.device
    return torch.device("cpu")  # CPU only as the answer for parameter-free modules


def _save(path: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer, ema: EMA | None,
          step: int, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, seconds: float = 0.0) -> None:
    state: dict[str, Any] = {"step": step, "seconds": float(seconds), "optimizer": optimizer.state_dict(),
                             "modules": {k: m.state_dict() for k, m in modules.items()}}
    if ema is not None:
        state["ema"] = ema.state_dict()
    if scheduler is not None:
        state["scheduler"] = {"last_epoch": scheduler.last_epoch}
    save_state(path, state)


def _resume(path: Path | None, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
            ema: EMA | None, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> tuple[int, float]:
    """Restore a checkpoint if there is one: (its step, its loop's wall seconds so far); (0, 0.0) without."""
    if path is None or not path.exists():
        return 0, 0.0
    state = load_state(path, module_device(modules))
    for k, m in modules.items():
        m.load_state_dict(state["modules"][k])
    optimizer.load_state_dict(state["optimizer"])
    if ema is not None and "ema" in state:
        ema.load_state_dict(state["ema"])
    if scheduler is not None:  # the optimizer's state holds the current lr; the scheduler resumes its count
        scheduler.last_epoch = int(state.get("scheduler", {}).get("last_epoch", state["step"]))
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    return int(state["step"]), float(state.get("seconds", 0.0))  # checkpoints written before ``seconds``: 0


def checkpoint_step(path: Path | None) -> int:
    """The step a resumable checkpoint holds (0 when there is none): what a resumed stage skips."""
    if path is None or not path.exists():
        return 0
    return int(load_state(path, "cpu")["step"])


def load_modules(path: Path, modules: dict[str, nn.Module], use_ema_for: str | None = None) -> None:
    """Load the weights of a finished stage (optionally the EMA weights into one module)."""
    state = load_state(path, module_device(modules))
    for k, m in modules.items():
        m.load_state_dict(state["ema"]["weights"] if k == use_ema_for and "ema" in state else state["modules"][k])
