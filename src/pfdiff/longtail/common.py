"""Shared pieces of the recognition pipelines: the long-tailed split (with its validation split and sealed
test set), features, stage-1 augmentation, classifier training."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pfdiff.config import OptimConfig, RunConfig
from pfdiff.data import (ArrayDataset, ClassGroups, DataError, balanced_indices, class_counts, class_groups, dataset_options,
                         load_dataset, longtail_indices, stratified_split)
from pfdiff.longtail.losses import log_prior  # noqa: F401  (re-exported: the pipelines' prior helper)
from pfdiff.models import create_classifier, create_encoder
from pfdiff.training import generator, optimizer_options, shuffled_batch, steps_per_epoch, train


class PrematureTestAccess(RuntimeError):
    """Test data was read before the run's final evaluation: some choice could have been made on it."""


class SealedDataset:
    """The test set of a run, sealed: ``x``, ``y`` and ``subset`` raise :class:`PrematureTestAccess` outside
    :meth:`final_evaluation`, so no training stage and no choice (τ, pseudo weight, epoch) can use it. Its size,
    classes and class counts (fixed by the protocol's design: balanced) stay readable. ``reads`` records every
    access made inside the final evaluation."""

    def __init__(self, data: ArrayDataset):
        self._data, self._open = data, False
        self.reads: list[str] = []
        self.num_classes, self.name, self.input_shape = data.num_classes, data.name, data.input_shape
        self.label_counts = class_counts(data.y, data.num_classes)

    def __len__(self) -> int:
        return len(self._data.y)

    def _read(self, what: str) -> Any:
        if not self._open:
            raise PrematureTestAccess(
                f"test data ({what}) read before final_evaluation(): every training stage and every choice "
                "(τ of +la, the pseudo weight, an epoch) must use the training or validation split only")
        self.reads.append(what)
        return getattr(self._data, what)

    @property
    def x(self) -> np.ndarray:
        return self._read("x")

    @property
    def y(self) -> np.ndarray:
        return self._read("y")

    def subset(self, idx: np.ndarray) -> ArrayDataset:
        return self._read("subset")(idx)

    @contextmanager
    def final_evaluation(self) -> Iterator["SealedDataset"]:
        """Unseal for the final evaluation (yields this set, now readable, its reads recorded); sealed again
        afterwards."""
        self._open = True
        try:
            yield self
        finally:
            self._open = False


@dataclass
class LongTailSplit:
    """A fixed-seed stratified split: a long-tailed training subset, a balanced validation set held out of the
    training pool before the long-tailed subsampling, and a balanced test set (sealed in a pipeline run)."""

    train: ArrayDataset
    test: ArrayDataset | SealedDataset
    counts: np.ndarray  # training examples per class
    groups: ClassGroups
    heldout: ArrayDataset | None = None  # the training pool's examples the long-tailed subset left out, the
    # validation examples included (never trained on; decided by data.split_seed before training): the
    # non-members of membership attacks
    val: ArrayDataset | None = None  # data.val_per_class per class from the pool (None: val_per_class = 0)

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    def sealed(self) -> "LongTailSplit":
        """This split with its test set sealed (:class:`SealedDataset`); already sealed: itself."""
        return self if isinstance(self.test, SealedDataset) else replace(self, test=SealedDataset(self.test))

    def final_evaluation(self):
        """Context in which the (sealed) test set may be read."""
        return self.test.final_evaluation() if isinstance(self.test, SealedDataset) else nullcontext(self.test)

    def summary(self) -> dict[str, Any]:
        test_counts = (self.test.label_counts if isinstance(self.test, SealedDataset)
                       else class_counts(self.test.y, self.num_classes))
        val_counts = class_counts(self.val.y, self.num_classes).tolist() if self.val is not None else None
        return {"dataset": self.train.name, "num_classes": self.num_classes, "train_size": len(self.train.y),
                "val_size": 0 if self.val is None else len(self.val.y), "test_size": len(self.test),
                "train_counts": self.counts.tolist(), "val_counts": val_counts,
                "test_counts": test_counts.tolist(), "groups": self.groups.as_dict()}


def validation_indices(y: np.ndarray, per_class: int, seed: int, num_classes: int) -> np.ndarray:
    """``per_class`` random examples of every class (sorted indices into ``y``), drawn with a stream of their own
    (seeded by ``seed``), so the long-tailed draw that follows is unchanged in kind; each class must keep one."""
    counts = class_counts(y, num_classes)
    short = np.flatnonzero(counts <= per_class)
    if len(short):
        c = int(short[0])
        raise DataError(f"class {c} has {counts[c]} examples in the training pool; data.val_per_class={per_class} "
                        "would leave it none to train on (lower data.val_per_class)")
    rng = np.random.default_rng([seed, 0x7A1])
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), size=per_class, replace=False)
                                   for c in range(num_classes)]))


