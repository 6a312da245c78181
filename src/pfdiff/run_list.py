"""``pfdiff runs``: the run directories under a root, their status and size; removing the incomplete ones.

Two layouts are recognised, one entry each:

- a run directory of ``pfdiff run`` (and of ``dpdm``/``regimes``): ``config.yaml``; *finished* once its
  results file (``results.json``, ``dpdm_results.json``, ``regimes.json``) exists;
- a federated root of ``pfdiff fed`` / ``pfdiff deploy``: partitions ``iid/``, ``alpha-<α>/`` (or their
  ``seed-<s>/`` folders) with a
  ``config.yaml`` each; *finished* once every partition has its ``results.json``.

Not finished means *running* when a file in it changed within :data:`RUNNING_WINDOW` seconds (a guess: a
run that logs nothing for longer looks killed) and *incomplete* otherwise (killed or failed: nothing tells
them apart on disk).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

RUNNING_WINDOW = 600.0  # seconds since the last write for an unfinished run to count as running
RESULT_FILES = ("results.json", "dpdm_results.json", "regimes.json")
_PARTITION = re.compile(r"^(iid|alpha-[0-9.e+-]+)$")
_STAMP = re.compile(r"(\d{8}-\d{6})(-\d+)?$")


@dataclass
class RunEntry:
    path: Path
    kind: str  # "run" | "federated"
    status: str  # "finished" | "running" | "incomplete"
    created: float  # Unix time
    modified: float  # Unix time of the newest file
    size: int  # bytes on disk
    methods: list[str] = field(default_factory=list)
    partitions: dict[str, str] = field(default_factory=dict)  # federated: partition name → its status

    @property
    def name(self) -> str:
        return self.path.name


def _files(path: Path) -> list[os.stat_result]:
    stats = []
    for dirpath, _, names in os.walk(path):
        for n in names:
            try:
                stats.append(os.lstat(os.path.join(dirpath, n)))
            except OSError:  # removed meanwhile (a running run's temp file)
                continue
    return stats


def _methods(config: Path, federated: bool) -> list[str]:
    try:
        cfg = yaml.safe_load(config.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    methods = (cfg.get("fed") or {}).get("methods") if federated else cfg.get("methods")
    return [str(m) for m in methods or []]


def _created(path: Path, stats: list[os.stat_result]) -> float:
    m = _STAMP.search(path.name)  # RunDir.create names runs <name>-<YYYYmmdd-HHMMSS>
    if m:
        try:
            return time.mktime(time.strptime(m.group(1), "%Y%m%d-%H%M%S"))
        except ValueError:
            pass
    return min((s.st_mtime for s in stats), default=path.stat().st_mtime)


def _status(finished: bool, modified: float, now: float) -> str:
    return "finished" if finished else "running" if now - modified < RUNNING_WINDOW else "incomplete"


_SEED = re.compile(r"^seed-[0-9]+$")


def partitions(path: Path) -> list[Path]:
    """The run directories of a federated root (empty when ``path`` is not one): its partitions ``iid/``,
    ``alpha-<α>/`` and, with several seeds, their ``seed-<s>/`` folders."""
    try:
        parts = sorted(p for p in path.iterdir() if _PARTITION.match(p.name) and p.is_dir())
        runs = [s for p in parts for s in sorted(p.iterdir()) if _SEED.match(s.name) and (s / "config.yaml").is_file()]
        return sorted([p for p in parts if (p / "config.yaml").is_file()] + runs)
    except OSError:
        return []


def inspect(path: Path, now: float | None = None) -> RunEntry | None:
    """The entry of one directory, or None when it is neither a run directory nor a federated root."""
    now = time.time() if now is None else now
    parts = partitions(path)
    if not parts and not (path / "config.yaml").is_file():
        return None
    stats = _files(path)
    modified = max((s.st_mtime for s in stats), default=path.stat().st_mtime)
    size = sum(s.st_blocks * 512 for s in stats)
    if not parts:
        finished = any((path / f).is_file() for f in RESULT_FILES)
        return RunEntry(path, "run", _status(finished, modified, now), _created(path, stats), modified, size,
                        _methods(path / "config.yaml", federated=False))
    states = {}
    for p in parts:
        newest = max((s.st_mtime for s in _files(p)), default=p.stat().st_mtime)
        states[p.relative_to(path).as_posix()] = _status((p / "results.json").is_file(), newest, now)
    finished = all(s == "finished" for s in states.values())
    return RunEntry(path, "federated", _status(finished, modified, now), _created(path, stats), modified, size,
                    _methods(parts[0] / "config.yaml", federated=True), states)


def list_runs(root: str | Path, now: float | None = None) -> list[RunEntry]:
    """``root`` itself when it is a run directory or a federated root, else its such subdirectories, oldest first."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    own = inspect(root, now)
    if own is not None:
        return [own]
    entries = [e for p in sorted(root.iterdir()) if p.is_dir() and not p.is_symlink() and (e := inspect(p, now))]
    return sorted(entries, key=lambda e: (e.created, e.name))


def incomplete_paths(entry: RunEntry) -> list[Path]:
    """What ``--clean-failed`` removes of an entry: an incomplete run directory; of a federated root its
    incomplete partitions (finished ones are kept), the whole root when none of them is finished or running."""
    if entry.kind == "run":
        return [entry.path] if entry.status == "incomplete" else []
    bad = [entry.path / n for n, s in entry.partitions.items() if s == "incomplete"]
    return [entry.path] if bad and len(bad) == len(entry.partitions) else bad


def remove_incomplete(entries: list[RunEntry], dry_run: bool = False) -> list[Path]:
    """Remove (unless ``dry_run``) every :func:`incomplete_paths` of ``entries``; returns them."""
    paths = [p for e in entries for p in incomplete_paths(e)]
    if not dry_run:
        for p in paths:
            shutil.rmtree(p)
    return paths


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
