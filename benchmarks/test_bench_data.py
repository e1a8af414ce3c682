"""The in-memory loader (batched tensor augmentation) against torchvision's per-sample pipeline.

Both produce the same thing per epoch: every training image once, randomly cropped with zero
padding and normalised. Timed side by side in one process, alternating, median of repeats; the
ratio is printed. Real data: the embedded digits set, and MNIST where ../shared/data exists.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils.data import DataLoader, TensorDataset
from torchvision.transforms import v2

from kdbench.data import DataSplits, Loader, load_dataset


def torchvision_epoch(data: DataSplits, batch_size: int, padding: int) -> int:
    info = data.info
    tf = v2.Compose([v2.RandomCrop(info.img_size, padding=padding), v2.ToDtype(torch.float32, scale=True),
                     v2.Normalize(info.mean, info.std)])

    class Augmented(TensorDataset):
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return tf(x), y

    loader = DataLoader(Augmented(data.train_images, data.train_labels), batch_size=batch_size, shuffle=True)
    return sum(len(y) for _, y in loader)


def kdbench_epoch(data: DataSplits, batch_size: int, padding: int) -> int:
    loader = Loader(data.train_images, data.train_labels, data.info, batch_size=batch_size, shuffle=True,
                    generator=torch.Generator().manual_seed(0), crop_padding=padding)
    return sum(len(y) for _, y in loader)


def side_by_side(data: DataSplits, padding: int, repeats: int = 3) -> float:
    times: dict[str, list[float]] = {"torchvision": [], "kdbench": []}
    for _ in range(repeats):
        for name, epoch in (("torchvision", torchvision_epoch), ("kdbench", kdbench_epoch)):
            t0 = time.perf_counter()
            assert epoch(data, 64, padding) == len(data.train_labels)
            times[name].append(time.perf_counter() - t0)
    return statistics.median(times["torchvision"]) / statistics.median(times["kdbench"])


def test_loader_vs_torchvision_digits():
    ratio = side_by_side(load_dataset("digits"), padding=1)
    print(f"\ndigits epoch, torchvision per-sample pipeline / kdbench in-memory loader: {ratio:.1f}x")
    assert ratio > 1.0


def test_loader_vs_torchvision_mnist(mnist_root):
    ratio = side_by_side(load_dataset("mnist", data_dir=mnist_root), padding=2, repeats=1)
    print(f"\nMNIST epoch (60,000 images), torchvision per-sample pipeline / kdbench in-memory loader: {ratio:.1f}x")
    assert ratio > 1.0
