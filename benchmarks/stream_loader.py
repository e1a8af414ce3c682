"""Does streaming cost kdbench anything over timm's own loader? Images/s of kdbench's streaming path against
``timm.data.create_loader``, side by side in one process (issue 12, item 9: the target is at least 0.95x).

Both read the same ImageFolder of JPEGs with the same work per image: RandomResizedCrop (scale 0.08-1, ratio
3/4-4/3) to the same size, a horizontal flip, no colour jitter, decoded in the same number of DataLoader worker
processes, collated as uint8 and normalised to float on the device (timm's ``use_prefetcher`` path; kdbench's
batches), in batches of the same size. The two loaders' epochs alternate, after one warm-up epoch each (workers
started, files in the page cache), and each side's figure is the median over the rounds.

    python benchmarks/stream_loader.py                           # writes results/perf/stream_loader-<device>.json/.md
    python benchmarks/stream_loader.py --images 200 --rounds 1 --out /tmp/x   # a smoke run, labelled so

Without ``--data DIR`` it writes a synthetic ImageFolder of ``--images`` JPEGs (smooth colour fields with noise,
320 x 256, quality 90: real JPEG decoding, not real photographs) into a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdbench import metrics, provenance
from kdbench.data import Loader
from kdbench.data.resolution import Resolution
from kdbench.data.rrc import RRCSpec
from kdbench.data.stream import stream_imagefolder
from kdbench.files import atomic_write

TARGET = 0.95
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def write_folder(root: Path, n: int, classes: int = 10) -> Path:
    """``n`` JPEGs in ``classes`` class folders under train/ (and one image per class in val/)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:256, 0:320]
    for split, count in (("train", n), ("val", classes)):
        for i in range(count):
            folder = root / split / f"c{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            a, b, c = rng.uniform(0.005, 0.05, 3)
            field = np.stack([np.sin(a * xx + i), np.cos(b * yy), np.sin(c * (xx + yy))], -1) * 100 + 128
            image = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(folder / f"{i}.jpg", quality=90)
    return root


def kdbench_epoch(root: Path, args: argparse.Namespace, device: torch.device):
    """A function running one epoch of kdbench's streaming loader; returns images seen."""
    data = stream_imagefolder(root, Resolution(args.size), None, workers=args.workers).to(device)
    loader = Loader(data.train_images, data.train_labels, data.info, batch_size=args.batch, shuffle=True,
                    generator=torch.Generator(device=device).manual_seed(0), flip=True, rrc=RRCSpec(SCALE, RATIO))

    def epoch() -> int:
        n = 0
        for batch in loader.batches():
            n += len(batch.images)
        return n
    return epoch


def timm_epoch(root: Path, args: argparse.Namespace, device: torch.device):
    """The same with timm: create_dataset + create_loader (prefetcher: uint8 from the workers, normalised on the
    device)."""
    from timm.data import create_dataset, create_loader

    dataset = create_dataset("", root=str(root / "train"), is_training=True)
    loader = create_loader(dataset, input_size=(3, args.size, args.size), batch_size=args.batch, is_training=True,
                           scale=SCALE, ratio=RATIO, hflip=0.5, color_jitter=None, interpolation="bilinear",
                           num_workers=args.workers, device=device, use_prefetcher=True, persistent_workers=True,
                           pin_memory=device.type == "cuda")

    def epoch() -> int:
        n = 0
        for x, _ in loader:
            n += len(x)
        return n
    return epoch


def timed(epoch, device: torch.device) -> float:
    start = time.perf_counter()
    n = epoch()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - start)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data) if args.data else write_folder(Path(tmp) / "imgs", args.images)
        sides = {"kdbench": kdbench_epoch(root, args, device), "timm": timm_epoch(root, args, device)}
        for epoch in sides.values():  # warm-up: workers started, files cached
            epoch()
        rates: dict[str, list[float]] = {k: [] for k in sides}
        for _ in range(args.rounds):
            for name, epoch in sides.items():
                rates[name].append(timed(epoch, device))
    prov = provenance.collect(device)
    median = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "device": metrics.device_name(device), "images": args.images if not args.data else None, "data": args.data,
        "size": args.size, "batch": args.batch, "workers": args.workers, "rounds": args.rounds,
        "images_per_s": rates, "median_images_per_s": median, "ratio": median["kdbench"] / median["timm"],
        "target": TARGET, "smoke": args.rounds < 3 or (not args.data and args.images < 1000),
        "command": "python " + shlex.join(sys.argv), "git_commit": prov["git_commit"], "time": provenance.now(),
        "torch": torch.__version__, "timm": prov.get("timm_version", ""),
    }


def write(out: Path, r: dict[str, Any]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"stream_loader-{'cuda' if r['device'].startswith('cuda') else 'cpu'}"
    verdict = "meets" if r["ratio"] >= TARGET else "MISSES"
    md = [f"# Streaming loader against timm's create_loader{' (SMOKE RUN: too few images or rounds)' if r['smoke'] else ''}",
          "", f"- command: `{r['command']}`", f"- commit: `{r['git_commit']}`, {r['time']}",
          f"- device: {r['device']}; torch {r['torch']}, timm {r['timm']}",
          f"- data: {r['data'] or str(r['images']) + ' synthetic JPEGs, 320 x 256'}; RandomResizedCrop to "
          f"{r['size']} px + flip, batch {r['batch']}, {r['workers']} DataLoader workers each; "
          f"{r['rounds']} alternating rounds after a warm-up epoch each",
          "", "| loader | images/s (median) | each round |", "|---|---:|---|"]
    md += [f"| {k} | {r['median_images_per_s'][k]:.0f} | {', '.join(f'{x:.0f}' for x in v)} |"
           for k, v in r["images_per_s"].items()]
    md += ["", f"kdbench / timm = **{r['ratio']:.3f}**: {verdict} the target of {TARGET}x.", ""]
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    atomic_write(paths[0], lambda tmp: tmp.write_text(json.dumps(r, indent=2) + "\n"))
    atomic_write(paths[1], lambda tmp: tmp.write_text("\n".join(md)))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="an ImageFolder with train/ (default: synthetic JPEGs)")
    parser.add_argument("--images", type=int, default=2000, help="synthetic training images (default 2000)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for each loader (default 2)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results" / "perf"))
    args = parser.parse_args(argv)
    if args.images < 1 or args.rounds < 1 or args.workers < 0:
        parser.error("--images and --rounds must be at least 1, --workers at least 0")
    report = measure(args)
    for path in write(Path(args.out), report):
        print(path)
    print(f"kdbench {report['median_images_per_s']['kdbench']:.0f} images/s, timm "
          f"{report['median_images_per_s']['timm']:.0f}: ratio {report['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
