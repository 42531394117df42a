"""Dataset registry: the embedded digits default, mnist1d, synthetic data, CIFAR from disk.

A dataset builder returns a `DataBundle` (train and test sets, number of classes, per-sample
input shape). Nothing here downloads: digits ships inside scikit-learn, mnist1d is generated
procedurally, and CIFAR is read from a folder the user provides.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from featkd import distributed
from featkd.errors import DataError
from featkd.registry import Registry

if TYPE_CHECKING:
    from featkd.config import DataConfig

DATASETS: Registry = Registry("dataset")


#: What a text dataset trains a model for: labels per sequence, or per token.
TEXT_TASKS = ("classification", "masked_lm", "causal_lm")


@dataclass(frozen=True)
class TextInfo:
    """What a model needs to know of tokenised text: the tokenizer's vocabulary, the longest
    sequence the data holds, the padding id, and the task (see `TEXT_TASKS`). For the
    language-model tasks, `DataBundle.num_classes` is the vocabulary size."""

    vocab_size: int
    max_length: int
    pad_id: int = 0
    task: str = "classification"
    #: where the tokenizer came from: a folder in `save_pretrained` format, or "word"
    tokenizer: str = "word"

    def example(self, batch: int = 1) -> dict[str, torch.Tensor]:
        """A batch of full-length inputs (for counting multiply-adds and inspecting models)."""
        ids = torch.arange(batch * self.max_length).reshape(batch, self.max_length) % self.vocab_size
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@dataclass
class DataBundle:
    """What a dataset builder returns; `val` is a validation split held out of the training
    data (`validation_fraction`), for choosing settings and epochs without the test set.
    Text data says what its tokens are in `text` (its `input_shape` is `(max_length,)`)."""

    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    class_names: list[str] = field(default_factory=list)
    val: Dataset | None = None
    text: TextInfo | None = None
    #: the text's tokenizer (`featkd.text.TextTokenizer`), which spells ids back into words
    tokenizer: Any = None
    #: a part-of-speech tagger that knows this text's words (a function from a sentence's
    #: words to their tags), for POS-guided augmentation (`featkd.transfer_set`)
    tagger: Callable[[list[str]], list[str]] | None = None

    def example_input(self, batch: int = 1) -> Any:
        """A batch of `batch` inputs of this data's form (zeros, or full-length token ids)."""
        return self.text.example(batch) if self.text is not None else torch.zeros((batch, *self.input_shape))


def collate_of(dataset: Dataset) -> Callable[[list], Any] | None:
    """How a loader batches `dataset`: its own `collate` (text pads each batch to its longest
    sequence), else torch's default."""
    return getattr(dataset, "collate", None)


class ArrayDataset(Dataset):
    """In-memory inputs and labels with an optional per-sample augmentation.

    Without `views`, the augmentation draws from torch's global generator: every epoch sees new
    random views that cannot be replayed. With `views` = R, each sample has R fixed views whose
    randomness is seeded by (seed, sample, view); item `i + v * len(self)` is view v of sample i,
    and its extras name both (`{"index": i, "view": v}`), so a view can be reproduced at will
    (the teacher output cache relies on it). A `ShardedSampler` with `views=R` visits view
    (epoch - 1) mod R of every sample in each epoch.
    """

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor,
                 augment: Callable[..., torch.Tensor] | None = None, views: int | None = None, seed: int = 0) -> None:
        if len(inputs) != len(targets):
            raise DataError(f"{len(inputs)} inputs but {len(targets)} labels")
        if views is not None and views < 1:
            raise DataError(f"views must be >= 1, got {views}.")
        self.inputs = inputs
        self.targets = targets
        self.augment = augment
        self.views = views if augment is not None else None
        self.seed = seed

    @property
    def replayable_views(self) -> int | None:
        """Distinct views per sample if they can be reproduced (1: no augmentation), else None."""
        if self.augment is None:
            return 1
        return self.views

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple:
        n = len(self.inputs)
        sample, view = index % n, index // n
        x = self.inputs[sample]
        if self.augment is None:
            return x, self.targets[sample]
        if self.views is None:
            return self.augment(x), self.targets[sample]
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + sample) * 1_009 + view)
        return self.augment(x, generator), self.targets[sample], {"index": sample, "view": view}


