"""ImageFolder sets (issue 12, item 5, the memory path): decoded once and kept on disk, refused before decoding when
they would not fit in memory, and read from ILSVRC's flat val/ layout with a labels file."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from test_data import _make_imagefolder

from kdbench.data import decoded, imagefolder, load_dataset
from kdbench.errors import KdbenchError


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "decoded"
    monkeypatch.setenv("KDBENCH_DECODE_CACHE", str(folder))
    return folder


def _count_decodes(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = imagefolder._decode

    def counting(samples, res):
        calls.append(len(samples))
        return real(samples, res)

    monkeypatch.setattr(imagefolder, "_decode", counting)
    return calls


def test_a_rerun_loads_the_decoded_images_instead_of_decoding(tmp_path, cache, monkeypatch):
    root = _make_imagefolder(tmp_path / "f", {"train": ["a", "b"], "val": ["a", "b"]})
    calls = _count_decodes(monkeypatch)
    first = load_dataset(str(root), image_size=16)
    assert calls == [6, 6] and len(list(cache.glob("*.pt"))) == 1 and not list(cache.glob("*.building"))
    again = load_dataset(str(root), image_size=16)
    assert calls == [6, 6]  # nothing decoded the second time
    assert torch.equal(first.train_images, again.train_images) and torch.equal(first.test_labels, again.test_labels)
    load_dataset(str(root), image_size=12)  # another resolution is another entry
    assert calls == [6, 6, 6, 6] and len(list(cache.glob("*.pt"))) == 2
    image = root / "train" / "a" / "1.png"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))  # an edited image
    load_dataset(str(root), image_size=16)
    assert calls == [6, 6, 6, 6, 6, 6]


def test_the_cache_can_be_turned_off(tmp_path, monkeypatch):
    root = _make_imagefolder(tmp_path / "f", {"train": ["a", "b"], "val": ["a", "b"]})
    monkeypatch.setenv("KDBENCH_DECODE_CACHE", "off")
    calls = _count_decodes(monkeypatch)
    load_dataset(str(root), image_size=8)
    load_dataset(str(root), image_size=8)
    assert calls == [6, 6, 6, 6]


def test_another_rank_loads_rank_0s_entry(tmp_path, cache, monkeypatch):
    root = _make_imagefolder(tmp_path / "f", {"train": ["a", "b"], "val": ["a", "b"]})
    load_dataset(str(root), image_size=8)  # rank 0's
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    calls = _count_decodes(monkeypatch)
    assert load_dataset(str(root), image_size=8).train_images.shape == (6, 3, 8, 8) and calls == []
    # with no entry and no rank 0 decoding it, a rank stops with an error rather than waiting for ever
    monkeypatch.setattr(decoded, "START_S", 0.0)
    monkeypatch.setattr(decoded, "POLL_S", 0.01)
    with pytest.raises(KdbenchError, match="rank 0 is not decoding it"):
        load_dataset(str(root), image_size=10)
    assert calls == []


def test_a_set_too_big_for_memory_is_refused_before_decoding(tmp_path, cache, monkeypatch):
    root = _make_imagefolder(tmp_path / "f", {"train": ["a", "b"], "val": ["a", "b"]})
    monkeypatch.setattr(imagefolder, "available_memory", lambda: 10_000)
    calls = _count_decodes(monkeypatch)
    with pytest.raises(KdbenchError) as exc:
        load_dataset(str(root), image_size=224)
    # 12 images × 3 × 224² bytes = 1.8 MB against 80% of 10 kB
    assert "12 images at 224 px decode to 0.0 GiB" in str(exc.value) and "--limit N" in str(exc.value)
    assert calls == []


def _flat(tmp_path: Path) -> tuple[Path, list[tuple[str, str]]]:
    """train/ with class folders; val/ with the same images flat."""
    root = _make_imagefolder(tmp_path / "flat", {"train": ["cat", "dog"], "val": ["cat", "dog"]}, n=2)
    labels = []
    for cls in ("cat", "dog"):
        for p in sorted((root / "val" / cls).iterdir()):
            name = f"{cls}_{p.name}"
            shutil.move(p, root / "val" / name)
            labels.append((name, cls))
        (root / "val" / cls).rmdir()
    return root, labels


def test_a_flat_val_folder_reads_its_labels_file(tmp_path, cache):
    root, labels = _flat(tmp_path)
    nested = _make_imagefolder(tmp_path / "nested", {"train": ["cat", "dog"], "val": ["cat", "dog"]}, n=2)
    with pytest.raises(KdbenchError, match="no class folders, and no labels file"):
        load_dataset(str(root), image_size=8)
    (root / "val_labels.txt").write_text("".join(f"{n} {c}\n" for n, c in labels))
    flat = load_dataset(str(root), image_size=8)
    want = load_dataset(str(nested), image_size=8)  # the same images in class folders
    assert torch.equal(flat.test_labels, want.test_labels) and torch.equal(flat.test_images, want.test_images)
    (root / "val_labels.txt").unlink()
    (root / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n" + "".join(f"{Path(n).stem},{c} 1 2 3 4\n" for n, c in labels))
    assert torch.equal(load_dataset(str(root), image_size=8).test_labels, want.test_labels)


@pytest.mark.parametrize("lines, message", [
    (["x.png cat"], "image 'x.png' is not in"),
    (["cat_0.png fox"], "class 'fox' is no class folder of train/"),
    (["cat_0.png cat dog"], "is not '<file name> <class folder name>'"),
    (["cat_0.png cat"], "labels 1 images but"),
])
def test_a_wrong_labels_file_is_named(tmp_path, cache, lines, message):
    root, _ = _flat(tmp_path)
    (root / "val_labels.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(KdbenchError, match=message):
        load_dataset(str(root), image_size=8)


def test_an_unchanged_folder_is_listed_once(tmp_path, monkeypatch):
    # --data-backend auto scans to choose the backend and the loader scans again: the second is answered from
    # memory, unless an image or a labels file came or went in between.
    root = _make_imagefolder(tmp_path / "f", {"train": ["a", "b"], "val": ["a", "b"]})
    listed: list[str] = []
    real = imagefolder._scan

    def counting(split_dir, limit, classes=None):
        listed.append(split_dir.name)
        return real(split_dir, limit, classes)

    monkeypatch.setattr(imagefolder, "_scan", counting)
    first = imagefolder.scan_folder(root, None)
    assert imagefolder.scan_folder(root, None) == first and listed == ["train", "val"]
    imagefolder.scan_folder(root, 2)  # another limit is another listing
    assert listed == ["train", "val"] * 2
    shutil.copy(root / "train" / "a" / "1.png", root / "train" / "a" / "9.png")
    added = imagefolder.scan_folder(root, None)
    assert listed == ["train", "val"] * 3 and len(added.train) == len(first.train) + 1
    flat, labels = _flat(tmp_path)
    (flat / "val_labels.txt").write_text("".join(f"{n} {c}\n" for n, c in labels))
    before = imagefolder.scan_folder(flat, None).test
    (flat / "val_labels.txt").write_text("".join(f"{n} {'dog' if c == 'cat' else 'cat'}\n" for n, c in labels))
    after = imagefolder.scan_folder(flat, None).test
    assert [t for _, t in after] == [1 - t for _, t in before]  # the edited labels file was read again
