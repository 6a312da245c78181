"""Data sources: embedded digits, generated MNIST-1D, MNIST/Fashion-MNIST IDX, CIFAR pickles, generic .npz;
all validated."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import random
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class DataError(ValueError):
    """Bad or missing input data; the message names the source and the problem."""


@dataclass(frozen=True)
class ArrayDataset:
    """Validated arrays: ``x`` float32 images [N, C, H, W] in [0, 1], 1-D signals [N, C, L] (MNIST-1D:
    standardised, not in [0, 1]) or features [N, D]; ``y`` int64 [N]."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str
    classes_inferred: bool = False  # num_classes came from the largest label (the source declared none)

    @property
    def is_features(self) -> bool:
        return self.x.ndim == 2

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def subset(self, idx: np.ndarray) -> "ArrayDataset":
        """The examples at ``idx`` (same classes and name)."""
        return ArrayDataset(self.x[idx], self.y[idx], self.num_classes, self.name, self.classes_inferred)


# ---------------------------------------------------------------- validation


def validate_arrays(x: Any, y: Any, num_classes: int | None, source: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Check shapes, dtypes, finiteness and label range; return (float32 x, int64 y, num_classes)."""
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype.kind not in "fiu":
        raise DataError(f"{source}: x must be numeric, got dtype {x.dtype}")
    if y.dtype.kind not in "fiu":
        raise DataError(f"{source}: labels y must be numeric, got dtype {y.dtype}")
    if x.ndim == 3:  # [N, H, W] greyscale -> [N, 1, H, W]
        x = x[:, None]
    if x.ndim not in (2, 4):
        raise DataError(f"{source}: x must be [N, D] features or [N, (C,) H, W] images, got shape {x.shape}")
    if y.ndim != 1:
        raise DataError(f"{source}: labels y must be 1-D, got shape {y.shape}")
    if len(x) != len(y):
        raise DataError(f"{source}: x has {len(x)} examples but y has {len(y)} labels")
    if len(x) == 0:
        raise DataError(f"{source}: the dataset is empty (0 examples)")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        nan, inf = int(np.isnan(x).sum()), int(np.isinf(x).sum())
        raise DataError(f"{source}: x contains non-finite values ({nan} NaN, {inf} inf)")
    if y.dtype.kind == "f" and (not np.isfinite(y).all() or (y != np.round(y)).any()):
        raise DataError(f"{source}: labels must be whole numbers, found non-integer, NaN or inf labels")
    y = y.astype(np.int64)
    if num_classes is None:
        num_classes = int(y.max()) + 1
    num_classes = int(num_classes)
    if num_classes < 1:
        raise DataError(f"{source}: num_classes must be >= 1, got {num_classes}")
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
        raise DataError(f"{source}: {int(bad.sum())} label(s) outside [0, {num_classes}), e.g. {int(y[bad][0])}")
    return x.astype(np.float32, copy=False), y, num_classes


def _scaled(a: np.ndarray, top: float) -> np.ndarray:
    """``a / top`` as float32 without a float64 intermediate (CIFAR would need ~1.5 GB)."""
    out = a.astype(np.float32)
    out /= np.float32(top)
    return out


def _dataset(x: Any, y: Any, num_classes: int | None, source: str, name: str) -> ArrayDataset:
    x, y, c = validate_arrays(x, y, num_classes, source)
    return ArrayDataset(x, y, c, name, num_classes is None)


# ---------------------------------------------------------------- digits


def load_digits_dataset() -> ArrayDataset:
    """scikit-learn's embedded 8x8 digits (1,797 images, 10 classes), scaled from 0..16 to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return _dataset(_scaled(d.images[:, None], 16.0), d.target, 10, "digits", "digits")


# ---------------------------------------------------------------- MNIST-1D (generated, Greydanus 2020)

MNIST1D_CLASSES = 10
MNIST1D_CACHE_VERSION = 1  # bump when the cached arrays change meaning
_MNIST1D_MEMORY: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def mnist1d_args(num_samples: int, seed: int) -> dict[str, Any]:
    """The generator's own defaults (``get_dataset_args``) with our sample count and seed; the download URL
    is dropped so that nothing here can reach it."""
    from mnist1d.data import get_dataset_args

    args = get_dataset_args(as_dict=True)
    args.pop("url", None)
    args.update(num_samples=int(num_samples), seed=int(seed))
    return args


def mnist1d_cache_dir() -> Path:
    """Where generated MNIST-1D arrays are kept: $PFDIFF_CACHE_DIR, else $XDG_CACHE_HOME/pfdiff, else ~/.cache/pfdiff."""
    if os.environ.get("PFDIFF_CACHE_DIR"):
        return Path(os.environ["PFDIFF_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pfdiff"


def _mnist1d_key(args: dict[str, Any]) -> str:
    """A hash of everything that decides the arrays: generator args, package version, cache format."""
    from importlib.metadata import version

    blob = json.dumps({"args": args, "mnist1d": version("mnist1d"), "format": MNIST1D_CACHE_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _generate_mnist1d(args: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Run the package's procedural generator (never its download path). ``make_dataset`` reseeds the global
    ``random`` and ``numpy.random`` states, so they are saved and restored around it."""
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = make_dataset(ObjectView(dict(args)))
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    # the generator splits train_split / rest itself; pooled in its order, the first 80 % are its training set
    x = np.concatenate([d["x"], d["x_test"]]).astype(np.float32)
    return x, np.concatenate([d["y"], d["y_test"]]).astype(np.int64)


def _read_mnist1d_cache(path: Path, args: dict[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached arrays, or None when the file is missing, unreadable or made from other args."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if json.loads(str(f["args"])) != args:
                return None
            return f["x"], f["y"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error):
        return None


def _write_mnist1d_cache(path: Path, args: dict[str, Any], x: np.ndarray, y: np.ndarray) -> None:
    """Atomic write (temp file + rename), so a concurrent reader never sees half a file; a cache that cannot
    be written only costs a regeneration next time."""
    from pfdiff.runs import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, x=x, y=y, args=np.array(json.dumps(args)))
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError:
        pass


def _mnist1d_arrays(args: dict[str, Any], cache_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """Arrays from memory, then the disk cache, then the generator (about 1 ms per signal, so 50 000 take
    ~50 s once)."""
    key = _mnist1d_key(args)
    if key not in _MNIST1D_MEMORY:
        path = (mnist1d_cache_dir() if cache_dir is None else Path(cache_dir)) / f"mnist1d-{key}.npz"
        arrays = _read_mnist1d_cache(path, args)
        if arrays is None:
            arrays = _generate_mnist1d(args)
            _write_mnist1d_cache(path, args, *arrays)
        _MNIST1D_MEMORY[key] = arrays
    x, y = _MNIST1D_MEMORY[key]
    return x.copy(), y.copy()  # callers own their arrays; the cached ones stay pristine


def load_mnist1d(num_samples: int = 50_000, seed: int = 0, cache_dir: str | Path | None = None) -> ArrayDataset:
    """MNIST-1D (Greydanus 2020) from its procedural generator: ``num_samples`` signals of length 40 as
    [N, 1, 40] float32, ``num_samples // 10`` per class, deterministic in ``seed``. The generator's default
    arguments; ``num_samples=5000, seed=42`` is the paper's dataset, whose first 4 000 are its training set."""
    if num_samples < MNIST1D_CLASSES or num_samples % MNIST1D_CLASSES:
        raise DataError(f"mnist1d: num_samples must be a positive multiple of 10 (n per class = N/10), got {num_samples}")
    x, y = _mnist1d_arrays(mnist1d_args(num_samples, seed), cache_dir)
    x, y, c = validate_arrays(x, y, MNIST1D_CLASSES, "mnist1d")
    return ArrayDataset(x[:, None, :], y, c, "mnist1d")


# ---------------------------------------------------------------- IDX (MNIST / Fashion-MNIST)

IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dims
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dim


def _existing_file(path: Path) -> Path:
    if not path.exists():
        raise DataError(f"file not found: {path}")
    if not path.is_file():
        raise DataError(f"{path}: expected a file, found a directory or special file")
    return path


def _read_bytes(path: Path) -> bytes:
    """File contents, gunzipped when they start with the gzip magic bytes (whatever the suffix)."""
    raw = _existing_file(path).read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated gzip data ({e})") from e


def read_idx(path: str | Path, expected_magic: int) -> np.ndarray:
    """An IDX file (LeCun's MNIST format): big-endian magic, one uint32 per dim, then unsigned bytes."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path}: truncated: expected at least 4 bytes of IDX header, found {len(raw)}")
    (magic,) = struct.unpack(">I", raw[:4])
    if magic != expected_magic:
        raise DataError(f"{path}: wrong IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated: expected {header} bytes of IDX header, found {len(raw)}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    need = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) < need:
        raise DataError(f"{path}: truncated: expected {need} bytes, found {len(raw)} (dims {dims})")
    if len(raw) > need:
        raise DataError(f"{path}: {len(raw) - need} unexpected trailing bytes after the {need} bytes for dims {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_idx(images_path: str | Path, labels_path: str | Path, name: str = "mnist") -> ArrayDataset:
    """One IDX image file [N, H, W] + label file [N]; images scaled to [0, 1] as [N, 1, H, W], 10 classes."""
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    return _dataset(_scaled(images, 255.0), labels, 10, f"{images_path} + {labels_path}", name)


def _find(folder: Path, stem: str) -> Path:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"file not found: {folder / stem} (or {stem}.gz)")


def load_mnist_folder(path: str | Path, name: str = "mnist") -> ArrayDataset:
    """The four standard MNIST / Fashion-MNIST IDX files in one folder; train and test pooled."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"{name}: directory not found: {folder}")
    parts = [load_idx(_find(folder, f"{p}-images-idx3-ubyte"), _find(folder, f"{p}-labels-idx1-ubyte"), name)
             for p in ("train", "t10k")]
    if parts[0].input_shape != parts[1].input_shape:
        raise DataError(f"{folder}: train images {parts[0].input_shape} and t10k images {parts[1].input_shape} differ")
    return ArrayDataset(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]), 10, name)


# ---------------------------------------------------------------- CIFAR (python pickle version)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a data file must not be able to run code."""

    _NUMPY = {"_reconstruct", "ndarray", "dtype", "_frombuffer", "scalar"}

    def find_class(self, module: str, name: str) -> Any:
        numpy_ok = module.split(".")[0] == "numpy" and name in self._NUMPY
        if numpy_ok or (module, name) == ("_codecs", "encode"):  # Python 3 writes protocol-2 bytes via _codecs
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are allowed)")


def _unpickle(path: Path) -> dict:
    _existing_file(path)
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="bytes").load()  # CIFAR batches were pickled by Python 2
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            ImportError, OverflowError, MemoryError) as e:
        raise DataError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict) or b"data" not in obj:
        raise DataError(f"{path}: not a CIFAR batch (expected a dict with a b'data' entry)")
    return obj