class RandomShift:
    """Translate an image (C, H, W) or signal (C, L) by up to `max_shift` positions, zero-filled."""

    def __init__(self, max_shift: int = 1) -> None:
        self.max_shift = max_shift

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        m = self.max_shift
        shifts = torch.randint(-m, m + 1, (x.dim() - 1,), generator=generator).tolist()
        out = torch.zeros_like(x)
        src = [slice(None)]
        dst = [slice(None)]
        for s, size in zip(shifts, x.shape[1:]):
            src.append(slice(max(0, -s), size - max(0, s)))
            dst.append(slice(max(0, s), size - max(0, -s)))
        out[tuple(dst)] = x[tuple(src)]
        return out


class WithIndex(Dataset):
    """A dataset whose items also carry their sample index: (x, y) -> (x, y, {"index": i}).

    Items that already carry extras keep them (a dataset of replayable views names its own
    index and view)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple:
        item = self.dataset[index]
        extras = dict(item[2]) if len(item) > 2 and isinstance(item[2], dict) else {}
        extras.setdefault("index", index)
        return item[0], item[1], extras

    def __getattr__(self, name: str):  # targets, replayable_views, ... of the wrapped set
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def with_index(dataset: Dataset) -> Dataset:
    """`dataset` with sample indices in its items (wrapped once, however many losses ask)."""
    return dataset if isinstance(dataset, WithIndex) else WithIndex(dataset)


def _standardize(train: np.ndarray, *others: np.ndarray) -> list[torch.Tensor]:
    mean, std = train.mean(), train.std() + 1e-8
    return [torch.from_numpy(((a - mean) / std).astype(np.float32)) for a in (train, *others)]


def _subset(x: np.ndarray, y: np.ndarray, fraction: float, exclude: Sequence[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training subset: drop excluded classes, then keep a stratified `fraction` of the rest."""
    keep = ~np.isin(y, list(exclude)) if exclude else np.ones(len(y), dtype=bool)
    x, y = x[keep], y[keep]
    if fraction < 1.0:
        from sklearn.model_selection import train_test_split

        x, _, y, _ = train_test_split(x, y, train_size=fraction, stratify=y, random_state=seed)
    return x, y


def _check_fraction(fraction: float) -> None:
    if not 0 < fraction <= 1:
        raise DataError(f"train_fraction must be in (0, 1], got {fraction}.")


def _check_validation(fraction: float) -> None:
    if not 0 <= fraction < 1:
        raise DataError(f"validation_fraction must be in [0, 1), got {fraction}.")


def validation_indices(targets: Sequence[int] | np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) indices: a stratified `fraction` of the samples held out, fixed by `seed`."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(targets))
    if fraction == 0:
        return index, index[:0]
    train, val = train_test_split(index, test_size=fraction, stratify=np.asarray(targets), random_state=seed)
    return np.sort(train), np.sort(val)


def _array_bundle(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray, *, validation: float,
                  train_fraction: float, exclude: Sequence[int], seed: int, augment: Callable[..., torch.Tensor] | None,
                  views: int | None, input_shape: tuple[int, ...], num_classes: int = 10) -> DataBundle:
    """Split off the validation images, shrink the training set, standardise all by the training
    images' statistics; augmentation applies to the training images only."""
    train_index, val_index = validation_indices(y_tr, validation, seed)
    x_val, y_val = x_tr[val_index], y_tr[val_index]
    x_tr, y_tr = _subset(x_tr[train_index], y_tr[train_index], train_fraction, exclude, seed)
    x_tr, x_te, x_val = _standardize(x_tr, x_te, x_val)
    return DataBundle(
        ArrayDataset(x_tr, torch.from_numpy(y_tr), augment, views, seed),
        ArrayDataset(x_te, torch.from_numpy(y_te)),
        num_classes=num_classes,
        input_shape=input_shape,
        class_names=[str(i) for i in range(num_classes)],
        val=ArrayDataset(x_val, torch.from_numpy(y_val)) if len(val_index) else None,
    )


