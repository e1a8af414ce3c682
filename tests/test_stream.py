"""The streaming backend (issue 12, items 5 and 8): an ImageFolder read from disk by timm's transforms in DataLoader
workers gives the memory path's evaluation exactly, covers every image once an epoch, gives each torchrun rank a
disjoint shard, and is chosen by --data-backend (auto: when the decoded set would not fit)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from test_data import _make_imagefolder

from kdbench.cli import main
from kdbench.data import Loader, load_dataset
from kdbench.data.rrc import RRCSpec
from kdbench.data.stream import EpochSampler, StreamImages, stream_imagefolder
from kdbench.train import predict


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """3 classes, 5 images each per split, some not square (resize then centre-crop matters)."""
    return _make_imagefolder(tmp_path_factory.mktemp("s") / "imgs", {"train": ["a", "b", "c"], "val": ["a", "b", "c"]},
                             n=5)


@pytest.mark.parametrize("size, crop_pct, interpolation", [(16, 1.0, "bilinear"), (24, 0.875, "bicubic")])
def test_memory_and_stream_give_identical_eval_logits(folder, size, crop_pct, interpolation):
    memory = load_dataset(str(folder), image_size=size, crop_pct=crop_pct, interpolation=interpolation)
    stream = stream_imagefolder(folder, memory_resolution(size, crop_pct, interpolation), None, workers=1)
    assert stream.info.backend == "stream" and isinstance(stream.test_images, StreamImages)
    assert stream.info.mean == memory.info.mean and stream.info.std == memory.info.std  # all 15 images measured
    assert torch.equal(stream.test_labels, memory.test_labels) and stream.info.classes == memory.info.classes
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=3).eval()
    assert torch.equal(predict(model, stream.test_images, stream), predict(model, memory.test_images, memory))


def memory_resolution(size: int, crop_pct: float, interpolation: str):
    from kdbench.data.resolution import Resolution

    return Resolution(size, crop_pct, interpolation)


@pytest.mark.parametrize("rrc", [None, RRCSpec((0.08, 1.0), (3 / 4, 4 / 3))])
def test_an_epoch_covers_every_image_once_with_its_label(folder, rrc):
    data = stream_imagefolder(folder, memory_resolution(16, 1.0, "bilinear"), None, workers=0)
    loader = Loader(data.train_images, data.train_labels, data.info, batch_size=4, shuffle=True,
                    generator=torch.Generator().manual_seed(3), crop_padding=2, flip=True, rrc=rrc, shard=True)
    seen, orders = [], []
    for _ in range(2):
        batches = list(loader.batches())
        positions = torch.cat([b.index for b in batches])
        orders.append(positions.tolist())
        seen.append(sorted(positions.tolist()))
        for b in batches:
            assert b.images.shape[1:] == (3, 16, 16) and b.images.dtype == torch.float32 and not b.sharded
            assert torch.equal(b.labels, data.train_labels[b.index])
    assert seen == [list(range(15))] * 2 and orders[0] != orders[1]  # every image once; a new order each epoch
    again = Loader(data.train_images, data.train_labels, data.info, batch_size=4, shuffle=True,
                   generator=torch.Generator().manual_seed(3), crop_padding=2, flip=True, rrc=rrc)
    assert torch.cat([b.index for b in again.batches()]).tolist() == orders[0]  # the seed's order


def test_views_of_streamed_images_are_subsets(folder):
    data = stream_imagefolder(folder, memory_resolution(8, 1.0, "bilinear"), None, workers=0)
    keep = data.train_labels != 1
    part = data.train_images[keep]
    assert len(part) == 10 and part.shape == (10, 3, 8, 8)
    assert [label for _, label in part.files()] == data.train_labels[keep].tolist()
    assert part[2:4].files() == part.files()[2:4]


def test_the_sampler_gives_each_rank_a_disjoint_shard():
    shards = []
    for rank in range(3):
        sampler = EpochSampler(10, shuffle=True, world=3, rank=rank)
        sampler.seed = 7
        shards.append(list(sampler))
    assert [len(s) for s in shards] == [4, 4, 4]  # padded to equal shares
    assert set().union(*map(set, shards)) == set(range(10))
    assert len(set(shards[0]) & set(shards[1])) + len(set(shards[1]) & set(shards[2])) <= 2  # only the padding


SHARDS = textwrap.dedent('''
    import json, sys, torch, torch.distributed as dist
    from pathlib import Path
    from kdbench.data import Loader
    from kdbench.data.resolution import Resolution
    from kdbench.data.stream import stream_imagefolder
    dist.init_process_group("gloo")
    data = stream_imagefolder(Path(sys.argv[1]), Resolution(8), None, workers=1)
    loader = Loader(data.train_images, data.train_labels, data.info, batch_size=4, shuffle=True,
                    generator=torch.Generator().manual_seed(5), shard=True)
    batches = list(loader.batches())
    out = {"positions": torch.cat([b.index for b in batches]).tolist(), "sizes": [len(b.index) for b in batches],
           "sharded": all(b.sharded for b in batches)}
    Path(sys.argv[2], f"rank{dist.get_rank()}.json").write_text(json.dumps(out))
    dist.destroy_process_group()
''')


def test_under_gloo_ddp_each_rank_reads_its_own_shard(folder, tmp_path):
    script = tmp_path / "shards.py"
    script.write_text(SHARDS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(script),
           str(folder), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    a, b = (set(r["positions"]) for r in ranks)
    assert all(r["sharded"] for r in ranks) and [r["sizes"] for r in ranks] == [[2, 2, 2, 2]] * 2
    assert len(a | b) == 15 and len(a & b) <= 1  # 15 images in shares of 8: one image read twice, as padding


def test_a_torchrun_sweep_streams_with_two_ranks(folder, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "kdbench", "run",
           "--device", "cpu", "--dataset", str(folder), "--data-backend", "stream", "--loader-workers", "1",
           "--image-size", "16", "--pairs", "resnet10t:resnet10t", "--methods", "kd", "--epochs", "1", "--seeds", "0",
           "--throughput-batch", "4", "-q", "--no-report", "--results-dir", str(tmp_path / "r")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(p.read_text()) for p in (tmp_path / "r" / "runs").glob("*.json")]
    assert {(r["kind"], r["data_backend"], r["world_size"]) for r in rows} == {("teacher", "stream", 2),
                                                                                ("student", "stream", 2)}
    assert all(r["dataset"].endswith("~16px/stream") for r in rows)


def test_the_backend_is_chosen_and_recorded(folder, tmp_path, monkeypatch, capsys):
    from kdbench.data import imagefolder

    args = ["run", "--dataset", str(folder), "--image-size", "16", "--pairs", "resnet10t:resnet10t", "--methods", "kd",
            "--epochs", "1", "--seeds", "0", "--throughput-batch", "4", "-q", "--no-report"]
    assert main([*args, "--results-dir", str(tmp_path / "a")]) == 0  # auto: 30 small images fit in memory
    backends = {json.loads(p.read_text())["data_backend"] for p in (tmp_path / "a" / "runs").glob("*.json")}
    assert backends == {"memory"}
    monkeypatch.setattr(imagefolder, "available_memory", lambda: 20_000)  # 30 × 3 × 16² = 23 kB would not fit
    monkeypatch.setattr("kdbench.sweep.driver.available_memory", lambda: 20_000)
    assert main([*args, "--results-dir", str(tmp_path / "b")]) == 0
    assert "more than fits in memory here: streaming them from disk" in capsys.readouterr().err
    backends = {json.loads(p.read_text())["data_backend"] for p in (tmp_path / "b" / "runs").glob("*.json")}
    assert backends == {"stream"}
    assert main([*args, "--data-backend", "memory", "--results-dir", str(tmp_path / "c")]) == 2
    assert "--data-backend stream" in capsys.readouterr().err  # the memory check names the other backend


def test_only_imagefolders_stream(capsys):
    assert main(["run", "--data-backend", "stream", "--methods", "kd", "--epochs", "1", "-q"]) == 2
    assert "--data-backend stream reads ImageFolder datasets" in capsys.readouterr().err


def _tar_dataset(folder: Path, root: Path) -> Path:
    """``folder``'s splits as train.tar and val.tar, class folders inside (timm's ReaderImageInTar layout)."""
    import tarfile

    root.mkdir()
    for split in ("train", "val"):
        with tarfile.open(root / f"{split}.tar", "w") as tar:
            for path in sorted((folder / split).rglob("*.png")):
                tar.add(path, arcname=str(path.relative_to(folder / split)))
    return root


def test_a_tar_dataset_streams_through_timms_tar_reader(folder, tmp_path):
    tars = _tar_dataset(folder, tmp_path / "tars")
    res = memory_resolution(16, 0.875, "bilinear")
    from_tar = stream_imagefolder(tars, res, None, workers=1)
    from_files = stream_imagefolder(folder, res, None, workers=1)
    assert from_tar.info.classes == from_files.info.classes and "ReaderImageInTar" in from_tar.info.source
    # the same images, read from the tars by the workers: the same sorted labels and the same logits
    order = torch.argsort(from_tar.test_labels, stable=True)
    assert torch.equal(from_tar.test_labels[order], from_files.test_labels)
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=3).eval()
    tar_logits, file_logits = predict(model, from_tar.test_images, from_tar), predict(model, from_files.test_images,
                                                                                      from_files)
    assert sorted(tar_logits.sum(1).tolist()) == pytest.approx(sorted(file_logits.sum(1).tolist()), abs=1e-5)
    loader = Loader(from_tar.train_images, from_tar.train_labels, from_tar.info, batch_size=4, shuffle=True,
                    generator=torch.Generator().manual_seed(0), flip=True, rrc=RRCSpec((0.5, 1.0), (1.0, 1.0)))
    assert sorted(torch.cat([b.index for b in loader.batches()]).tolist()) == list(range(15))


def test_a_tar_dataset_runs_and_refuses_the_memory_backend(folder, tmp_path, capsys):
    tars = _tar_dataset(folder, tmp_path / "tars")
    args = ["run", "--dataset", str(tars), "--image-size", "16", "--pairs", "resnet10t:resnet10t", "--methods", "kd",
            "--epochs", "1", "--seeds", "0", "--throughput-batch", "4", "-q", "--no-report"]
    assert main([*args, "--results-dir", str(tmp_path / "r")]) == 0
    assert {json.loads(p.read_text())["data_backend"] for p in (tmp_path / "r" / "runs").glob("*.json")} == {"stream"}
    assert main([*args, "--data-backend", "memory", "--results-dir", str(tmp_path / "m")]) == 2
    assert "holds its images in tar files, which kdbench streams" in capsys.readouterr().err


def test_streamed_runs_in_a_worker_pool(folder, tmp_path):
    """--workers N ran each worker as a daemonic process, in which a DataLoader may not start its own workers: every
    streamed run failed with 'daemonic processes are not allowed to have children'."""
    assert main(["run", "--dataset", str(folder), "--image-size", "16", "--pairs", "resnet10t:resnet10t", "--methods",
                 "ce,kd", "--epochs", "1", "--seeds", "0", "--data-backend", "stream", "--loader-workers", "1",
                 "--workers", "2", "--throughput-batch", "4", "-q", "--no-report", "--results-dir",
                 str(tmp_path / "r")]) == 0
    rows = [json.loads(p.read_text()) for p in (tmp_path / "r" / "runs").glob("*.json")]
    assert len(rows) == 3 and {r["status"] for r in rows} == {"ok"} and {r["data_backend"] for r in rows} == {"stream"}
