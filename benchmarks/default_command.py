"""How long a newcomer's first command takes: `kdbench run --methods all` on the embedded default.

Wall time depends on the machine as much as on kdbench (two "2-core AMD EPYC" VMs here differ by
about 3x), so the command is timed against a fixed reference workload timed in the same process,
before and after it: 40 SGD steps of CRD's ResNet-20 (``cifar_resnet20``) on random 64 x 3 x 32 x
32 batches, fp32, eager, on the same device. The result is the command's wall time in units of that
workload ("reference units"): a slow machine slows both, a slower kdbench only the command.
Reference units on a machine that ran the command in under 5 minutes give the budget for others.

    python benchmarks/default_command.py                   # writes results/perf/default_command-<device>.json/.md
    python benchmarks/default_command.py --out /tmp/x -- --limit 64 --epochs 1   # a smoke run, labelled so

The command runs in a fresh results folder (nothing resumed), as a subprocess, exactly as a user
types it (``python -m kdbench run --methods all``), with ``--quiet``; extra arguments after ``--``
are passed on to it.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kdbench import metrics, provenance, zoo
from kdbench.files import atomic_write

REFERENCE_MODEL, REFERENCE_STEPS, REFERENCE_BATCH = "cifar_resnet20", 40, 64
COMMAND = ["run", "--methods", "all", "--quiet"]
BUDGET_S = 300  # the README's promise: under 5 minutes on 2 cores


def reference_seconds(device: torch.device, repeats: int = 3) -> list[float]:
    """Seconds of the fixed reference workload, once per repeat (after one warm-up step)."""
    torch.manual_seed(0)
    model = zoo.create(REFERENCE_MODEL, num_classes=100, in_chans=3, img_size=32).to(device)
    x = torch.randn(REFERENCE_BATCH, 3, 32, 32, device=device)
    y = torch.randint(0, 100, (REFERENCE_BATCH,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if device.type == "cpu":
        torch.set_flush_denormal(True)  # as kdbench's engine trains
    seconds, _ = metrics.seconds_per_call(step, device, warmup=1, repeats=repeats)
    return [s * REFERENCE_STEPS for s in seconds]


def run_command(extra: list[str]) -> tuple[float, str, int]:
    """(wall seconds, the command as typed, exit code) of the default command in a fresh folder."""
    with tempfile.TemporaryDirectory(prefix="kdbench-default-") as tmp:
        argv = [sys.executable, "-m", "kdbench", *COMMAND, *extra, "--results-dir", tmp]
        start = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True)
        wall = time.perf_counter() - start
        runs = len(list((Path(tmp) / "runs").glob("*.json")))
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
    typed = "kdbench " + shlex.join([*COMMAND, *extra])
    return wall, typed, runs if proc.returncode == 0 else -proc.returncode - 1000


def measure(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cpu")  # the default command's device on a machine without GPU
    before = reference_seconds(device, args.reference_repeats)
    wall, typed, runs = run_command(args.extra)
    if runs < 0:
        raise SystemExit(f"default_command: `{typed}` failed; nothing written")
    after = reference_seconds(device, args.reference_repeats)
    ref = statistics.median(before + after)
    prov = provenance.collect(device)
    shortened = bool(args.extra)
    return {
        "benchmark": "default_command",
        "command_timed": typed, "wall_s": wall, "rows_written": runs,
        "reference_workload": f"{REFERENCE_STEPS} SGD steps of {REFERENCE_MODEL}, batch {REFERENCE_BATCH}x3x32x32, "
                              "fp32 eager, random data",
        "reference_s": {"before": before, "after": after, "median": ref},
        "reference_units": wall / ref,
        "budget_s": BUDGET_S, "within_budget_here": wall <= BUDGET_S,
        "shortened": shortened,
        "device": prov["device"], "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "timm": prov["timm_version"], "python": platform.python_version()},
        "command": "python " + shlex.join(sys.argv), "git_commit": prov["git_commit"], "time": provenance.now(),
    }


def write(out: Path, report: dict[str, Any]) -> list[Path]:
    stem = "default_command-cpu" + ("-smoke" if report["shortened"] else "")
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    r = report
    label = " (extra arguments: NOT the default command's full schedule)" if r["shortened"] else ""
    md = [
        f"# The default command's time{label}", "",
        f"`{r['command_timed']}` on {r['device']}: **{r['wall_s']:.1f} s** wall, {r['rows_written']} rows "
        f"(budget {r['budget_s']} s: {'within' if r['within_budget_here'] else 'OVER'}).", "",
        f"Reference workload ({r['reference_workload']}), timed in the same process before and after: "
        f"median {r['reference_s']['median']:.2f} s (before {', '.join(f'{s:.2f}' for s in r['reference_s']['before'])}"
        f"; after {', '.join(f'{s:.2f}' for s in r['reference_s']['after'])}).", "",
        f"**{r['reference_units']:.0f} reference units.** A machine {BUDGET_S / r['wall_s']:.1f}x slower than this one "
        f"at the reference workload would still finish within {r['budget_s']} s.",
        "",
        f"torch {r['versions']['torch']}, timm {r['versions']['timm']}, {r['threads']} threads; commit "
        f"`{r['git_commit']}`; {r['time']}.", "",
        "Produced by:", "", "```sh", r["command"], "```", "",
    ]
    atomic_write(json_path, lambda tmp: tmp.write_text(json.dumps(r, indent=2) + "\n"))
    atomic_write(md_path, lambda tmp: tmp.write_text("\n".join(md)))
    return [json_path, md_path]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results" / "perf",
                        help="where the JSON and markdown go (default: results/perf)")
    parser.add_argument("--reference-repeats", type=int, default=3, metavar="N",
                        help="times the reference workload is timed before and after the command (default 3)")
    parser.add_argument("extra", nargs="*", help="arguments passed on to the command after `--` "
                        "(e.g. -- --limit 64 --epochs 1 for a smoke run; the outputs are then labelled)")
    args = parser.parse_args(argv)
    report = measure(args)
    for path in write(args.out, report):
        print(f"wrote {path}")
    print(f"default command: {report['wall_s']:.1f} s = {report['reference_units']:.0f} reference units "
          f"(reference workload median {report['reference_s']['median']:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
