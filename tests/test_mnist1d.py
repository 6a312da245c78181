"""MNIST-1D: the generated source (shape, determinism, cache), its long-tailed split, the cnn1d encoder, and
(slow) the paper's table reproduced by benchmarks/mnist1d_sanity.py."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import pfdiff.data.sources as sources
from pfdiff.config import DataConfig, load_config
from pfdiff.data import ArrayDataset, DataError, dataset_options, load_dataset, load_mnist1d, longtail_counts
from pfdiff.longtail import common
from pfdiff.models import CNN1D, create_encoder


@pytest.fixture(autouse=True)
def fresh_memory(monkeypatch, tmp_path: Path) -> Path:
    """No arrays from other tests in memory, and the user cache dir pointed at tmp_path."""
    monkeypatch.setattr(sources, "_MNIST1D_MEMORY", {})
    monkeypatch.setenv("PFDIFF_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_mnist1d_shape_dtype_counts_and_determinism(fresh_memory: Path) -> None:
    np_state, py_state = np.random.get_state(), random.getstate()
    d = load_mnist1d(100, seed=3)
    assert d.x.shape == (100, 1, 40) and d.x.dtype == np.float32 and d.y.dtype == np.int64
    assert d.input_shape == (1, 40) and not d.is_features and d.num_classes == 10 and d.name == "mnist1d"
    assert np.bincount(d.y).tolist() == [10] * 10 and np.isfinite(d.x).all()
    # the generator reseeds numpy's and Python's global RNGs: the loader must give them back untouched
    assert np.array_equal(np.random.get_state()[1], np_state[1]) and random.getstate() == py_state
    sources._MNIST1D_MEMORY.clear()
    again = load_mnist1d(100, seed=3)  # from the disk cache now
    np.testing.assert_array_equal(again.x, d.x)
    np.testing.assert_array_equal(again.y, d.y)
    assert not np.array_equal(load_mnist1d(100, seed=4).x, d.x)


def test_mnist1d_cache_is_keyed_atomic_and_self_healing(fresh_memory: Path) -> None:
    d = load_mnist1d(50, seed=0)
    load_mnist1d(60, seed=0)
    files = sorted(fresh_memory.iterdir())
    assert len(files) == 2 and all(f.name.startswith("mnist1d-") and f.suffix == ".npz" for f in files)
    d.x[:] = 0  # callers own their copy: the cached arrays stay intact
    assert load_mnist1d(50, seed=0).x.any()
    for f in files:
        f.write_bytes(b"not an npz")  # a damaged cache is regenerated, not trusted
    sources._MNIST1D_MEMORY.clear()
    np.testing.assert_array_equal(load_mnist1d(50, seed=0).y, d.y)


@pytest.mark.parametrize("n", [0, 205])
def test_mnist1d_rejects_sample_counts_that_are_not_a_multiple_of_10(n: int) -> None:
    with pytest.raises(DataError, match="multiple of 10"):
        load_mnist1d(n)


def test_mnist1d_through_config_and_make_split(fresh_memory: Path) -> None:
    cfg = load_config(None, ["data.name=mnist1d", "data.num_samples=600", "data.split_seed=7",
                             "data.imbalance_factor=10"])
    assert dataset_options(cfg.data) == {"num_samples": 600, "seed": 7}
    assert dataset_options(DataConfig()) == {}
    split = common.make_split(cfg)
    assert split.train.x.shape[1:] == (1, 40) and split.train.name == "mnist1d"
    assert split.counts.tolist() == longtail_counts(int(split.counts[0]), 10, 10.0).tolist()
    direct = load_dataset("mnist1d", None, num_samples=600, seed=7)  # the same draw, from memory
    assert len(direct.y) == 600 and len(split.train.y) < 600


def test_default_num_samples_leaves_30_in_the_rarest_class_at_if_100(monkeypatch) -> None:
    """The protocol's arithmetic at the default size, on labels laid out as the generator makes them
    (N/10 per class, shuffled; checked on a real draw above) so that no 50 000 signals are generated here."""
    assert DataConfig().num_samples == load_mnist1d.__defaults__[0]
    seen = {}

    def fake_load(name, path, **kw):
        seen.update(kw)
        y = np.random.default_rng(0).permutation(np.repeat(np.arange(10), kw["num_samples"] // 10))
        return ArrayDataset(np.zeros((len(y), 1, 40), np.float32), y, 10, name)

    monkeypatch.setattr(common, "load_dataset", fake_load)
    split = common.make_split(load_config(None, ["data.name=mnist1d", "data.imbalance_factor=100"]))
    assert seen["num_samples"] == DataConfig().num_samples
    assert split.counts.min() >= 30 and split.counts[0] >= 3000, split.counts.tolist()


def test_cnn1d_encoder_shapes_and_auto_choice() -> None:
    enc = create_encoder("cnn1d", (1, 40), feature_dim=48, width=16)
    z = enc(torch.randn(5, 1, 40))
    assert z.shape == (5, 48) and enc.feature_dim == 48
    z.sum().backward()
    assert isinstance(create_encoder("auto", (1, 40)), CNN1D)
    assert create_encoder("cnn1d", (3, 100), 8, 8)(torch.randn(2, 3, 100)).shape == (2, 8)
    with pytest.raises(ValueError, match="1-D signals"):
        create_encoder("cnn1d", (1, 8, 8))
    with pytest.raises(ValueError, match="length >= 3"):
        create_encoder("cnn1d", (1, 2))


def _sanity_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "mnist1d_sanity.py"
    spec = importlib.util.spec_from_file_location("mnist1d_sanity", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_mnist1d_sanity_mlp_and_cnn_within_3_points_of_the_paper() -> None:
    """The paper's 4 000 / 1 000 split and recipe, one seed (~2 min on one thread)."""
    report = _sanity_module().run([0], kinds=("mlp", "cnn"))
    for kind in ("mlp", "cnn"):
        r = report["results"][kind]
        assert r["within_tolerance"], f"{kind}: {r['mean']:.1f} % vs the paper's {r['paper']:.0f} %"