@DATASETS.register("digits")
def digits(augment: bool = True, test_fraction: float = 0.2, train_fraction: float = 1.0,
           exclude_classes: tuple[int, ...] = (), split_seed: int = 0, views: int | None = None,
           validation_fraction: float = 0.0) -> DataBundle:
    """scikit-learn's handwritten digits (1,797 real 8x8 images, 10 classes), shipped with the package.

    A fixed stratified split (test_fraction, split_seed) gives 1,437 train / 360 test images;
    augmentation shifts images by up to one pixel, freshly random each epoch, or from `views`
    fixed random shifts per sample, replayed by seed. `validation_fraction` holds out a
    stratified part of the training images as a validation set (0.2: 288 images); then
    `train_fraction` and `exclude_classes` shrink what is left for training (the test set
    stays whole).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    _check_fraction(train_fraction)
    _check_validation(validation_fraction)
    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None]
    y = data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=split_seed)
    return _array_bundle(x_tr, y_tr, x_te, y_te, validation=validation_fraction, train_fraction=train_fraction,
                         exclude=exclude_classes, seed=split_seed, augment=RandomShift(1) if augment else None,
                         views=views, input_shape=(1, 8, 8))


@functools.lru_cache(maxsize=4)
def _mnist1d_arrays(num_samples: int, seed: int) -> tuple[np.ndarray, ...]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    np_state, py_state = np.random.get_state(), random.getstate()
    try:  # mnist1d reseeds the global generators; leave the caller's state untouched
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return data["x"], data["y"], data["x_test"], data["y_test"]


@DATASETS.register("mnist1d")
def mnist1d(num_samples: int = 5000, seed: int = 42, augment: bool = False,
            train_fraction: float = 1.0, exclude_classes: tuple[int, ...] = (), views: int | None = None,
            validation_fraction: float = 0.0) -> DataBundle:
    """MNIST-1D (Greydanus 2020): 1-D signals of length 40, 10 classes, generated procedurally.

    Defaults give the standard 4,000 train / 1,000 test split. Input shape (1, 40).
    `validation_fraction` holds out a stratified part of the training signals (0.2: 800).
    """
    _check_fraction(train_fraction)
    _check_validation(validation_fraction)
    x_tr, y_tr, x_te, y_te = _mnist1d_arrays(num_samples, seed)
    return _array_bundle(x_tr[:, None], y_tr.astype(np.int64), x_te[:, None], y_te.astype(np.int64),
                         validation=validation_fraction, train_fraction=train_fraction, exclude=exclude_classes,
                         seed=seed, augment=RandomShift(2) if augment else None, views=views, input_shape=(1, 40))


@DATASETS.register("synthetic")
def synthetic(num_classes: int = 4, input_shape: tuple[int, ...] = (3, 8, 8), train_size: int = 256,
              test_size: int = 128, noise: float = 1.0, seed: int = 0, validation_size: int = 0) -> DataBundle:
    """Random class templates plus Gaussian noise: tiny, learnable data for tests and smoke runs
    (with `validation_size` more samples as a validation set)."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn((num_classes, *input_shape), generator=g)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=g)]
        return templates[y] + noise * torch.randn((n, *input_shape), generator=g), y

    train, test = ArrayDataset(*sample(train_size)), ArrayDataset(*sample(test_size))
    return DataBundle(train, test, num_classes=num_classes, input_shape=tuple(input_shape),
                      val=ArrayDataset(*sample(validation_size)) if validation_size else None)


