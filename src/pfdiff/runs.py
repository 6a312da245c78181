"""Run directories: the only place pfdiff writes files. Every write is atomic (temp file + rename) and leaves the
file with the mode a plain ``open(path, "w")`` would (the umask's)."""

from __future__ import annotations

import json
import os
import re
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pfdiff.config import PRESET_DIR, RunConfig, dump_config, list_presets, load_config


def new_file_mode(path: Path) -> int:
    """The permission bits ``open(path, "w")`` leaves on ``path``: an existing file's own, else 0o666 & ~umask
    (``mkstemp`` creates its temporary files 0o600, which an atomic write must not pass on)."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status), else set back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one, never half; the file
    gets the mode a plain ``open(path, "w")`` would give it (``new_file_mode``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = new_file_mode(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Split a nested state (dicts/lists of tensors and scalars) into flat tensors + JSON metadata."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}/{k}" if prefix else str(k), tensors, meta)
        meta[f"{prefix}@keys"] = [str(k) for k in obj]
        meta[f"{prefix}@keytypes"] = ["int" if isinstance(k, int) else "str" for k in obj]
    elif isinstance(obj, (list, tuple)):
        meta[f"{prefix}@list"] = len(obj)
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}/{i}", tensors, meta)
    else:
        meta[prefix] = obj


def _unflatten(prefix: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Any:
    if prefix in tensors:
        return tensors[prefix]
    if f"{prefix}@list" in meta:
        return [_unflatten(f"{prefix}/{i}", tensors, meta) for i in range(meta[f"{prefix}@list"])]
    if f"{prefix}@keys" in meta:
        keys, types = meta[f"{prefix}@keys"], meta[f"{prefix}@keytypes"]
        return {(int(k) if t == "int" else k): _unflatten(f"{prefix}/{k}" if prefix else k, tensors, meta)
                for k, t in zip(keys, types)}
    return meta[prefix]


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Save a nested state (module/optimizer state dicts, step counters) as one safetensors file, atomically and
    with the mode of ``new_file_mode``."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    _flatten(state, "", tensors, meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = new_file_mode(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        # safetensors refuses tensors that share memory; cloning keeps the file self-contained.
        save_file({k: v.clone() for k, v in tensors.items()}, tmp, metadata={"pfdiff": json.dumps(meta)})
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_state(path: Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["pfdiff"])
    tensors = load_file(str(path), device=str(device))
    return _unflatten("", tensors, meta)


def metric_key(record: dict[str, Any]) -> tuple | None:
    """What identifies a logged event: a training step (stage and step) or a named event (event, method, seeds,
    step); None for a record that has neither (kept however often it appears)."""
    if "stage" in record and "step" in record:
        return ("step", *(json.dumps(record.get(k)) for k in ("stage", "split_seed", "seed", "step")))
    if "event" in record:
        return ("event", *(json.dumps(record.get(k)) for k in ("event", "method", "split_seed", "seed", "step")))
    return None


def data_label(cfg: RunConfig) -> str:
    """What a run folder calls its data: the file stem of a user file (``data.name=npz``, ``data.path=/x/mine.npz``
    → ``mine``), else the dataset's name (``cifar10``, also when ``data.path`` is where it is stored); characters
    other than letters, digits, ``.``, ``_`` and ``-`` become ``_``."""
    d = cfg.data
    label = Path(d.path).stem if d.name == "npz" and d.path else d.name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label) or d.name


def run_folder_name(cfg: RunConfig, stamp: str) -> str:
    """``<name>-<time>`` when ``cfg.name`` is a preset run on its own data (``quickstart-20261204-101500``), else
    ``<name>-<data>-<time>`` with ``data_label`` (``ablation-mine-20261204-101500`` for ``pfdiff run ablation
    --set data.name=npz --set data.path=/x/mine.npz``; a config of your own, not a preset, always names its data)."""
    label = data_label(cfg)
    if cfg.name in list_presets() and data_label(load_config(PRESET_DIR / f"{cfg.name}.yaml")) == label:
        return f"{cfg.name}-{stamp}"
    return f"{cfg.name}-{label}-{stamp}"


class RunDir:
    """``runs/<name>[-<data>]-<time>/`` (``run_folder_name``): config.yaml, metrics.jsonl, results.json,
    checkpoints/, plots/, report.md."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def create(cls, cfg: RunConfig, root: str | Path | None = None) -> "RunDir":
        """A new run folder under ``root`` (default ``cfg.output_dir``) named by ``run_folder_name`` (``-2``, ``-3``
        … appended when a run of the same name started in the same second), with config.yaml and
        environment.json written."""
        root = Path(root or cfg.output_dir)
        base = run_folder_name(cfg, time.strftime("%Y%m%d-%H%M%S"))
        path = root / base
        n = 1
        while path.exists():
            n += 1
            path = root / f"{base}-{n}"
        run = cls(path)
        path.mkdir(parents=True)
        atomic_write_text(run.config_path, dump_config(cfg))
        atomic_write_json(path / "environment.json", environment(cfg.device))
        return run

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        run = cls(Path(path))
        if not run.config_path.exists():
            raise FileNotFoundError(f"{path} is not a pfdiff run directory (no config.yaml)")
        return run

    config_path = property(lambda self: self.path / "config.yaml")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    results_path = property(lambda self: self.path / "results.json")
    report_path = property(lambda self: self.path / "report.md")
    plots = property(lambda self: self.path / "plots")
    checkpoints = property(lambda self: self.path / "checkpoints")

    def config(self) -> RunConfig:
        return load_config(self.config_path)

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line to metrics.jsonl (appends of one short line are atomic on POSIX)."""
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def metrics(self) -> list[dict[str, Any]]:
        """The records of metrics.jsonl, each event once: a resumed run logs the steps after its last checkpoint
        again, so a record with the key of an earlier one (``metric_key``) replaces it, in place."""
        if not self.metrics_path.exists():
            return []
        rows: dict[Any, dict[str, Any]] = {}
        for i, line in enumerate(self.metrics_path.read_text().splitlines()):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash: skip it, keep the rest
                continue
            key = metric_key(record)
            rows[i if key is None else key] = record
        return list(rows.values())

    def tidy_for_resume(self) -> list[Path]:
        """Before resuming a killed run: remove the temporary files its atomic writes left behind
        (``.<name>.*.tmp``, never a finished file) and compact metrics.jsonl. Returns the removed paths."""
        stale = [p for p in self.path.rglob(".*.tmp") if p.is_file()]
        for p in stale:
            p.unlink(missing_ok=True)
        self.compact_metrics()
        return stale

    def compact_metrics(self) -> None:
        """Rewrite metrics.jsonl without the records a resume repeats (atomically), e.g. before resuming."""
        if self.metrics_path.exists():
            atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.metrics()))

    def write_json(self, name: str, obj: Any) -> Path:
        atomic_write_json(self.path / name, obj)
        return self.path / name

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text())


PACKAGES = ("torch", "opacus", "dp-accounting", "flwr", "numpy", "scipy", "scikit-learn", "pydantic", "mnist1d")


def environment(device: str = "auto") -> dict[str, Any]:
    """What produced a run: pfdiff's version and git commit (None outside a checkout; ``dirty`` when the work
    tree differs from it), Python, the versions of the libraries the numbers depend on, and the device."""
    import platform
    import subprocess
    from importlib import metadata

    import pfdiff

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=Path(pfdiff.__file__).parent, capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    status = git("status", "--porcelain", "--untracked-files=no")
    try:
        from pfdiff.training import resolve_device

        resolved = str(resolve_device(device))
    except Exception as e:  # noqa: BLE001 — recorded, not raised: prepare() has already checked the device
        resolved = f"unresolved ({e})"
    return {"pfdiff": pfdiff.__version__, "git_commit": git("rev-parse", "HEAD"),
            "git_dirty": None if status is None else bool(status), "python": platform.python_version(),
            "platform": platform.platform(), "packages": versions, "device": resolved,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