def check_classes(data: ArrayDataset, source: str) -> None:
    """At least 2 classes, and every class 0..K−1 with at least 2 examples (one to train on, one to test);
    the message says where K came from (declared by the source, or inferred from the largest label)."""
    counts = class_counts(data.y, data.num_classes)
    how = "inferred from the largest label" if data.classes_inferred else "as the source declares"
    present = int((counts > 0).sum())
    if present < 2:
        total = f"{data.num_classes} class" + ("" if data.num_classes == 1 else "es")
        raise DataError(f"{source}: {present} class with examples ({total}, {how}); "
                        "long-tailed recognition needs at least 2")
    few = np.flatnonzero(counts < 2)
    if few.size:
        raise DataError(f"{source}: {data.num_classes} classes ({how}), but class(es) {few[:8].tolist()} have "
                        f"{counts[few[:8]].tolist()} example(s); every class needs one to train on and one to test "
                        "(relabel the classes to 0..K−1, or drop the rare ones)")


def make_split(cfg: RunConfig) -> LongTailSplit:
    """Load the configured data, split it (seeded by ``data.split_seed``), hold out the balanced validation set
    (``data.val_per_class``) and draw the long-tailed subset from the rest of the training pool."""
    d = cfg.data
    data = load_dataset(d.name, d.path, **dataset_options(d))
    source = d.path or d.name
    check_classes(data, source)
    train_idx, test_idx = stratified_split(data.y, d.test_fraction, d.split_seed)
    empty = np.flatnonzero(class_counts(data.y[test_idx], data.num_classes) == 0)
    if empty.size:
        raise DataError(f"{source}: class(es) {empty[:8].tolist()} get no test example at data.test_fraction="
                        f"{d.test_fraction} (they have {class_counts(data.y, data.num_classes)[empty[:8]].tolist()} "
                        "examples); raise data.test_fraction or drop those classes")
    # exactly balanced test set; the few extra test examples go back to the training pool
    keep = test_idx[balanced_indices(data.y[test_idx], d.split_seed, data.num_classes)]
    pool = data.subset(np.union1d(train_idx, np.setdiff1d(test_idx, keep)))
    # validation first (balanced, like ImageNet-LT's): the tail classes keep their few training images
    val_idx = (validation_indices(pool.y, d.val_per_class, d.split_seed, data.num_classes) if d.val_per_class
               else np.zeros(0, dtype=np.int64))
    rest = np.setdiff1d(np.arange(len(pool.y)), val_idx)
    lt_idx = rest[longtail_indices(pool.y[rest], d.imbalance_factor, d.split_seed, data.num_classes)]
    lt = pool.subset(lt_idx)
    counts = class_counts(lt.y, data.num_classes)
    heldout = pool.subset(np.setdiff1d(np.arange(len(pool.y)), lt_idx))
    val = pool.subset(val_idx) if d.val_per_class else None
    return LongTailSplit(lt, data.subset(keep), counts, class_groups(counts), heldout, val)