def _cifar(kind: str, root: str, augment: bool, validation: float) -> DataBundle:
    import torchvision
    from torchvision import transforms as T

    cls = torchvision.datasets.CIFAR10 if kind == "cifar10" else torchvision.datasets.CIFAR100
    folder = "cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python"
    if not (Path(root) / folder).is_dir():
        raise DataError(
            f"{kind}: no {folder!r} folder under {str(root)!r}. featkd does not download data: fetch "
            f"the python version of {kind.upper()} (e.g. torchvision.datasets.{cls.__name__}(root, "
            f"download=True) on a machine with internet), unpack it there, and set data.args.root."
        )
    mean, std = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)) if kind == "cifar10" else (
        (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
    normalize = [T.ToTensor(), T.Normalize(mean, std)]
    train_tf = T.Compose(([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if augment else []) + normalize)
    train = cls(root, train=True, download=False, transform=train_tf)
    test = cls(root, train=False, download=False, transform=T.Compose(normalize))
    plain = cls(root, train=True, download=False, transform=T.Compose(normalize))
    return _held_out(train, plain, test, validation, augment, input_shape=(3, 32, 32))


def _held_out(train: Any, plain: Any, test: Dataset, validation: float, augment: bool,
              input_shape: tuple[int, ...]) -> DataBundle:
    """A bundle of torchvision datasets, with a stratified validation split of the training
    set read through `plain` (the training set without augmentation)."""
    from torch.utils.data import Subset

    _check_validation(validation)
    classes = list(train.classes)
    train_index, val_index = validation_indices(train.targets, validation, 0)
    if len(val_index):
        targets = train.targets
        train = Subset(train, train_index.tolist())
        train.targets = [targets[i] for i in train_index]
    train.replayable_views = None if augment else 1  # torchvision's random transforms cannot be replayed
    val = Subset(plain, val_index.tolist()) if len(val_index) else None
    return DataBundle(train, test, num_classes=len(classes), input_shape=input_shape, class_names=classes, val=val)


@DATASETS.register("cifar10")
def cifar10(root: str = "data", augment: bool = True, validation_fraction: float = 0.0) -> DataBundle:
    """CIFAR-10 from a local folder (random crop with 4-pixel padding and horizontal flips)."""
    return _cifar("cifar10", root, augment, validation_fraction)


@DATASETS.register("cifar100")
def cifar100(root: str = "data", augment: bool = True, validation_fraction: float = 0.0) -> DataBundle:
    """CIFAR-100 from a local folder (the distillation benchmark's augmentation)."""
    return _cifar("cifar100", root, augment, validation_fraction)


@DATASETS.register("imagenet")
def imagenet(root: str = "data/imagenet", augment: bool = True, image_size: int = 224,
             validation_fraction: float = 0.0) -> DataBundle:
    """ImageNet-1k from a local folder with `train/` and `val/` class folders (ImageFolder layout):
    random-resized crops and flips for training, resize + center crop for validation."""
    import torchvision
    from torchvision import transforms as T

    folders = [Path(root) / "train", Path(root) / "val"]
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing:
        raise DataError(
            f"imagenet: {', '.join(missing)} not found. featkd does not download data: put the ILSVRC-2012 training "
            "and validation images in train/ and val/, one folder per class, and set data.args.root."
        )
    normalize = [T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    train_tf = T.Compose(([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()] if augment
                          else [T.Resize(int(image_size * 8 / 7)), T.CenterCrop(image_size)]) + normalize)
    val_tf = T.Compose([T.Resize(int(image_size * 8 / 7)), T.CenterCrop(image_size), *normalize])
    train = torchvision.datasets.ImageFolder(str(folders[0]), train_tf)
    test = torchvision.datasets.ImageFolder(str(folders[1]), val_tf)
    plain = torchvision.datasets.ImageFolder(str(folders[0]), val_tf)
    return _held_out(train, plain, test, validation_fraction, augment, input_shape=(3, image_size, image_size))


#: (classes, input shape) of datasets that live on disk, for `--smoke` runs that replace them.
SHAPES = {"cifar10": (10, (3, 32, 32)), "cifar100": (100, (3, 32, 32)), "imagenet": (1000, (3, 224, 224))}


def text_smoke_args(name: str, args: dict[str, Any] | None = None) -> dict[str, int]:
    """Arguments that shrink text dataset `name` to a few samples (`--smoke`); a wrapper that
    passes its arguments to a dataset it names (`augmented`) is looked through."""
    import inspect

    inner = (args or {}).get("dataset")
    known = inspect.signature(DATASETS.get(inner if isinstance(inner, str) else name)).parameters
    sizes = {"train_size": 16, "test_size": 8, "max_samples": 16}
    if (args or {}).get("validation_size"):  # a held-out split stays, small
        sizes["validation_size"] = 8
    if (args or {}).get("train_subset"):  # a subset of the 16
        sizes["train_subset"] = 8
    return {k: v for k, v in sizes.items() if k in known}


def build_data(name: str, args: dict | None = None) -> DataBundle:
    """Build a dataset by registry name with arguments checked against its builder."""
    return DATASETS.build(name, **(args or {}))


def make_loaders(train_set: Dataset, test_set: Dataset, data: DataConfig, seed: int) -> tuple[DataLoader, DataLoader]:
    """Training loader (shuffled by a seeded permutation per epoch, full batches only, this
    rank's shard) and an ordered test loader (see `eval_loader`)."""
    world = distributed.world_size()
    drop_last = len(train_set) >= data.batch_size * world
    views = getattr(train_set, "views", None) or 1
    train = DataLoader(train_set, batch_size=data.batch_size, num_workers=data.num_workers,
                       sampler=distributed.ShardedSampler(len(train_set), shuffle=True, seed=seed, drop_last=drop_last,
                                                          views=views),
                       drop_last=drop_last, persistent_workers=data.num_workers > 0, collate_fn=collate_of(train_set))
    return train, eval_loader(test_set, data)


def eval_loader(dataset: Dataset, data: DataConfig) -> DataLoader:
    """An ordered loader for evaluation: this rank's shard, nothing repeated."""
    return DataLoader(dataset, batch_size=data.eval_batch_size, num_workers=data.num_workers,
                      sampler=distributed.ShardedSampler(len(dataset), shuffle=False, drop_last=False),
                      collate_fn=collate_of(dataset))


from featkd import text  # noqa: E402,F401  (registers the text datasets)
from featkd import transfer_set  # noqa: E402,F401  (registers the `augmented` dataset: Tang et al.'s transfer set)
