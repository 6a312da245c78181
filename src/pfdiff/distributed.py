"""Data parallelism across the processes torchrun starts (``torch.distributed`` + DistributedDataParallel).

``torchrun --nproc-per-node N -m pfdiff run CONFIG`` runs N copies of ``pfdiff run``. Each process runs the
whole (deterministic) pipeline; stage 1 (``train_stage1``) and stage 2 (``train_feature_diffusion``) split
every batch between the processes: each draws the same global batch (same seed, same step), takes its
rows (:func:`rows`), computes its part of the batch loss through the DDP-wrapped modules (:func:`wrap`), and
DDP averages the gradients, so every process applies the gradient of the whole batch. Only rank 0 writes
the run directory; the others write into a scratch directory that is thrown away (``cli.run``).

Without torchrun's environment (``WORLD_SIZE`` unset or 1) nothing here does anything: :func:`world_size` is
1, :func:`rows` is the whole batch, :func:`wrap` returns the module, and the training loops take their
single-process code path, unchanged.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from pfdiff.runs import atomic_write_bytes


def requested_world_size() -> int:
    """``WORLD_SIZE`` of torchrun's environment (1 without torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_from_env() -> bool:
    """Join torchrun's process group when its environment asks for several processes (``WORLD_SIZE`` > 1;
    torchrun also sets ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). Returns whether this
    process is one of several. Backend: gloo (CPU tensors); with CUDA also nccl for CUDA tensors
    (``cpu:gloo,cuda:nccl``, so the run directory can still be sent around on the CPU and a ``device: cpu``
    run still works), each process on ``cuda:LOCAL_RANK`` (``torch.cuda.set_device``: ``device: auto`` and
    ``cuda`` then mean that GPU). Idempotent."""
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if requested_world_size() <= 1:
        return False
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if dist.is_nccl_available():
            backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend)
    return True


def finish() -> None:
    """Leave the process group (if this process joined one). On the normal path every process first waits for
    the others (a barrier): a process that tears down its gloo connections while another still finishes its
    work (rank 0 writes the results) was aborted by gloo ("terminate called without an active exception",
    SIGABRT) under CPU load in CI. With an exception in flight there is no barrier: the other processes may
    never reach it."""
    if dist.is_initialized():
        if sys.exc_info()[0] is None:
            dist.barrier()
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the process that writes the run directory, prints and renders the report."""
    return rank() == 0


def mean_over_processes(value: float) -> float:
    """The mean of ``value`` over the processes (itself in a single process). Every process must call it at the
    same point. A logged loss is each process's :func:`part` of the batch loss, so their mean is the batch's."""
    if world_size() == 1:
        return value
    # NCCL reduces CUDA tensors only (gloo: CPU tensors)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def check_batch_size(batch_size: int, key: str) -> None:
    """Refuse a batch size the processes cannot share equally (one line, naming the config key)."""
    w = world_size()
    if w > 1 and batch_size % w:
        raise ValueError(f"{key}={batch_size} is not divisible by the {w} processes of torchrun (WORLD_SIZE={w}): "
                         f"each takes an equal share of every batch; use a multiple of {w}")


def rows(n: int) -> slice:
    """This process's rows of a batch of ``n``: contiguous, ``n/W`` each when W divides n (full batches, see
    :func:`check_batch_size`); an epoch's last, shorter batch is split as evenly as it goes (sizes differ by at
    most one, some may be empty when n < W): the losses are normalised by the whole batch (:func:`part`), so the
    result is exact either way."""
    w, r = world_size(), rank()
    return slice(r * n // w, (r + 1) * n // w)


def shard(idx: torch.Tensor) -> torch.Tensor:
    """This process's share of a batch's indices ``idx`` (all of them in a single process)."""
    return idx[rows(len(idx))]


def part(loss_sum: torch.Tensor, total: torch.Tensor | float) -> torch.Tensor:
    """This process's part of a batch loss Σ_batch / ``total`` from the sum over its rows, ×W because DDP
    *averages* the gradients of the W processes: their mean is then the gradient of the whole batch's loss,
    whatever the shares' sizes."""
    return loss_sum * (world_size() / total)


def wrap(module: nn.Module) -> nn.Module:
    """``module`` in DistributedDataParallel when there are several processes, else ``module`` itself. Run the
    forward pass through the wrapper (DDP hooks the backward pass to average the gradients); keep using
    ``module`` for state dicts, checkpoints, EMA and optimizers — DDP shares its parameters, so checkpoints
    keep their keys."""
    if world_size() == 1:
        return module
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def broadcast(obj=None):
    """Rank 0's ``obj`` on every process (pickled, sent over the CPU backend)."""
    if world_size() == 1:
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
    return box[0]


def mirror(source: Path, target: Path) -> None:
    """Copy rank 0's folder ``source`` (every file, by relative path) into ``target`` on every other process
    (e.g. a run directory to resume, onto machines that do not share its disk); only rank 0 reads ``source``
    and it copies nothing. An error reading ``source`` is raised on every process. A single process: nothing
    to do."""
    if world_size() == 1:
        return
    payload: dict | None = None
    if is_main():
        try:
            if not Path(source).is_dir():
                raise NotADirectoryError(f"{source} is not a directory")
            files = {str(p.relative_to(source)): p.read_bytes() for p in sorted(Path(source).rglob("*"))
                     if p.is_file()}
            payload = {"files": files}
        except OSError as e:
            payload = {"error": str(e)}
    payload = broadcast(payload)
    if "error" in payload:
        raise FileNotFoundError(payload["error"])
    if not is_main():
        for name, data in payload["files"].items():
            atomic_write_bytes(Path(target) / name, data)
