"""Data sources: embedded digits, MNIST/Fashion-MNIST IDX, CIFAR pickles, generic .npz; all validated."""

from __future__ import annotations

import gzip
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """Bad or missing input data; the message names the source and the problem."""


@dataclass(frozen=True)
class ArrayDataset:
    x: np.ndarray  # float32: images [N, C, H, W] in [0, 1], or feature vectors [N, D]
    y: np.ndarray  # int64 [N], labels in [0, num_classes)
    num_classes: int
    name: str

    @property
    def is_features(self) -> bool:
        return self.x.ndim == 2

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def subset(self, idx: np.ndarray) -> "ArrayDataset":
        return ArrayDataset(self.x[idx], self.y[idx], self.num_classes, self.name)


def validate_arrays(x, y, num_classes: int | None, source: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Check shapes, dtypes, finiteness and label range; return (float32 x, int64 y, num_classes)."""
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype.kind not in "fiu" or y.dtype.kind not in "fiu":
        raise DataError(f"{source}: x and y must be numeric, got dtypes {x.dtype} and {y.dtype}")
    if x.ndim == 3:  # [N, H, W] greyscale → [N, 1, H, W]
        x = x[:, None]
    if x.ndim not in (2, 4):
        raise DataError(f"{source}: x must be [N, D] features or [N, (C,) H, W] images, got shape {x.shape}")
    if y.ndim != 1:
        raise DataError(f"{source}: y must be a 1-D label vector, got shape {y.shape}")
    if len(x) == 0:
        raise DataError(f"{source}: the dataset is empty")
    if len(x) != len(y):
        raise DataError(f"{source}: x has {len(x)} examples but y has {len(y)} labels")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise DataError(f"{source}: x contains NaN or inf values ({int((~np.isfinite(x)).sum())} entries)")
    if y.dtype.kind == "f":
        if not np.isfinite(y).all() or (y != np.round(y)).any():
            raise DataError(f"{source}: labels must be whole numbers, found non-integer or NaN labels")
    y = y.astype(np.int64)
    num_classes = int(y.max()) + 1 if num_classes is None else int(num_classes)
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
        raise DataError(f"{source}: {int(bad.sum())} labels outside [0, {num_classes}), e.g. {int(y[bad][0])}")
    return x.astype(np.float32, copy=False), y, num_classes


def load_digits_dataset() -> ArrayDataset:
    """scikit-learn's embedded 8×8 digits (1,797 images, 10 classes), scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y, c = validate_arrays(d.images[:, None] / 16.0, d.target, 10, "digits")
    return ArrayDataset(x, y, c, "digits")


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise DataError(f"file not found: {path}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the suffix
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: corrupt or truncated gzip data ({e})") from e
    return raw


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """An IDX file (LeCun's MNIST format): big-endian magic, dims, then unsigned bytes."""
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path}: truncated: no IDX header")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic != expected_magic:
        raise DataError(f"{path}: wrong IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated: header needs {header} bytes, found {len(raw)}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    need = header + int(np.prod(dims))
    if len(raw) != need:
        raise DataError(f"{path}: truncated or oversized: expected {need} bytes for dims {dims}, found {len(raw)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_idx(images_path, labels_path, name: str = "mnist") -> ArrayDataset:
    images = read_idx(Path(images_path), 0x00000803)
    labels = read_idx(Path(labels_path), 0x00000801)
    x, y, c = validate_arrays(images / 255.0, labels, 10, f"{images_path} / {labels_path}")
    return ArrayDataset(x, y, c, name)


def _find(folder: Path, stem: str) -> Path:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise DataError(f"file not found: {folder / stem}[.gz]")


def load_mnist_folder(path, name: str = "mnist") -> ArrayDataset:
    """The four standard MNIST / Fashion-MNIST files in one folder; train and test pooled."""
    folder = Path(path)
    parts = [load_idx(_find(folder, f"{p}-images-idx3-ubyte"), _find(folder, f"{p}-labels-idx1-ubyte"), name)
             for p in ("train", "t10k")]
    return ArrayDataset(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]), 10, name)


def _unpickle(path: Path) -> dict:
    if not path.exists():
        raise DataError(f"file not found: {path}")
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise DataError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict) or b"data" not in obj:
        raise DataError(f"{path}: not a CIFAR batch (no b'data' entry)")
    return obj


def load_cifar(path, name: str = "cifar10") -> ArrayDataset:
    """CIFAR-10/100 'python version' folder; all batches pooled, images [N, 3, 32, 32] in [0, 1]."""
    folder = Path(path)
    if name == "cifar10":
        files, key, classes = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels", 10
    else:
        files, key, classes = ["train", "test"], b"fine_labels", 100
    xs, ys = [], []
    for fname in files:
        batch = _unpickle(folder / fname)
        data = np.asarray(batch[b"data"])
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{folder / fname}: data must be [N, 3072] (3×32×32), got {data.shape}")
        if key not in batch:
            raise DataError(f"{folder / fname}: no {key!r} entry")
        xs.append(data.reshape(-1, 3, 32, 32))  # rows hold the R, G, B planes, each 32×32 row-major
        ys.append(np.asarray(batch[key]))
    x, y, c = validate_arrays(np.concatenate(xs) / 255.0, np.concatenate(ys), classes, str(folder))
    return ArrayDataset(x, y, c, name)


def load_npz(path, name: str | None = None) -> ArrayDataset:
    """A .npz with ``x`` (images or feature vectors) and ``y``; optional ``num_classes``."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from e
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise DataError(f"{path}: missing array(s) {missing}; found {sorted(arrays)}")
    x = arrays["x"] / 255.0 if arrays["x"].dtype == np.uint8 else arrays["x"]
    num_classes = int(arrays["num_classes"]) if "num_classes" in arrays else None
    x, y, c = validate_arrays(x, arrays["y"], num_classes, str(path))
    return ArrayDataset(x, y, c, name or path.stem)


SOURCES = ("digits", "mnist", "fmnist", "cifar10", "cifar100", "npz")


def load_dataset(name: str, path: str | None = None) -> ArrayDataset:
    """Load a named source; every source except ``digits`` reads ``path``."""
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {list(SOURCES)}")
    if name == "digits":
        return load_digits_dataset()
    if path is None:
        raise DataError(f"dataset {name!r} needs data.path (see the README's data table)")
    if name in ("mnist", "fmnist"):
        return load_mnist_folder(path, name)
    if name in ("cifar10", "cifar100"):
        return load_cifar(path, name)
    return load_npz(path)
