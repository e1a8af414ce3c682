"""Tests for kdbench.data: named datasets, the on-device augment/normalise pipeline, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kdbench.data import (
    DATASETS,
    DataSplits,
    Loader,
    augment,
    digits_split_indices,
    load_dataset,
    normalize,
    resolve_data_dir,
)
from kdbench.errors import KdbenchError

MNIST_TEST_BINCOUNT = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return load_dataset("digits")


# ----------------------------------------------------------------------------- digits


def test_digits_shapes_and_info(digits: DataSplits) -> None:
    info = digits.info
    assert info.name == "digits" and info.num_classes == 10 and info.in_chans == 1 and info.img_size == 8
    assert info.classes == tuple(str(i) for i in range(10))
    assert (info.train_size, info.test_size) == (1437, 360)
    assert digits.train_images.shape == (1437, 1, 8, 8) and digits.test_images.shape == (360, 1, 8, 8)
    assert digits.train_images.dtype == torch.uint8 and digits.test_images.dtype == torch.uint8
    assert digits.train_labels.dtype == torch.int64 and digits.train_labels.shape == (1437,)
    assert digits.test_labels.shape == (360,)
    # 17 grey levels scaled to the full uint8 range
    assert digits.train_images.min() == 0 and digits.train_images.max() == 255
    assert len(torch.unique(digits.train_images)) == 17
    assert "load_digits" in info.source


def test_digits_split_fixed_stratified_disjoint(digits: DataSplits) -> None:
    torch.manual_seed(123)  # the split must not depend on any run seed
    again = load_dataset("digits")
    assert torch.equal(again.train_images, digits.train_images)
    assert torch.equal(again.test_labels, digits.test_labels)
    counts = torch.bincount(digits.test_labels, minlength=10)
    assert (counts >= 35).all() and (counts <= 37).all()  # every class in test, ~20% each
    train_idx, test_idx = digits_split_indices()
    assert len(np.intersect1d(train_idx, test_idx)) == 0
    assert len(train_idx) + len(test_idx) == 1797
    from sklearn.datasets import load_digits

    bunch = load_digits()
    assert np.array_equal(digits.test_labels.numpy(), bunch.target[test_idx])
    assert np.array_equal(digits.train_labels.numpy(), bunch.target[train_idx])
    expected = np.rint(bunch.images[test_idx] * 255 / 16).astype(np.uint8)
    assert np.array_equal(digits.test_images[:, 0].numpy(), expected)


def test_digits_mean_std_from_train(digits: DataSplits) -> None:
    x = digits.train_images.double() / 255
    assert digits.info.mean[0] == pytest.approx(x.mean().item(), abs=1e-12)
    assert digits.info.std[0] == pytest.approx(x.std(correction=0).item(), abs=1e-12)
    # normalising the train split with its own stats gives mean 0, std 1
    z = normalize(digits.train_images, digits.info)
    assert z.dtype == torch.float32
    assert z.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert z.std(correction=0).item() == pytest.approx(1.0, abs=1e-5)


def test_limit_and_registry(digits: DataSplits) -> None:
    small = load_dataset("digits", limit=50)
    assert small.train_images.shape[0] == 50 and small.test_labels.shape[0] == 50
    assert (small.info.train_size, small.info.test_size) == (50, 50)
    assert small.info.mean == digits.info.mean  # stats stay those of the full train split
    assert torch.equal(small.test_images, digits.test_images[:50])
    assert set(DATASETS) == {"digits", "mnist", "fashion_mnist", "cifar10", "cifar100"}
    with pytest.raises(KdbenchError, match="limit"):
        load_dataset("digits", limit=0)


def test_splits_to_device(digits: DataSplits) -> None:
    moved = digits.to("cpu")
    assert moved is not digits and moved.info is digits.info
    assert torch.equal(moved.train_images, digits.train_images)


def test_resolve_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KDBENCH_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "cli") == tmp_path / "cli"
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("KDBENCH_DATA")
    assert resolve_data_dir(None) == Path.home() / ".cache" / "kdbench" / "data"


# ----------------------------------------------------------------------------- augment


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_augment_identity_shape_dtype(digits: DataSplits) -> None:
    x = digits.train_images[:64]
    same = augment(x, crop_padding=0, flip=False, generator=_gen(0))
    assert torch.equal(same, x)
    out = augment(x, crop_padding=2, flip=True, generator=_gen(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert not torch.equal(out, x)


def test_augment_deterministic(digits: DataSplits) -> None:
    x = digits.train_images[:128]
    a = augment(x, crop_padding=2, flip=True, generator=_gen(7))
    b = augment(x, crop_padding=2, flip=True, generator=_gen(7))
    c = augment(x, crop_padding=2, flip=True, generator=_gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_augment_flip_only(digits: DataSplits) -> None:
    x = digits.train_images[:256]
    out = augment(x, crop_padding=0, flip=True, generator=_gen(1))
    itself = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert (itself | mirrored).all()
    asym = ~(x == x.flip(-1)).flatten(1).all(1)  # images whose mirror differs from them
    assert mirrored[asym].any() and itself[asym].any()  # both outcomes occur, per image


def test_augment_crop_borders() -> None:
    p, n, h = 3, 200, 10
    x = torch.full((n, 2, h, h), 77, dtype=torch.uint8)
    out = augment(x, crop_padding=p, flip=False, generator=_gen(2))
    assert set(torch.unique(out).tolist()) <= {0, 77}
    assert torch.equal(out[:, 0], out[:, 1])  # channels share one offset
    nz = out[:, 0] != 0
    rows, cols = nz.any(2), nz.any(1)  # N×H: which rows/columns hold image pixels
    for r, c in zip(rows, cols):
        # the image part is one solid rectangle of size (h - |dy|) × (w - |dx|), |dy|,|dx| <= p
        assert r.sum() >= h - p and c.sum() >= h - p
        ri, ci = r.nonzero().flatten(), c.nonzero().flatten()
        assert ri[-1] - ri[0] + 1 == r.sum() and ci[-1] - ci[0] + 1 == c.sum()
        assert ri[0] == 0 or ri[-1] == h - 1  # zero border on one side only
    # every image is a zero-padded shift: non-zero exactly in the rectangle
    assert torch.equal(nz, rows[:, :, None] & cols[:, None, :])

    def shift(mask: torch.Tensor) -> int:  # signed shift: >0 zero border first, <0 border last
        idx = mask.nonzero().flatten()
        return int(idx[0]) if idx[0] > 0 else -(h - 1 - int(idx[-1]))

    dy, dx = [shift(r) for r in rows], [shift(c) for c in cols]
    # each image its own offsets, and every offset in [0, 2p] (shift -p..p) occurs on both axes
    assert set(dy) == set(range(-p, p + 1)) and set(dx) == set(range(-p, p + 1))
    assert len(set(zip(dy, dx))) > 20


# ----------------------------------------------------------------------------- Loader


def test_loader_covers_epoch(digits: DataSplits) -> None:
    n = len(digits.train_labels)
    ids = torch.arange(n)
    # labels carry the example index so coverage can be checked exactly
    loader = Loader(digits.train_images, ids, digits.info, batch_size=100, shuffle=True, generator=_gen(3))
    assert len(loader) == 15  # ceil(1437 / 100)
    epochs = []
    for _ in range(2):
        seen, sizes = [], []
        for xb, yb in loader:
            assert xb.dtype == torch.float32 and xb.shape[1:] == (1, 8, 8)
            assert torch.allclose(xb, normalize(digits.train_images[yb], digits.info))
            seen.append(yb)
            sizes.append(len(yb))
        assert sizes == [100] * 14 + [37]
        order = torch.cat(seen)
        assert torch.equal(order.sort().values, ids)
        epochs.append(order)
    assert not torch.equal(epochs[0], ids) and not torch.equal(epochs[0], epochs[1])


def test_loader_no_shuffle_and_drop_last(digits: DataSplits) -> None:
    x, y = digits.test_images, digits.test_labels  # 360
    plain = Loader(x, y, digits.info, batch_size=100, shuffle=False)
    assert len(plain) == 4
    assert torch.equal(torch.cat([yb for _, yb in plain]), y)
    dropped = Loader(x, y, digits.info, batch_size=100, shuffle=True, drop_last=True, generator=_gen(4))
    assert len(dropped) == 3
    assert [len(yb) for _, yb in dropped] == [100, 100, 100]
    exact = Loader(x, y, digits.info, batch_size=120, shuffle=False, drop_last=True)
    assert len(exact) == 3 and sum(len(yb) for _, yb in exact) == 360


def test_loader_augments(digits: DataSplits) -> None:
    x, y = digits.train_images[:200], digits.train_labels[:200]
    a = Loader(x, y, digits.info, batch_size=64, shuffle=True, generator=_gen(5), crop_padding=1, flip=True)
    b = Loader(x, y, digits.info, batch_size=64, shuffle=True, generator=_gen(5), crop_padding=1, flip=True)
    batches_a, batches_b = list(a), list(b)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(batches_a, batches_b))
    plain = normalize(x, digits.info)
    # augmentation changed some images relative to the un-augmented ones of the same labels
    xb, _ = batches_a[0]
    assert xb.shape == (64, 1, 8, 8) and not any(torch.equal(xb, plain[i : i + 64]) for i in range(0, 137))


# ----------------------------------------------------------------------------- torchvision sets


def test_mnist_from_assembled_copy(mnist_root: Path) -> None:
    d = load_dataset("mnist", data_dir=mnist_root)
    info = d.info
    assert (info.train_size, info.test_size) == (60000, 10000)
    assert d.train_images.shape == (60000, 1, 28, 28) and d.train_images.dtype == torch.uint8
    assert d.test_labels.dtype == torch.int64
    assert torch.bincount(d.test_labels).tolist() == MNIST_TEST_BINCOUNT
    assert (info.num_classes, info.in_chans, info.img_size) == (10, 1, 28)
    assert info.mean == (0.1307,) and info.std == (0.3081,)
    assert str(mnist_root) in info.source
    assert d.train_labels[0] == 5 and d.test_labels[0] == 7  # first labels of the official files
    # the published constants are the train split's actual statistics
    assert (d.train_images.float().mean() / 255).item() == pytest.approx(0.1307, abs=1e-4)
    small = load_dataset("mnist", data_dir=mnist_root, limit=100)
    assert small.train_images.shape == (100, 1, 28, 28) and torch.equal(small.test_labels, d.test_labels[:100])


def test_mnist_from_env(mnist_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDBENCH_DATA", str(mnist_root))
    assert load_dataset("MNIST", limit=10).info.test_size == 10


def test_fashion_mnist(fashion_root: Path) -> None:
    d = load_dataset("fashion_mnist", data_dir=fashion_root)
    assert (d.info.train_size, d.info.test_size) == (60000, 10000)
    assert d.train_images.shape == (60000, 1, 28, 28)
    assert torch.bincount(d.train_labels).tolist() == [6000] * 10
    assert torch.bincount(d.test_labels).tolist() == [1000] * 10
    assert d.info.classes[0] == "T-shirt/top" and d.info.mean == (0.2860,)
    assert d.train_labels[0] == 9 and d.test_labels[0] == 9


# ----------------------------------------------------------------------------- errors


def test_missing_mnist_error(tmp_path: Path) -> None:
    with pytest.raises(KdbenchError) as e:
        load_dataset("mnist", data_dir=tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "from --data-dir" in msg
    assert "--download" in msg and "--data-dir" in msg and "KDBENCH_DATA" in msg
    assert "MNIST/raw/train-images-idx3-ubyte" in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_missing_mnist_gz_hint(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(KdbenchError, match="extracted file"):
        load_dataset("mnist", data_dir=tmp_path)


def test_missing_cifar100_error_names_origin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDBENCH_DATA", str(tmp_path))
    with pytest.raises(KdbenchError) as e:
        load_dataset("cifar100")
    msg = str(e.value)
    assert str(tmp_path / "cifar-100-python") in msg and "from KDBENCH_DATA" in msg
    assert "--download" in msg and "--data-dir" in msg


def test_download_failure_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision import datasets

    def offline(self: object) -> None:  # what torchvision raises when every mirror fails
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried http://m/, got:\nno network\n")

    monkeypatch.setattr(datasets.MNIST, "download", offline)
    with pytest.raises(KdbenchError, match="could not download dataset 'mnist'") as e:
        load_dataset("mnist", data_dir=tmp_path / "new", download=True)
    msg = str(e.value)
    assert "no network" in msg and "needs internet" in msg and "--data-dir" in msg
    assert (tmp_path / "new").is_dir()  # --download creates the data folder


def test_unknown_dataset() -> None:
    with pytest.raises(KdbenchError, match="did you mean 'mnist'"):
        load_dataset("mnsit")


# ----------------------------------------------------------------------------- ImageFolder


def _make_imagefolder(root: Path, splits: dict[str, list[str]], n: int = 3) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, classes in splits.items():
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                size = (40, 20) if i == 0 else (16, 16)  # a non-square one exercises resize + crop
                arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / cls / f"{i}.png")
    return root


def test_imagefolder_loads(tmp_path: Path) -> None:
    root = _make_imagefolder(tmp_path / "tiny", {"train": ["cat", "dog"], "val": ["cat", "dog"]})
    d = load_dataset(str(root), image_size=8)
    assert d.info.name == f"imagefolder:{root}"
    assert d.info.classes == ("cat", "dog") and d.info.num_classes == 2 and d.info.in_chans == 3
    assert d.train_images.shape == (6, 3, 8, 8) and d.test_images.shape == (6, 3, 8, 8)
    assert d.train_images.dtype == torch.uint8
    assert d.train_labels.tolist() == [0, 0, 0, 1, 1, 1]
    x = d.train_images.double() / 255
    assert d.info.mean == pytest.approx(x.mean(dim=(0, 2, 3)).tolist(), abs=1e-12)
    assert d.info.std == pytest.approx(x.std(dim=(0, 2, 3), correction=0).tolist(), abs=1e-12)
    again = load_dataset(f"imagefolder:{root}", limit=2)
    assert again.train_images.shape == (2, 3, 32, 32)  # default image_size


def test_imagefolder_mismatched_classes(tmp_path: Path) -> None:
    root = _make_imagefolder(tmp_path / "bad", {"train": ["cat", "dog"], "test": ["cat", "fox"]})
    with pytest.raises(KdbenchError, match="class folders differ") as e:
        load_dataset(str(root))
    assert "fox" in str(e.value) and "dog" in str(e.value)


def test_imagefolder_missing_split(tmp_path: Path) -> None:
    root = _make_imagefolder(tmp_path / "half", {"train": ["a", "b"]})
    with pytest.raises(KdbenchError, match="val/"):
        load_dataset(str(root))
    with pytest.raises(KdbenchError, match="does not exist"):
        load_dataset(str(tmp_path / "nowhere"))
