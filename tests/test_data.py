import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from ancra_tune.config import DataConfig
from ancra_tune.data import (
    ArrayData,
    BatchLoader,
    DatasetUnavailableError,
    augment_batch,
    load_dataset,
    load_npz,
    split_validation,
)


def test_npz_loader_reads_real_cifar(shared_data: Path) -> None:
    data, classes = load_npz(shared_data / "cifar10" / "test1000.npz")
    assert data.images.shape == (1000, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert classes is not None and classes[3] == "cat"


def test_npz_dataset_split_and_info(shared_data: Path) -> None:
    cfg = DataConfig(dataset="npz", train_file=str(shared_data / "cifar10" / "train10000.npz"),
                     test_file=str(shared_data / "cifar10" / "test1000.npz"), val_size=0.1)
    s = load_dataset(cfg)
    assert (len(s.train), len(s.val), len(s.test)) == (9000, 1000, 1000)
    assert s.info.num_classes == 10 and s.info.in_channels == 3 and s.info.image_size == 32
    # Statistics computed from the real training images (CIFAR-10's mean is about 0.49, 0.48, 0.45).
    assert s.info.mean == pytest.approx((0.4914, 0.4822, 0.4465), abs=0.01)
    assert not s.augment  # augmentation defaults on only for the named CIFAR/Tiny-ImageNet datasets


def test_validation_split_is_fixed_and_disjoint() -> None:
    ids = torch.arange(500)
    data = ArrayData(torch.zeros(500, 1, 2, 2, dtype=torch.uint8), ids)
    tr, va = split_validation(data, 0.2, seed=7)
    tr2, va2 = split_validation(data, 0.2, seed=7)
    assert len(va) == 100 and torch.equal(va.labels, va2.labels) and torch.equal(tr.labels, tr2.labels)
    assert set(tr.labels.tolist()).isdisjoint(va.labels.tolist())
    assert sorted(tr.labels.tolist() + va.labels.tolist()) == list(range(500))
    _, va3 = split_validation(data, 0.2, seed=8)
    assert not torch.equal(va.labels, va3.labels)
    assert len(split_validation(data, 50, seed=0)[1]) == 50


def test_digits_needs_no_files() -> None:
    s = load_dataset(DataConfig(dataset="digits", val_size=0.1))
    assert len(s.train) + len(s.val) + len(s.test) == 1797
    assert s.train.images.shape[1:] == (1, 8, 8) and int(s.train.images.max()) == 255
    assert s.info.num_classes == 10


def test_digits_are_scikit_learns_without_importing_it() -> None:
    """Read from the file scikit-learn ships, the digits are exactly what ``load_digits`` gives,
    and loading them imports no scikit-learn (1-2 s in every fresh trial process)."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from ancra_tune.data import digits_arrays

    images, target = digits_arrays()
    d = load_digits()
    np.testing.assert_array_equal(images, d.images)
    np.testing.assert_array_equal(target, d.target)
    code = ("import sys; from ancra_tune.data import digits_arrays; digits_arrays(); "
            "print(any(m == 'sklearn' or m.startswith('sklearn.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stdout + out.stderr


def test_augmentation_is_crop_and_flip() -> None:
    x = torch.rand(3, 2, 6, 6)
    pad = 4
    same = augment_batch(x, torch.full((3,), pad), torch.full((3,), pad), torch.zeros(3, dtype=torch.bool))
    assert torch.equal(same, x)  # crop at the centre of the padding, no flip: identity
    flipped = augment_batch(x, torch.full((3,), pad), torch.full((3,), pad), torch.ones(3, dtype=torch.bool))
    assert torch.equal(flipped, x.flip(3))
    no_flip = torch.zeros(3, dtype=torch.bool)
    shifted = augment_batch(x, torch.tensor([pad + 1] * 3), torch.tensor([pad - 2] * 3), no_flip)
    # Moving the window down 1 and left 2: row i of the crop is row i+1 of x, column j is column j-2.
    assert torch.equal(shifted[:, :, :5, 2:], x[:, :, 1:, :4])
    assert shifted[:, :, 5, :].abs().sum() == 0 and shifted[:, :, :, :2].abs().sum() == 0


def test_loader_shards_union_equals_single_process() -> None:
    data = ArrayData(torch.randint(0, 255, (40, 1, 4, 4), dtype=torch.uint8), torch.arange(40))
    single = BatchLoader(data, batch_size=8, shuffle=True, augment=True, drop_last=True, seed=3)
    shards = [BatchLoader(data, batch_size=8, shuffle=True, augment=True, drop_last=True, seed=3, rank=r,
                          world_size=2) for r in range(2)]
    for loader in [single, *shards]:
        loader.set_epoch(5)
    for (x, y), (x0, y0), (x1, y1) in zip(single, *shards, strict=True):
        assert torch.equal(y[0::2], y0) and torch.equal(y[1::2], y1)
        assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1)
    # Another epoch, another order; the same epoch, the same order.
    single.set_epoch(6)
    order6 = torch.cat([y for _, y in single])
    single.set_epoch(5)
    assert not torch.equal(order6, torch.cat([y for _, y in single]))
    assert x.min() >= 0 and x.max() <= 1


def test_a_loader_started_mid_epoch_gives_the_rest_of_that_epoch() -> None:
    """Resuming at batch k (a mid-epoch checkpoint): the epoch's batches k, k+1, ... with their own
    crops and flips, as from the epoch's start; each rank's shard alike."""
    data = ArrayData(torch.randint(0, 255, (64, 3, 8, 8), dtype=torch.uint8), torch.arange(64))
    for rank, world in ((0, 1), (1, 2)):
        loader = BatchLoader(data, batch_size=8, shuffle=True, augment=True, drop_last=True, seed=3, rank=rank,
                             world_size=world)
        loader.set_epoch(2)
        whole = list(loader)
        loader.set_epoch(2, start=5)
        rest = list(loader)
        assert len(rest) == len(whole) - 5
        for (x, y), (x0, y0) in zip(rest, whole[5:], strict=True):
            assert torch.equal(x, x0) and torch.equal(y, y0)
        loader.set_epoch(2)  # the next epoch starts at its beginning again
        assert len(list(loader)) == len(whole)


def test_tinyimagenet_folder(tmp_path: Path) -> None:
    from PIL import Image

    base = tmp_path / "tiny-imagenet-200"
    wnids = ["n01", "n02"]
    (base).mkdir()
    (base / "wnids.txt").write_text("\n".join(wnids))
    rng = np.random.default_rng(0)
    for w in wnids:
        d = base / "train" / w / "images"
        d.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / f"{w}_{i}.JPEG")
    (base / "val" / "images").mkdir(parents=True)
    lines = []
    for i, w in enumerate(["n02", "n01"]):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(base / "val/images" / f"v{i}.JPEG")
        lines.append(f"v{i}.JPEG\t{w}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines))
    s = load_dataset(DataConfig(dataset="tinyimagenet", root=str(tmp_path), val_size=1))
    assert len(s.train) == 5 and len(s.val) == 1 and s.test.labels.tolist() == [1, 0]
    assert s.train.images.shape[1:] == (3, 64, 64) and s.augment and s.info.classes == ("n01", "n02")
    with pytest.raises(DatasetUnavailableError, match="tiny-imagenet-200"):
        load_dataset(DataConfig(dataset="tinyimagenet", root=str(tmp_path / "nowhere")))


def test_offline_download_names_data_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import torchvision.datasets as tvd

    class Offline:
        def __init__(self, root, train, download):
            if download:
                raise urllib.error.URLError("no network")
            raise RuntimeError("Dataset not found")

    monkeypatch.setattr(tvd, "CIFAR10", Offline)
    with pytest.raises(DatasetUnavailableError, match="--data-root") as e:
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)))
    assert "npz" in str(e.value) and str(tmp_path) in str(e.value)
