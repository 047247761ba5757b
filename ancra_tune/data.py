"""Datasets as in-memory uint8 tensors, a fixed validation split, and a batch loader.

Every dataset becomes (images uint8 (N, C, H, W), labels int64 (N,)); the loader yields
float images in [0, 1] (normalisation lives in the model). Augmentation (random crop with
4-pixel zero padding and horizontal flip) runs vectorised on whole batches, driven by a
generator seeded from (seed, epoch) so that a resumed run sees the same batches.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .config import DataConfig

# Per-channel statistics of the training sets (the usual published values).
_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tinyimagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
    "mnist": ((0.1307,), (0.3081,)),
}
_AUGMENT_BY_DEFAULT = ("cifar10", "cifar100", "tinyimagenet")


class DatasetUnavailableError(RuntimeError):
    """The data could not be found locally nor downloaded; the message says what to do."""


@dataclass(frozen=True)
class ArrayData:
    images: Tensor  # uint8 (N, C, H, W)
    labels: Tensor  # int64 (N,)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be ({self.images.shape[0]},), got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, idx: Tensor) -> ArrayData:
        return ArrayData(self.images[idx], self.labels[idx])

    def digest(self) -> str:
        """SHA-256 of the images (with their shape) and labels, in order: the same examples give the
        same digest wherever they were read from."""
        h = hashlib.sha256(repr((tuple(self.images.shape), tuple(self.labels.shape))).encode())
        h.update(self.images.contiguous().numpy().tobytes())
        h.update(self.labels.to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()


@dataclass(frozen=True)
class DataInfo:
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]


@dataclass(frozen=True)
class DataSplits:
    train: ArrayData
    val: ArrayData  # held out from the training set with data.split_seed
    test: ArrayData | None
    info: DataInfo
    augment: bool


# --------------------------------------------------------------------------- loaders


def _from_nhwc(images: np.ndarray, labels: np.ndarray, where: str = "images") -> ArrayData:
    if images.ndim == 3:  # (N, H, W): grey images without a channel axis
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4) or min(images.shape[1:3]) < 4:
        raise ValueError(f"{where}: images must be an array (N, H, W, C) with C = 1 or 3 channels last (or "
                         f"(N, H, W) grey), H, W >= 4; got shape {tuple(images.shape)}")
    if images.dtype != np.uint8:
        raise ValueError(f"{where}: images must be uint8 (0-255), got {images.dtype}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{where}: labels must be ({images.shape[0]},) to match the images, got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
        raise ValueError(f"{where}: labels must be non-negative integers, got {labels.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
    return ArrayData(x, torch.as_tensor(np.asarray(labels), dtype=torch.int64))


def load_npz(path: str | Path) -> tuple[ArrayData, tuple[str, ...] | None]:
    """An ``.npz`` with ``images`` uint8 (N, H, W, C), ``labels`` int (N,), optional ``classes``."""
    p = Path(path)
    if not p.is_file():
        raise DatasetUnavailableError(f"npz dataset file {str(p)!r} does not exist")
    with np.load(p, allow_pickle=False) as z:
        missing = {"images", "labels"} - set(z.files)
        if missing:
            raise ValueError(f"{p}: missing key(s) {sorted(missing)}; has {z.files}")
        classes = tuple(str(c) for c in z["classes"]) if "classes" in z.files else None
        return _from_nhwc(z["images"], z["labels"], where=str(p)), classes


def _torchvision(name: str, root: str, train: bool) -> ArrayData:
    import torchvision.datasets as tvd  # imported here: only these datasets need it

    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "mnist": tvd.MNIST}[name]
    try:
        ds = cls(root, train=train, download=False)
    except RuntimeError:
        try:
            ds = cls(root, train=train, download=True)
        except Exception as e:  # URLError, socket errors, HTTP errors: all mean "offline"
            raise DatasetUnavailableError(
                f"{name} is not under --data-root {root!r} and downloading it failed ({type(e).__name__}: "
                f"{e}). Download it on a machine with internet into that folder and pass "
                f"--data-root (data.root), or convert it to an npz file and use data.dataset=npz."
            ) from e
    images = np.asarray(ds.data)
    if isinstance(ds.data, torch.Tensor):
        images = ds.data.numpy()
    return _from_nhwc(images, np.asarray(ds.targets))


def load_tinyimagenet(root: str | Path) -> tuple[ArrayData, ArrayData, tuple[str, ...]]:
    """The standard ``tiny-imagenet-200`` folder: ``wnids.txt``, ``train/<wnid>/images/*.JPEG``,
    ``val/images`` with ``val/val_annotations.txt`` (used as the test split)."""
    from PIL import Image

    base = Path(root)
    if not (base / "wnids.txt").exists() and (base / "tiny-imagenet-200" / "wnids.txt").exists():
        base = base / "tiny-imagenet-200"
    if not (base / "wnids.txt").exists():
        raise DatasetUnavailableError(
            f"Tiny-ImageNet not found under {str(root)!r}: expected tiny-imagenet-200/wnids.txt there. "
            "Point --data-root (data.root) at the folder that holds tiny-imagenet-200."
        )
    wnids = [w.strip() for w in (base / "wnids.txt").read_text().split() if w.strip()]
    index = {w: i for i, w in enumerate(wnids)}

    def read(paths: list[Path]) -> np.ndarray:
        return np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.uint8) for p in paths])

    train_paths, train_labels = [], []
    for w in wnids:
        files = sorted((base / "train" / w / "images").glob("*.JPEG"))
        train_paths += files
        train_labels += [index[w]] * len(files)
    val_paths, val_labels = [], []
    for line in (base / "val" / "val_annotations.txt").read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            val_paths.append(base / "val" / "images" / parts[0])
            val_labels.append(index[parts[1]])
    train = _from_nhwc(read(train_paths), np.asarray(train_labels))
    test = _from_nhwc(read(val_paths), np.asarray(val_labels))
    return train, test, tuple(wnids)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits as ``load_digits`` returns them (images with values 0..16,
    targets), read from the file scikit-learn ships: importing scikit-learn itself takes 1-2 s,
    which every fresh trial process would pay."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(roots[0], "datasets", "data", "digits.csv.gz") if roots else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits  # another layout: let scikit-learn find its file

        d = load_digits()
        return d.images, d.target
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def _digits(split_seed: int) -> tuple[ArrayData, ArrayData]:
    """scikit-learn's bundled 8x8 digits (no download); a fixed 20% test split."""
    images, target = digits_arrays()
    images = np.round(images * (255.0 / 16.0)).astype(np.uint8)  # values 0..16 -> 0..255
    data = _from_nhwc(images, target)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(10_000 + split_seed))
    n_test = len(data) // 5
    return data.subset(perm[n_test:]), data.subset(perm[:n_test])


def _channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.float().div_(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(mean.tolist()), tuple(std.tolist())


def split_validation(train: ArrayData, val_size: float, seed: int) -> tuple[ArrayData, ArrayData]:
    """Hold out ``val_size`` (a fraction if < 1, else a count) of ``train`` with a fixed seed."""
    n = len(train)
    n_val = int(round(val_size * n)) if val_size < 1 else int(val_size)
    if not 0 <= n_val < n:
        raise ValueError(f"data.val_size={val_size} leaves no training data out of {n} examples")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return train.subset(perm[n_val:]), train.subset(perm[:n_val])


def load_dataset(cfg: DataConfig) -> DataSplits:
    """Load, split and describe the dataset named by ``cfg``."""
    classes: tuple[str, ...] | None = None
    if cfg.dataset in ("cifar10", "cifar100", "mnist"):
        train, test = _torchvision(cfg.dataset, cfg.root, True), _torchvision(cfg.dataset, cfg.root, False)
    elif cfg.dataset == "tinyimagenet":
        train, test, classes = load_tinyimagenet(cfg.root)
    elif cfg.dataset == "npz":
        assert cfg.train_file is not None
        train, classes = load_npz(cfg.train_file)
        test = load_npz(cfg.test_file)[0] if cfg.test_file else None
        if test is not None and test.images.shape[1:] != train.images.shape[1:]:
            c, h, w = train.images.shape[1:]
            tc, th, tw = test.images.shape[1:]
            raise ValueError(f"data.test_file {cfg.test_file} holds {th}x{tw} images with {tc} channel(s), "
                             f"data.train_file {cfg.train_file} {h}x{w} with {c}: a model trained on one cannot be "
                             "evaluated on the other")
    else:  # digits
        train, test = _digits(cfg.split_seed)
    train, val = split_validation(train, cfg.val_size, cfg.split_seed)
    if cfg.train_limit is not None:
        train = train.subset(torch.arange(min(cfg.train_limit, len(train))))

    num_classes = int(max(train.labels.max(), val.labels.max() if len(val) else 0)) + 1
    if classes is not None and len(classes) >= num_classes:
        num_classes = len(classes)
    if classes is None:
        classes = tuple(str(i) for i in range(num_classes))
    mean, std = _STATS[cfg.dataset] if cfg.dataset in _STATS else _channel_stats(train.images)
    if not cfg.normalize:
        c = train.images.shape[1]
        mean, std = (0.0,) * c, (1.0,) * c
    info = DataInfo(num_classes=num_classes, in_channels=train.images.shape[1],
                    image_size=train.images.shape[-1], mean=mean, std=std, classes=classes)
    augment = cfg.augment if cfg.augment is not None else cfg.dataset in _AUGMENT_BY_DEFAULT
    return DataSplits(train=train, val=val, test=test, info=info, augment=augment)


# --------------------------------------------------------------------------- batches


def draw_augment(n: int, generator: torch.Generator, pad: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    """Random crop offsets (oy, ox) in [0, 2 pad] and flip flags for ``n`` images."""
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    return oy, ox, flip


def augment_batch(x: Tensor, oy: Tensor, ox: Tensor, flip: Tensor, pad: int = 4) -> Tensor:
    """Crop after ``pad`` zero padding at offsets (oy, ox), then flip where ``flip``; vectorised.
    x: (N, C, H, W) float."""
    n, c, h, w = x.shape
    oy, ox, flip = oy.to(x.device), ox.to(x.device), flip.to(x.device)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = oy[:, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = ox[:, None] + torch.arange(w, device=x.device)  # (N, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    idx_n = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A CPU generator determined by (seed, epoch, stream): resuming at an epoch replays it."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7_919 + stream * 104_729) % (2**63))


class BatchLoader:
    """Batches of (x float in [0, 1], y) from in-memory data.

    Sharding: with ``world_size`` W, global batch k is the same as for one process and
    rank r takes its rows r, r+W, ...; so W workers with B/W rows each see the union of
    one worker's batch of B. ``batch_size`` is the global batch size.
    """

    def __init__(self, data: ArrayData, *, batch_size: int, shuffle: bool, augment: bool = False,
                 drop_last: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu") -> None:
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be divisible by world_size {world_size}")
        self.data, self.batch_size, self.shuffle = data, batch_size, shuffle
        self.augment, self.drop_last, self.seed = augment, drop_last, seed
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate ``epoch``'s batches from batch ``start`` on (a run resumed mid-epoch): the same
        order and augmentations as from its start, the first ``start`` batches skipped unread."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        gen = epoch_generator(self.seed, self.epoch, stream=1)
        n = len(self.data)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        for k in range(len(self)):
            idx = order[k * self.batch_size:(k + 1) * self.batch_size]
            # Drawn for the global batch before sharding: the same for every world size.
            params = draw_augment(len(idx), gen) if self.augment else None
            if k < self.start:  # drawn all the same: the batches after it get their own draws
                continue
            shard = slice(self.rank, None, self.world_size)
            idx = idx[shard]
            x = self.data.images[idx].to(self.device, non_blocking=True).float().div_(255.0)
            if params is not None:
                x = augment_batch(x, *(p[shard] for p in params))
            yield x, self.data.labels[idx].to(self.device, non_blocking=True)
