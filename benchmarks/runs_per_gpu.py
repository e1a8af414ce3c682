"""How many runs per hour one device gives when K runs share it (``--runs-per-gpu K``).

Each K trains the same N student runs (seeds 0..N-1 of one pair and method, sharing one teacher
trained beforehand, so only student training is timed) with ``kdbench run``: on a GPU with
``--gpus all --runs-per-gpu K`` (K worker processes per GPU), on the CPU with ``--workers K``.
The configurations alternate over ``--rounds``; the median wall time of each gives runs per hour.
Results go to ``--out`` as JSON and markdown, with the command and provenance.

    python benchmarks/runs_per_gpu.py --device cuda --runs 8 --packing 1,2,4,8
    python benchmarks/runs_per_gpu.py --device cpu --runs 2 --packing 1,2 --epochs 1   # smoke
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kdbench import provenance
import torch

from kdbench.files import atomic_write_bytes


def _kdbench(args: list[str]) -> float:
    """Run ``kdbench`` in a subprocess (as users do); its wall time in seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "kdbench", *args], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"runs_per_gpu: `kdbench {' '.join(args)}` failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--pair", default=None, help="TEACHER:STUDENT (default: cifar_resnet32x4:cifar_resnet8x4 on "
                                                 "CUDA, cifar_resnet14:cifar_resnet8 on the CPU)")
    ap.add_argument("--method", default="kd")
    ap.add_argument("--dataset", default="synthetic:cifar100",
                    help="default synthetic:cifar100 (CIFAR-100-shaped random images: speed does not depend on "
                         "content); cifar100 with --data-dir for the real set")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--runs", type=int, default=8, help="student runs per configuration (seeds 0..N-1)")
    ap.add_argument("--packing", default="1,2,4,8", help="comma-separated K values")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--limit", type=int, default=0, help="training images (0: all)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--teacher-cache", default="on", choices=["auto", "on", "off"])
    ap.add_argument("--out", type=Path, default=Path("results/perf"))
    args = ap.parse_args(argv)
    packing = [int(k) for k in args.packing.split(",")]
    if min(packing) < 1 or args.runs < 1:
        ap.error("--packing values and --runs must be at least 1")
    pair = args.pair or ("cifar_resnet32x4:cifar_resnet8x4" if args.device == "cuda"
                         else "cifar_resnet14:cifar_resnet8")
    common = ["run", "--pairs", pair, "--dataset", args.dataset, "--epochs", str(args.epochs), "--device",
              args.device, "--teacher-cache", args.teacher_cache, "-q", "--no-report", "--throughput-batch", "64"]
    common += ["--limit", str(args.limit)] if args.limit else []
    common += ["--data-dir", args.data_dir] if args.data_dir else []
    seeds = ",".join(str(s) for s in range(args.runs))
    work = Path(tempfile.mkdtemp(prefix="kdbench-packing-"))
    try:
        # One teacher per seed is kdbench's protocol; train them (and their caches) once, untimed.
        base = work / "base"
        _kdbench([*common, "--methods", args.method, "--seeds", seeds, "--results-dir", str(base)])
        for f in (base / "runs").glob("*.json"):
            if json.loads(f.read_text())["kind"] != "teacher":
                f.unlink()
        walls: dict[int, list[float]] = {k: [] for k in packing}
        for r in range(args.rounds):
            for k in packing:
                res = work / f"k{k}-r{r}"
                shutil.copytree(base, res)
                spread = ["--gpus", "all", "--runs-per-gpu", str(k)] if args.device == "cuda" else ["--workers", str(k)]
                walls[k].append(_kdbench([*common, "--methods", args.method, "--seeds", seeds, *spread,
                                          "--results-dir", str(res)]))
                print(f"round {r}: K={k}: {args.runs} runs in {walls[k][-1]:.1f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = [{"runs_per_device": k, "wall_s": statistics.median(w), "runs_per_hour": args.runs * 3600 / statistics.median(w),
              "walls_s": w} for k, w in walls.items()]
    best = max(table, key=lambda t: t["runs_per_hour"])
    command = " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv])
    lines = [f"# Runs per hour with K runs per {args.device} ({pair}, {args.method}, {args.epochs} epochs, "
             f"{args.runs} runs, dataset {args.dataset})", "", f"Command: `{command}`", "",
             "| K | wall (s, median) | runs/hour |", "|---|---|---|"]
    lines += [f"| {t['runs_per_device']} | {t['wall_s']:.1f} | {t['runs_per_hour']:.0f} |" for t in table]
    lines += ["", f"Most runs per hour: K = {best['runs_per_device']}. Wall time includes each worker's start-up "
                  "(data loading, compilation): a longer schedule amortises it."]
    print("\n".join(lines))
    stem = f"runs_per_gpu-{args.device}"
    prov = provenance.collect(torch.device(args.device))
    payload = {"command": command, "pair": pair, "method": args.method, "dataset": args.dataset,
               "epochs": args.epochs, "runs": args.runs, "teacher_cache": args.teacher_cache, "table": table,
               "provenance": prov}
    atomic_write_bytes(args.out / f"{stem}.json", (json.dumps(payload, indent=1, default=str) + "\n").encode())
    atomic_write_bytes(args.out / f"{stem}.md", ("\n".join(lines) + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