def to_tensors(ds: ArrayDataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.as_tensor(ds.x, device=device), torch.as_tensor(ds.y, device=device)


@torch.no_grad()
def encode(encoder: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Features z = E(x) in eval mode, batched."""
    encoder.eval()
    return torch.cat([encoder(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def predict_logits(classifier: nn.Module, z: torch.Tensor) -> torch.Tensor:
    classifier.eval()
    return classifier(z)


def train_classifier_on_features(classifier: nn.Module, z: torch.Tensor, y: torch.Tensor, *, epochs: int,
                                 batch_size: int, lr: float, weight_decay: float, seed: int, description: str,
                                 weights: torch.Tensor | None = None, checkpoint: Path | None = None,
                                 log: Callable[[dict], None] | None = None,
                                 batch_fn: Callable[[int], torch.Tensor] | None = None) -> nn.Module:
    """Fit G on fixed features with (optionally per-example weighted) cross-entropy."""
    steps = epochs * steps_per_epoch(len(y), batch_size)
    opt = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=weight_decay, **optimizer_options())
    w = torch.ones(len(y), device=z.device) if weights is None else weights

    def step_fn(step: int):
        idx = batch_fn(step).to(z.device) if batch_fn else shuffled_batch(len(y), batch_size, step, seed, z.device)
        per_example = nn.functional.cross_entropy(classifier(z[idx]), y[idx], reduction="none")
        return (w[idx] * per_example).sum() / w[idx].sum(), {}

    train({"classifier": classifier}, opt, step_fn, steps, description=description, checkpoint=checkpoint,
          log=log)
    return classifier


def seeded_init(seed: int, name: str, build: Callable[[], nn.Module], device: torch.device) -> nn.Module:
    """Build a module with weights drawn from a seed of its own, so methods do not perturb each other."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator("cpu", seed, "init", name).initial_seed())
        return build().to(device)


def init_encoder_classifier(cfg: RunConfig, input_shape: tuple[int, ...], num_classes: int, seed: int,
                            device: torch.device, prefix: str = "") -> tuple[nn.Module, nn.Module]:
    """Fresh E and G of the configured kinds, each seeded by ``prefix`` + "encoder" / "classifier"."""
    m = cfg.model
    encoder = seeded_init(seed, f"{prefix}encoder",
                          lambda: create_encoder(m.encoder, input_shape, m.feature_dim, m.width), device)
    classifier = seeded_init(seed, f"{prefix}classifier",
                             lambda: create_classifier(m.classifier, encoder.feature_dim, num_classes), device)
    return encoder, classifier


# ---------------------------------------------------------------- stage-1 augmentation


def augmentation_kind(o: OptimConfig, input_shape: tuple[int, ...]) -> str:
    """The augmentation ``stage1.augment`` means for inputs of ``input_shape`` (without N): ``auto`` is
    crop-flip for images [C, H, W] with H, W ≥ 16 (not 8×8 digits), shift for 1-D signals [C, L], else none."""
    kind = o.augment
    images, signals = len(input_shape) == 3, len(input_shape) == 2
    if kind == "auto":
        if images and min(input_shape[1:]) >= 16:
            return "crop-flip"
        return "shift" if signals else "none"
    if kind in ("crop-flip", "crop", "flip") and not images:
        raise ValueError(f"stage1.augment={kind} needs images [N, C, H, W]; the inputs are {list(input_shape)} "
                         "(use shift for 1-D signals, none for feature vectors)")
    if kind == "shift" and not signals:
        raise ValueError(f"stage1.augment=shift needs 1-D signals [N, C, L]; the inputs are {list(input_shape)}")
    return kind


def random_crop(x: torch.Tensor, pad: int, g: torch.Generator) -> torch.Tensor:
    """Zero-pad images [N, C, H, W] by ``pad`` and crop a random H×W window per image (one gather)."""
    n, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)  # [N, H]
    cols = dx[:, None] + torch.arange(w, device=x.device)  # [N, W]
    return xp[torch.arange(n, device=x.device)[:, None, None, None], torch.arange(c, device=x.device)[None, :, None, None],
              rows[:, None, :, None], cols[:, None, None, :]]


def random_flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Mirror each image horizontally with probability ½."""
    flip = torch.rand(len(x), generator=g, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_shift(x: torch.Tensor, max_shift: int, g: torch.Generator, mode: str = "zero") -> torch.Tensor:
    """Shift each signal [N, C, L] by a random s ∈ [−max_shift, max_shift]: out[t] = x[t − s], zero-filled
    (``zero``) or wrapped around (``circular``)."""
    n, _, length = x.shape
    s = torch.randint(-max_shift, max_shift + 1, (n,), generator=g, device=x.device)
    src = torch.arange(length, device=x.device)[None, :] - s[:, None]  # [N, L]
    if mode == "circular":
        return torch.gather(x, 2, (src % length)[:, None, :].expand_as(x))
    valid = (src >= 0) & (src < length)
    out = torch.gather(x, 2, src.clamp(0, length - 1)[:, None, :].expand_as(x))
    return out * valid[:, None, :].to(x.dtype)


def augmenter(o: OptimConfig, input_shape: tuple[int, ...]) -> Callable[[torch.Tensor, int, int], torch.Tensor] | None:
    """``augment(x, seed, step)`` of the configured kind (None: no augmentation). Tensor ops on x's device, the
    draws of batch ``step`` from a generator of their own, so a resumed stage repeats them exactly."""
    kind = augmentation_kind(o, input_shape)
    crop = kind in ("crop-flip", "crop") and o.augment_pad > 0
    flip = kind in ("crop-flip", "flip")
    shift = kind == "shift" and o.augment_pad > 0
    if not (crop or flip or shift):
        return None

    def augment(x: torch.Tensor, seed: int, step: int) -> torch.Tensor:
        g = generator(x.device, seed, "augment", step)
        if crop:
            x = random_crop(x, o.augment_pad, g)
        if flip:
            x = random_flip(x, g)
        if shift:
            x = random_shift(x, o.augment_pad, g, o.shift_mode)
        return x

    return augment