def _cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    data = np.asarray(batch[b"data"])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: data must be [N, 3072] (3x32x32), got shape {data.shape}")
    if label_key not in batch:
        raise DataError(f"{path}: no {label_key!r} entry; found {sorted(batch)}")
    labels = np.asarray(batch[label_key])
    if labels.shape != (len(data),):
        raise DataError(f"{path}: {len(data)} images but labels of shape {labels.shape}")
    # each 3072 row holds the R, G and B planes in turn, each 32x32 row-major
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(path: str | Path, name: str = "cifar10") -> ArrayDataset:
    """CIFAR-10/100 'python version' folder; train and test pooled, images [N, 3, 32, 32] in [0, 1]."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"{name}: directory not found: {folder}")
    # layout follows the name; other names are detected from the files present
    hundred = name == "cifar100" if name in ("cifar10", "cifar100") else not (folder / "data_batch_1").exists()
    if hundred:
        files, key, classes = ["train", "test"], b"fine_labels", 100
    else:
        files, key, classes = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels", 10
    batches = [_cifar_batch(folder / f, key) for f in files]
    x = _scaled(np.concatenate([b[0] for b in batches]), 255.0)
    return _dataset(x, np.concatenate([b[1] for b in batches]), classes, str(folder), name)


# ---------------------------------------------------------------- npz


def load_npz(path: str | Path, name: str | None = None) -> ArrayDataset:
    """A .npz with ``x`` (images [N,H,W] / [N,C,H,W] or features [N,D]) and ``y``; optional ``num_classes``."""
    path = _existing_file(Path(path))
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":  # what np.savez writes; anything else would be read as a pickle, which we never do
        raise DataError(f"{path}: not a .npz archive (a .npz is a zip file of arrays x and y; this file starts "
                        f"with bytes {magic!r})")
    try:
        archive = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as e:
        raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: expected a .npz archive with arrays x and y, found a single .npy array")
    try:
        with archive:
            arrays = {k: archive[k] for k in archive.files}
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, zlib.error) as e:  # a damaged member
        raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise DataError(f"{path}: missing array(s) {missing}; found {sorted(arrays)}")
    x = arrays["x"]
    if x.dtype == np.uint8 and x.ndim in (3, 4):  # 8-bit images; float data is kept as is
        x = _scaled(x, 255.0)
    num_classes = None
    if "num_classes" in arrays:
        nc = arrays["num_classes"]
        if nc.size != 1 or nc.dtype.kind not in "iu":
            raise DataError(f"{path}: num_classes must be a single integer, got {nc!r}")
        num_classes = int(nc.reshape(()))
    return _dataset(x, arrays["y"], num_classes, str(path), name or path.stem)


# ---------------------------------------------------------------- registry

SOURCES = ("digits", "mnist1d", "mnist", "fmnist", "cifar10", "cifar100", "npz")


def dataset_options(data_cfg: Any) -> dict[str, Any]:
    """The loader keywords a ``DataConfig`` implies: generated sources take their size and seed from it
    (MNIST-1D is drawn with ``split_seed``, the one data seed of a run); file sources take none."""
    if data_cfg.name == "mnist1d":
        return {"num_samples": data_cfg.num_samples, "seed": data_cfg.split_seed}
    return {}


def load_dataset(name: str, path: str | Path | None = None, **kw: Any) -> ArrayDataset:
    """Load a named source; every source except ``digits`` and ``mnist1d`` (generated) reads ``path``.
    ``kw`` goes to the loader (``mnist1d``: ``num_samples``, ``seed``, ``cache_dir``)."""
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {list(SOURCES)}")
    if name == "digits":
        return load_digits_dataset(**kw)
    if name == "mnist1d":
        return load_mnist1d(**kw)
    if path is None:
        raise DataError(f"dataset {name!r} needs a path (data.path; see the README's data table)")
    if name in ("mnist", "fmnist"):
        return load_mnist_folder(path, kw.pop("name", name), **kw)
    if name in ("cifar10", "cifar100"):
        return load_cifar(path, name, **kw)
    return load_npz(path, **kw)


def write_synthetic_npz(path, n_samples: int = 6000, dim: int = 64, num_classes: int = 10, seed: int = 0,
                        class_sep: float = 1.0) -> Path:
    """A harder, download-free feature dataset for the ``npz`` source: scikit-learn's ``make_classification``
    (Guyon 2003: Gaussian clusters on a hypercube, 2 per class, 16 informative of ``dim`` features)."""
    from sklearn.datasets import make_classification

    if num_classes < 2:
        raise DataError(f"make-data needs at least 2 classes, got {num_classes}")
    if n_samples < 4 * num_classes:  # 2 clusters per class, each with a training and a test example
        raise DataError(f"make-data needs at least 4 examples per class ({4 * num_classes} for {num_classes} "
                        f"classes), got {n_samples}")
    if not (np.isfinite(class_sep) and class_sep > 0):
        raise DataError(f"make-data needs a class separation > 0, got {class_sep}")
    x, y = make_classification(n_samples=n_samples, n_features=dim, n_informative=16, n_redundant=16,
                               n_classes=num_classes, n_clusters_per_class=2, class_sep=class_sep,
                               random_state=seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, x=x.astype(np.float32), y=y.astype(np.int64), num_classes=np.int64(num_classes))
    tmp.replace(path)
    return path
