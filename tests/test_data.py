"""Data sources (real file formats written to tmp_path), validation and the long-tailed protocol."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from pfdiff.data import (ArrayDataset, ClassGroups, DataError, class_counts, class_groups, load_cifar, load_dataset,
                         load_digits_dataset, load_idx, load_npz, longtail_counts, longtail_indices, stratified_split,
                         validate_arrays)

# ---------------------------------------------------------------- helpers


def idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    """The IDX encoding: big-endian magic, one uint32 per dim, then the unsigned bytes."""
    return struct.pack(f">I{arr.ndim}I", magic, *arr.shape) + arr.astype(np.uint8).tobytes()


def write(path: Path, data: bytes, gz: bool = False) -> Path:
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.fixture
def tiny_idx() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(7, 5, 4), dtype=np.uint8), np.array([0, 1, 2, 3, 9, 9, 4], dtype=np.uint8)


def cifar_batch(n: int, label_key: bytes, seed: int) -> tuple[dict, np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    return {b"batch_label": b"batch", label_key: labels, b"data": data}, data, labels


# ---------------------------------------------------------------- digits


def test_digits_loads() -> None:
    d = load_digits_dataset()
    assert d.x.shape == (1797, 1, 8, 8) and d.x.dtype == np.float32 and d.y.dtype == np.int64
    assert d.x.min() == 0.0 and d.x.max() == 1.0
    assert d.num_classes == 10 and set(np.unique(d.y)) == set(range(10))
    assert not d.is_features and d.input_shape == (1, 8, 8) and d.name == "digits"
    sub = d.subset(np.array([0, 5]))
    assert isinstance(sub, ArrayDataset) and sub.x.shape == (2, 1, 8, 8) and sub.num_classes == 10
    assert load_dataset("digits").x.shape == d.x.shape


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path: Path, tiny_idx, gz: bool) -> None:
    images, labels = tiny_idx
    # no .gz suffix on purpose: gzip is detected from the magic bytes
    ip = write(tmp_path / "imgs", idx_bytes(images, 0x803), gz)
    lp = write(tmp_path / "labs", idx_bytes(labels, 0x801), gz)
    d = load_idx(ip, lp, name="fmnist")
    assert d.x.shape == (7, 1, 5, 4) and d.x.dtype == np.float32
    np.testing.assert_allclose(d.x[:, 0], images / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(d.y, labels)
    assert d.num_classes == 10 and d.name == "fmnist"


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated(tmp_path: Path, tiny_idx, gz: bool) -> None:
    images, labels = tiny_idx
    ip = write(tmp_path / "short-images", idx_bytes(images, 0x803)[:-3], gz)
    lp = write(tmp_path / "labels", idx_bytes(labels, 0x801))
    with pytest.raises(DataError, match="truncated") as e:
        load_idx(ip, lp)
    assert "short-images" in str(e.value)
    assert f"expected {16 + 7 * 5 * 4} bytes, found {16 + 7 * 5 * 4 - 3}" in str(e.value)


def test_idx_truncated_gzip_stream(tmp_path: Path, tiny_idx) -> None:
    images, labels = tiny_idx
    ip = write(tmp_path / "cut.gz", gzip.compress(idx_bytes(images, 0x803))[:-10])
    lp = write(tmp_path / "labels", idx_bytes(labels, 0x801))
    with pytest.raises(DataError, match="truncated") as e:
        load_idx(ip, lp)
    assert "cut.gz" in str(e.value)


def test_idx_wrong_magic_and_missing(tmp_path: Path, tiny_idx) -> None:
    images, labels = tiny_idx
    ip = write(tmp_path / "imgs", idx_bytes(images, 0x803))
    lp = write(tmp_path / "labs", idx_bytes(labels, 0x801))
    with pytest.raises(DataError, match="magic") as e:
        load_idx(lp, lp)  # a label file where images are expected
    assert "labs" in str(e.value)
    with pytest.raises(DataError, match="file not found") as e:
        load_idx(ip, tmp_path / "nope")
    assert "nope" in str(e.value)


def test_idx_count_mismatch(tmp_path: Path, tiny_idx) -> None:
    images, labels = tiny_idx
    ip = write(tmp_path / "imgs", idx_bytes(images, 0x803))
    lp = write(tmp_path / "labs", idx_bytes(labels[:5], 0x801))
    with pytest.raises(DataError, match="7 examples but y has 5"):
        load_idx(ip, lp)


def test_load_dataset_mnist_folder(tmp_path: Path, tiny_idx) -> None:
    images, labels = tiny_idx
    write(tmp_path / "train-images-idx3-ubyte.gz", idx_bytes(images, 0x803), gz=True)
    write(tmp_path / "train-labels-idx1-ubyte.gz", idx_bytes(labels, 0x801), gz=True)
    write(tmp_path / "t10k-images-idx3-ubyte", idx_bytes(images[:3], 0x803))
    write(tmp_path / "t10k-labels-idx1-ubyte", idx_bytes(labels[:3], 0x801))
    d = load_dataset("mnist", str(tmp_path))
    assert d.x.shape == (10, 1, 5, 4) and d.name == "mnist"
    np.testing.assert_array_equal(d.y, np.concatenate([labels, labels[:3]]))
    np.testing.assert_allclose(d.x[7:, 0], images[:3] / 255.0, rtol=1e-6)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_dataset("fmnist", tmp_path)


def test_load_dataset_registry_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cifar100") as e:
        load_dataset("imagenet")
    assert not isinstance(e.value, DataError)
    with pytest.raises(DataError, match="path"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="not found"):
        load_dataset("cifar10", tmp_path / "missing")


# ---------------------------------------------------------------- CIFAR


def write_cifar10(folder: Path) -> tuple[np.ndarray, list[int]]:
    folder.mkdir()
    datas, labels = [], []
    for i, fname in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        batch, data, lab = cifar_batch(2 + i % 2, b"labels", seed=i)
        with open(folder / fname, "wb") as f:
            pickle.dump(batch, f, protocol=2)  # the CIFAR files are Python 2 pickles with bytes keys
        datas.append(data)
        labels += lab
    return np.concatenate(datas), labels


def test_cifar10_layout_and_pixel_order(tmp_path: Path) -> None:
    data, labels = write_cifar10(tmp_path / "cifar-10-batches-py")
    d = load_dataset("cifar10", str(tmp_path / "cifar-10-batches-py"))
    assert d.x.shape == (len(data), 3, 32, 32) and d.num_classes == 10 and d.name == "cifar10"
    np.testing.assert_array_equal(d.y, labels)
    # pixel (row 5, col 7) of image 4: R at 5*32+7, G one plane (1024) later, B two planes later
    n, r, c = 4, 5, 7
    for ch in range(3):
        assert d.x[n, ch, r, c] == pytest.approx(data[n, ch * 1024 + r * 32 + c] / 255.0)
    assert d.x.min() >= 0 and d.x.max() <= 1


def test_cifar100_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for fname, n in (("train", 4), ("test", 2)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        batch = {b"data": data, b"fine_labels": [99, 0, 57, 3][:n], b"coarse_labels": [0] * n}
        with open(folder / fname, "wb") as f:
            pickle.dump(batch, f)
    d = load_dataset("cifar100", folder)
    assert d.x.shape == (6, 3, 32, 32) and d.num_classes == 100
    np.testing.assert_array_equal(d.y, [99, 0, 57, 3, 99, 0])


def test_cifar_errors_name_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "c10"
    write_cifar10(folder)
    (folder / "data_batch_3").write_bytes(b"\x80\x02}q\x00garbage")
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar(folder)
    write_cifar10(tmp_path / "c10b")
    (tmp_path / "c10b" / "test_batch").unlink()
    with pytest.raises(DataError, match="file not found.*test_batch"):
        load_cifar(tmp_path / "c10b")
    write_cifar10(tmp_path / "c10c")
    with open(tmp_path / "c10c" / "data_batch_2", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DataError, match=r"data_batch_2.*3072"):
        load_cifar(tmp_path / "c10c")


def test_cifar_pickle_cannot_run_code(tmp_path: Path) -> None:
    folder = tmp_path / "evil"
    write_cifar10(folder)
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": ArrayDataset}, f)  # any non-numpy global must be refused
    with pytest.raises(DataError, match="data_batch_1.*refusing"):
        load_cifar(folder)


# ---------------------------------------------------------------- npz


def test_npz_features_and_images(tmp_path: Path) -> None:
    feats = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float64)
    np.savez(tmp_path / "feats.npz", x=feats, y=np.array([0, 1, 2, 0, 1, 4]), num_classes=np.array(7))
    d = load_dataset("npz", tmp_path / "feats.npz")
    assert d.is_features and d.input_shape == (3,) and d.num_classes == 7 and d.name == "feats"
    np.testing.assert_allclose(d.x, feats, rtol=1e-6)  # float data kept as is

    imgs = np.full((4, 6, 6), 255, dtype=np.uint8)
    np.savez_compressed(tmp_path / "imgs.npz", x=imgs, y=np.array([0.0, 1.0, 2.0, 1.0]))
    d = load_npz(tmp_path / "imgs.npz", name="mine")
    assert d.x.shape == (4, 1, 6, 6) and d.x.max() == 1.0 and d.num_classes == 3 and d.name == "mine"
    assert d.y.dtype == np.int64


def test_npz_errors(tmp_path: Path) -> None:
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 3)), y=np.zeros(2))
    with pytest.raises(DataError, match=r"bad\.npz.*'x'.*found \['images', 'y'\]"):
        load_npz(tmp_path / "bad.npz")
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(DataError, match=r"corrupt\.npz"):
        load_npz(tmp_path / "corrupt.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(DataError, match=r"text\.npz"):
        load_npz(tmp_path / "text.npz")
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(DataError, match="single"):
        load_npz(tmp_path / "single.npy")
    with pytest.raises(DataError, match="file not found"):
        load_npz(tmp_path / "absent.npz")


# ---------------------------------------------------------------- validate_arrays


def test_validate_arrays_errors() -> None:
    x = np.zeros((3, 2), dtype=np.float32)
    bad = x.copy()
    bad[1, 1] = np.nan
    with pytest.raises(DataError, match=r"src-a.*NaN"):
        validate_arrays(bad, [0, 1, 0], None, "src-a")
    with pytest.raises(DataError, match=r"outside \[0, 2\)"):
        validate_arrays(x, [0, 1, 2], 2, "s")
    with pytest.raises(DataError, match="outside"):
        validate_arrays(x, [0, -1, 1], None, "s")
    with pytest.raises(DataError, match="3 examples but y has 2"):
        validate_arrays(x, [0, 1], None, "s")
    with pytest.raises(DataError, match="empty"):
        validate_arrays(np.zeros((0, 2)), np.zeros(0), None, "s")
    with pytest.raises(DataError, match="whole numbers"):
        validate_arrays(x, [0.0, 1.5, 1.0], None, "s")
    with pytest.raises(DataError, match="numeric"):
        validate_arrays(np.array([["a"], ["b"], ["c"]]), [0, 1, 0], None, "s")
    with pytest.raises(DataError, match="shape"):
        validate_arrays(np.zeros((3, 2, 2, 2, 2)), [0, 1, 0], None, "s")


def test_validate_arrays_normalises() -> None:
    x, y, c = validate_arrays(np.ones((4, 5, 6), dtype=np.float64), np.array([0.0, 3.0, 1.0, 1.0]), None, "s")
    assert x.shape == (4, 1, 5, 6) and x.dtype == np.float32
    assert y.dtype == np.int64 and y.tolist() == [0, 3, 1, 1] and c == 4


# ---------------------------------------------------------------- long-tail protocol


def test_longtail_counts_profile() -> None:
    n = longtail_counts(144, 10, 50)
    assert len(n) == 10 and n[0] == 144 and n[-1] == max(1, 144 // 50) == 2
    assert (np.diff(n) <= 0).all()
    expected = [int(np.floor(144 * 50 ** (-c / 9))) for c in range(10)]
    assert n.tolist() == expected
    assert longtail_counts(500, 3, 100).tolist() == [500, 50, 5]  # exact values are not floored down
    assert longtail_counts(10, 4, 1000).min() == 1
    assert longtail_counts(7, 1, 10).tolist() == [7]
    assert longtail_counts(9, 5, 1).tolist() == [9] * 5
    with pytest.raises(ValueError):
        longtail_counts(10, 5, 0.5)


def test_longtail_indices() -> None:
    y = np.repeat(np.arange(5), [40, 30, 50, 25, 60])
    rng = np.random.default_rng(3)
    y = y[rng.permutation(len(y))]
    idx = longtail_indices(y, 10, seed=0)
    assert (np.diff(idx) > 0).all()
    want = longtail_counts(25, 5, 10)  # n_max defaults to the smallest class
    np.testing.assert_array_equal(class_counts(y[idx], 5), want)
    np.testing.assert_array_equal(idx, longtail_indices(y, 10, seed=0))
    assert not np.array_equal(idx, longtail_indices(y, 10, seed=1))
    idx40 = longtail_indices(y, 10, seed=0, n_max=30)
    assert class_counts(y[idx40], 5)[0] == 30
    with pytest.raises(DataError, match="class 0 has 40"):
        longtail_indices(y, 10, seed=0, n_max=41)


def test_longtail_indices_empty_class() -> None:
    y = np.array([0, 0, 1, 1, 2, 2, 4, 4])
    with pytest.raises(DataError, match="class 3 has no training examples"):
        longtail_indices(y, 2, seed=0)
    with pytest.raises(DataError, match="class 5 has no training examples"):
        longtail_indices(np.arange(5).repeat(2), 2, seed=0, num_classes=6)


def test_class_groups_thresholds() -> None:
    g = class_groups(np.array([500, 150, 60, 30, 10, 5]))
    assert g == ClassGroups((0, 1), (2, 3), (4, 5), g.rule)
    assert g.rule.startswith("thresholds") and "<20" in g.rule
    edge = class_groups(np.array([101, 100, 20, 19]))
    assert (edge.many, edge.medium, edge.few) == ((0,), (1, 2), (3,))
    assert g.as_dict() == {"many": [0, 1], "medium": [2, 3], "few": [4, 5], "rule": g.rule}


def test_class_groups_thirds_fallback() -> None:
    # digits at IF=50 (n_max=144) still has one class above 100, so the thresholds apply ...
    g = class_groups(longtail_counts(144, 10, 50))
    assert g.rule.startswith("thresholds") and g.many == (0,) and g.medium == (1, 2, 3, 4)
    # ... with a smaller head no class exceeds 100 and the groups fall back to thirds
    counts = longtail_counts(90, 10, 50)
    g = class_groups(counts)
    assert "thirds" in g.rule
    assert (len(g.many), len(g.medium), len(g.few)) == (3, 4, 3)
    assert g.many == (0, 1, 2) and g.few == (7, 8, 9)
    assert sorted(g.many + g.medium + g.few) == list(range(10))
    assert g.group_of(0) == "many" and g.group_of(5) == "medium" and g.group_of(9) == "few"
    with pytest.raises(KeyError):
        g.group_of(10)
    # not sorted by index: the head is wherever the counts say; ties go to the lower class index
    g = class_groups(np.array([5, 50, 50, 1, 90, 7]))
    assert "thirds" in g.rule and g.many == (1, 4) and g.medium == (2, 5) and g.few == (0, 3)
    g3 = class_groups(np.array([3, 2, 1]))
    assert (g3.many, g3.medium, g3.few) == ((0,), (1,), (2,))


def test_stratified_split() -> None:
    y = np.repeat(np.arange(4), [100, 50, 30, 20])
    y = y[np.random.default_rng(0).permutation(len(y))]
    tr, te = stratified_split(y, 0.2, seed=0)
    assert len(np.intersect1d(tr, te)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, te])), np.arange(len(y)))
    assert (np.diff(tr) > 0).all() and (np.diff(te) > 0).all()
    expected = class_counts(y, 4) * 0.2
    assert np.abs(class_counts(y[te], 4) - expected).max() <= 1
    tr2, te2 = stratified_split(y, 0.2, seed=0)
    np.testing.assert_array_equal(te, te2)
    assert not np.array_equal(te, stratified_split(y, 0.2, seed=1)[1])
    with pytest.raises(DataError, match="stratified"):
        stratified_split(np.array([0, 0, 0, 1]), 0.5, seed=0)


def _npz(path, y, dim=3, seed=0):
    np.savez(path, x=np.random.default_rng(seed).random((len(y), dim)).astype(np.float32), y=np.asarray(y))
    return path


@pytest.mark.parametrize("labels,needle", [
    ([0] * 40, "1 class with examples (1 class, inferred from the largest label)"),
    ([0] * 30 + [1] * 30 + [3] * 30, "4 classes (inferred from the largest label), but class(es) [2] have [0]"),
    ([0] * 30 + [1] * 30 + [2], "class(es) [2] have [1] example(s)"),
])
def test_split_refuses_unusable_classes_naming_the_file(tmp_path, labels, needle):
    from pfdiff.config import load_config
    from pfdiff.longtail.common import make_split

    path = _npz(tmp_path / "d.npz", labels)
    cfg = load_config(None, ["data.name=npz", f"data.path={path}", "data.val_per_class=0"])
    with pytest.raises(DataError) as err:
        make_split(cfg)
    assert str(path) in str(err.value) and needle in str(err.value)


def test_random_bytes_are_not_an_npz_and_no_unsafe_advice(tmp_path):
    from pfdiff.data.sources import load_npz

    path = tmp_path / "noise.npz"
    path.write_bytes(np.random.default_rng(0).bytes(512))
    with pytest.raises(DataError, match="not a .npz archive") as err:
        load_npz(path)
    assert "allow_pickle" not in str(err.value) and "pickle.load" not in str(err.value)


@pytest.mark.parametrize("args,needle", [(["--samples", "0"], "at least 4 examples per class"),
                                         (["--class-sep", "-1"], "class separation > 0"),
                                         (["--classes", "1"], "at least 2 classes")])
def test_make_data_refuses_bad_arguments_and_writes_nothing(tmp_path, args, needle):
    from typer.testing import CliRunner

    from pfdiff.cli import app

    res = CliRunner().invoke(app, ["make-data", str(tmp_path / "d.npz"), *args])
    assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == []
