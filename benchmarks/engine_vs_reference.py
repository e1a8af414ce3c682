#!/usr/bin/env python
"""kdbench's training engine against an anchor-style KD loop, side by side in one process.

The *reference* arm is the loop the published KD codebases (CRD/RepDistiller, mdistiller) run: a
``Dataset`` that turns each uint8 image into a PIL image and applies torchvision's per-image
``RandomCrop(padding=4) -> RandomHorizontalFlip -> ToTensor -> Normalize`` in ``DataLoader`` worker
processes, fp32 eager models in NCHW, the teacher under ``torch.no_grad()``, and ``loss.item()``
plus an accuracy ``.item()`` every step (the host syncs of those loops' meters). It is written
here, in kdbench, and calls kdbench's own KD method, so both arms compute the same loss.

The *engine* arm is :func:`kdbench.train.train` over the same number of images (one epoch per
round) with :class:`~kdbench.train.EngineOptions` (by default the device's fast ones); its
``train_time_s`` excludes evaluation. The *engine + teacher cache* arm is the same with the
teacher's outputs looked up in a :class:`~kdbench.train.ViewCache`, whose one-off build is
timed separately (it is shared by every run that distils from the same teacher).

Rounds alternate between the arms (the order rotates every round) after one uncounted warm-up
round of each, and the medians are compared. The reference keeps its DataLoader workers alive
between rounds (``persistent_workers``) and warms up too, so its steady state is what is
measured: the most favourable case for the reference, i.e. conservative for the engine's claim.

    python benchmarks/engine_vs_reference.py                       # defaults for this machine
    python benchmarks/engine_vs_reference.py --dataset cifar100 --data-dir ~/data
    python benchmarks/engine_vs_reference.py --steps 2 --rounds 1 --workers 1 --out /tmp/perf
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

# Run from a checkout without installing: the kdbench next to this file is the one measured
# (and the one whose git commit the results record).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from torchvision import transforms  # noqa: E402

from kdbench import provenance, zoo
from kdbench.data import DatasetInfo, DataSplits, load_dataset, view_count  # noqa: E402
from kdbench.errors import KdbenchError  # noqa: E402
from kdbench.features import probe  # noqa: E402
from kdbench.method import Batch, Method, Outputs  # noqa: E402
from kdbench.metrics import device_name  # noqa: E402
from kdbench.recipe import Recipe  # noqa: E402
from kdbench.registry import build_method, load_methods  # noqa: E402
from kdbench.files import atomic_write  # noqa: E402
from kdbench.train import EngineOptions, ViewCache, build_view_cache, cacheable, train  # noqa: E402

BATCH = 64
METHOD = "kd"
# Evaluation is excluded from the engine's train_time_s, but it still costs wall time every
# round: a small test split keeps the benchmark short without touching what is timed.
TEST_IMAGES = 256
REFERENCE, ENGINE, CACHED = "reference", "engine", "engine + teacher cache"


@dataclass(frozen=True)
class Defaults:
    """What a plain invocation measures on one kind of device."""

    teacher: str
    student: str
    dataset: str
    steps: int
    rounds: int
    # The cache build runs the teacher over every augmented view (162 per CIFAR image): seconds
    # on a GPU, but minutes on a few CPU cores, longer than the rest of the benchmark.
    teacher_cache: bool


DEFAULTS: dict[str, Defaults] = {
    # The CRD benchmark's headline pair on CIFAR-100-shaped images.
    "cuda": Defaults("cifar_resnet32x4", "cifar_resnet8x4", "synthetic:cifar100", 200, 5, True),
    # A pair small enough for a few CPU cores to finish in a few minutes.
    "cpu": Defaults("cifar_resnet20", "cifar_resnet8", "synthetic:cifar100", 20, 3, False),
}

# Spec-sheet dense peaks (no sparsity), FLOP/s, keyed by a substring of the CUDA device name; the
# first match wins, so the more specific names come first. "H100" alone is the SXM part (its
# device name reads e.g. "NVIDIA H100 80GB HBM3"); the H200 has the H100 SXM's compute.
SPEC_PEAKS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    ("H200", {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12}),
    ("H100", {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12}),
    ("A100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
]


# ----------------------------------------------------------------------------- the reference arm


class AnchorDataset(Dataset):
    """uint8 images served the anchor way: one PIL image per item through a torchvision pipeline."""

    def __init__(self, images_nchw: Tensor, labels: Tensor, transform: Callable[[Image.Image], Tensor]) -> None:
        hwc = images_nchw.permute(0, 2, 3, 1).contiguous().numpy()
        # PIL takes H×W for a grey ("L") image and H×W×3 for RGB, as CIFAR's dataset stores it.
        self.images: np.ndarray = hwc[..., 0] if hwc.shape[-1] == 1 else hwc
        self.labels: list[int] = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        img = Image.fromarray(self.images[index])  # mode "L" or "RGB", from the array's shape
        return self.transform(img), self.labels[index]


def anchor_loader(data: DataSplits, recipe: Recipe, workers: int, device: torch.device) -> DataLoader:
    """The anchor codebases' DataLoader, over exactly the images the engine arms train on."""
    info = data.info
    steps: list[Any] = []
    if recipe.crop_padding:
        steps.append(transforms.RandomCrop(info.img_size, padding=recipe.crop_padding))
    if recipe.flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(info.mean, info.std)]
    dataset = AnchorDataset(data.train_images.cpu(), data.train_labels.cpu(), transforms.Compose(steps))
    return DataLoader(dataset, batch_size=recipe.batch_size, shuffle=True, num_workers=workers,
                      pin_memory=device.type == "cuda",
                      persistent_workers=workers > 0)  # DataLoader refuses persistence without workers


class Reference:
    """The anchor-style training loop; one :meth:`round` is one epoch over the loader."""

    def __init__(self, student: nn.Module, teacher: nn.Module, method: Method, recipe: Recipe,
                 loader: DataLoader, device: torch.device) -> None:
        self.student, self.teacher, self.method = student.to(device), teacher.to(device), method.to(device)
        self.loader, self.device = loader, device
        params = list(student.parameters()) + [p for p in method.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)

    def round(self) -> tuple[float, int]:
        """(seconds, images) of one epoch, including the loader's time to deliver every batch."""
        self.student.train()
        self.method.train()
        self.teacher.eval()
        epoch, epochs = 0, 1
        ce_weight = self.method.ce_weight_at(epoch, epochs)
        images_seen = 0
        synchronize(self.device)
        t0 = time.perf_counter()
        for images, labels in self.loader:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            with torch.no_grad():
                t_logits = self.teacher(images)
            logits = self.student(images)
            # The method is called exactly as kdbench.train calls it.
            batch = Batch(images, labels, epoch, epochs)
            terms = self.method(Outputs(logits=logits), [Outputs(logits=t_logits)], batch)
            loss = ce_weight * F.cross_entropy(logits, labels) + sum(terms.values())
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            # The anchors' meters: two host syncs per step.
            loss_value = loss.item()
            _top1 = (logits.argmax(1) == labels).float().mean().item()
            if not np.isfinite(loss_value):
                raise RuntimeError(f"reference loop: the loss became {loss_value}")
            images_seen += len(labels)
        synchronize(self.device)
        return time.perf_counter() - t0, images_seen


# ----------------------------------------------------------------------------- helpers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class BackendFlags:
    """Process-wide backend switches; each arm runs under its own (see :func:`run`)."""

    matmul_tf32: bool
    cudnn_tf32: bool
    cudnn_benchmark: bool
    float32_matmul_precision: str

    @classmethod
    def now(cls) -> BackendFlags:
        return cls(torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                   torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision())

    def apply(self) -> None:
        torch.backends.cuda.matmul.allow_tf32 = self.matmul_tf32
        torch.backends.cudnn.allow_tf32 = self.cudnn_tf32
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        torch.set_float32_matmul_precision(self.float32_matmul_precision)


@dataclass
class BenchData:
    """The training images of one round (``data``) and, when they repeat a smaller set, that set."""

    data: DataSplits
    distinct: DataSplits  # ``data`` itself when nothing repeats
    index: Tensor | None  # data's image i is distinct's image index[i]


def bench_data(name: str, data_dir: str | None, images: int) -> BenchData:
    """``images`` training images of ``name`` (the set repeated when it has fewer) and a small test split.

    Synthetic sets hold 512 training images; repeating them keeps the arms on the same images
    and the same count per round, and throughput does not depend on which images they are.
    """
    data = load_dataset(name, data_dir=data_dir, limit=images)
    test = min(TEST_IMAGES, len(data.test_labels))
    distinct = DataSplits(replace(data.info, test_size=test), data.train_images, data.train_labels,
                          data.test_images[:test], data.test_labels[:test])
    n = len(distinct.train_labels)
    if n >= images:
        return BenchData(distinct, distinct, None)
    index = torch.arange(images) % n
    info = replace(distinct.info, train_size=images)
    repeated = DataSplits(info, distinct.train_images[index], distinct.train_labels[index], distinct.test_images,
                          distinct.test_labels)
    return BenchData(repeated, distinct, index)


def step_flops(teacher: nn.Module, student: nn.Module, method: Method, shape: tuple[int, ...],
               num_classes: int) -> dict[str, int]:
    """FLOPs of one training step at batch 64, counted on the CPU in fp32 (a multiply-add is 2).

    Counted on copies, so the benchmarked models and their BatchNorm statistics are untouched.
    The count holds under bf16 and compilation too: they change how fast, not how much.
    """
    teacher, student = copy.deepcopy(teacher).cpu().eval(), copy.deepcopy(student).cpu().train()
    method = copy.deepcopy(method).cpu()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, *shape, generator=gen)
    y = torch.randint(0, num_classes, (BATCH,), generator=gen)
    with FlopCounterMode(display=False) as t_count, torch.no_grad():
        t_logits = teacher(x)
    with FlopCounterMode(display=False) as s_count:
        logits = student(x)
        terms = method(Outputs(logits=logits), [Outputs(logits=t_logits)], Batch(x, y, 0, 1))
        (F.cross_entropy(logits, y) + sum(terms.values())).backward()
    t, s = int(t_count.get_total_flops()), int(s_count.get_total_flops())
    return {"teacher_forward": t, "student_forward_backward": s, "step": t + s}


def measured_cpu_kernels(repeats: int = 5) -> dict[str, float]:
    """FLOP/s of two large fp32 kernels on the CPU with torch's current thread count (median of repeats).

    Both, because neither alone is the CPU's peak: on some CPUs (AMD's, with MKL) the matmul runs
    far below what oneDNN's convolutions reach, which would put a convnet step above "100%".
    """
    gen = torch.Generator().manual_seed(0)
    n = 2048
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    x, w = torch.randn(16, 512, 32, 32, generator=gen), torch.randn(512, 512, 3, 3, generator=gen)
    kernels: dict[str, tuple[Callable[[], Tensor], int]] = {
        f"matmul {n}x{n}": (lambda: a @ b, 2 * n**3),
        "conv 3x3 512->512 on 16x32x32": (lambda: F.conv2d(x, w, padding=1), 2 * 16 * 512 * 512 * 9 * 32 * 32),
    }
    rates = {}
    for name, (kernel, flops) in kernels.items():
        kernel()  # warm-up: thread-pool start and kernel selection are not the peak
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            kernel()
            times.append(time.perf_counter() - t0)
        rates[name] = flops / statistics.median(times)
    return rates


def cpu_peak(samples: list[dict[str, float]]) -> dict[str, Any]:
    """The measured CPU peak: the best kernel of the best sample (other load only ever lowers a sample)."""
    best = max(samples, key=lambda r: max(r.values()))
    kernel = max(best, key=best.__getitem__)
    return {"flops": best[kernel], "kind": "measured peak",
            "detail": f"fp32 {kernel}, median of 5, {torch.get_num_threads()} threads; best of a matmul and a "
                      "convolution, measured before and after the rounds",
            "samples": samples}


def spec_sheet_peak(device: torch.device, precision: str, cudnn_tf32: bool) -> dict[str, Any]:
    """The spec-sheet peak of a GPU for the precision (and cuDNN TF32 switch) the engine arms run under."""
    name = torch.cuda.get_device_name(device)
    for key, peaks in SPEC_PEAKS:
        if key.lower() in name.lower():
            # Under fp32, cuDNN runs convolutions (nearly all of these FLOPs) in TF32 unless told not to.
            column = precision if precision == "bf16" else ("tf32" if cudnn_tf32 else "fp32")
            return {"flops": peaks[column], "kind": "spec-sheet peak", "detail": f"{key}, dense {column}",
                    "table": peaks}
    return {"flops": None, "kind": "spec-sheet peak", "detail": f"no spec-sheet peak known for '{name}'"}


def si(value: float, unit: str) -> str:
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}"
    return f"{value:.2f} {unit}"


def device_slug(device: torch.device) -> str:
    """The device part of the output file names: 'cpu', or 'cuda-' and the GPU model."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower().removeprefix("nvidia ")
    return "cuda-" + "-".join("".join(c if c.isalnum() else " " for c in name).split())


# ----------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="engine_vs_reference.py",
        description="Time kdbench's training engine against an anchor-style KD loop (PIL + torchvision "
                    "transforms in DataLoader workers, fp32 eager, a host sync every step), alternating rounds "
                    "in one process. Defaults depend on the device: "
                    + "; ".join(f"{k}: {d.teacher} -> {d.student}, {d.steps} steps x {d.rounds} rounds, engine "
                                f"{EngineOptions.fast_for(k).label}, teacher-cache arm "
                                f"{'on' if d.teacher_cache else 'off'}" for k, d in DEFAULTS.items()) + ".")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda when a GPU is visible)")
    p.add_argument("--teacher", help="teacher model, a timm name (default per device)")
    p.add_argument("--student", help="student model, a timm name (default per device)")
    p.add_argument("--dataset", help="dataset name, e.g. cifar100 with --data-dir (default synthetic:cifar100: "
                                     "random images of CIFAR-100's shape)")
    p.add_argument("--data-dir", help="folder holding a torchvision dataset (as for kdbench run)")
    p.add_argument("--steps", type=int, help=f"steps of batch {BATCH} per round and arm (default per device)")
    p.add_argument("--rounds", type=int, help="timed rounds per arm, after one warm-up round (default per device)")
    p.add_argument("--workers", type=int, default=8, help="the reference's DataLoader worker processes (default 8)")
    p.add_argument("--precision", choices=("fp32", "bf16"), help="the engine arms' precision (default: "
                                                                 "EngineOptions.fast_for(device))")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the engine's step "
                                                                            "(default: fast_for(device))")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="engine models and batches in NHWC (default: fast_for(device))")
    p.add_argument("--teacher-cache", action=argparse.BooleanOptionalAction,
                   help="also time the engine with a teacher-output cache (default: on for cuda, off for cpu, "
                        "where building it takes minutes)")
    p.add_argument("--seed", type=int, default=0, help="model initialisation and data order (default 0)")
    p.add_argument("--out", default="results/perf", help="folder for the .json and .md results (default "
                                                         "results/perf)")
    args = p.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device must be cpu or cuda[:N], got '{args.device}'")
    if device.type not in DEFAULTS:
        p.error(f"--device must be cpu or cuda[:N], got '{args.device}'")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible to torch")
    d = DEFAULTS[device.type]
    for key in ("teacher", "student", "dataset", "steps", "rounds", "teacher_cache"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(d, key))
    for key in ("steps", "rounds"):
        if getattr(args, key) < 1:
            p.error(f"--{key} must be at least 1, got {getattr(args, key)}")
    if args.workers < 0:
        p.error(f"--workers must be >= 0, got {args.workers}")
    chosen = {k: getattr(args, k) for k in ("precision", "compile", "channels_last") if getattr(args, k) is not None}
    args.options = replace(EngineOptions.fast_for(device), **chosen)
    args.device = device
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except KdbenchError as exc:
        print(f"engine_vs_reference.py: error: {exc}", file=sys.stderr)
        return exc.exit_code


def run(args: argparse.Namespace) -> int:
    device: torch.device = args.device
    options: EngineOptions = args.options
    # Every name is checked before anything is loaded or built.
    zoo.check_model_name(args.teacher)
    zoo.check_model_name(args.student)
    methods = load_methods()
    if device.type == "cpu":
        # The engine flushes denormals on the CPU (they slow x86 kernels 10-50x); set here for
        # every arm, so the reference is not penalised by an artefact the engine avoids.
        torch.set_flush_denormal(True)
    images_per_round = args.steps * BATCH
    bench = bench_data(args.dataset, args.data_dir, images_per_round)
    info = bench.data.info
    shape = (info.in_chans, info.img_size, info.img_size)
    recipe = Recipe(name="bench", epochs=1, batch_size=BATCH, lr=0.05, milestones=())

    torch.manual_seed(args.seed)
    kw = dict(num_classes=info.num_classes, in_chans=info.in_chans, img_size=info.img_size)
    teacher, student = zoo.create(args.teacher, **kw), zoo.create(args.student, **kw)
    # The reference gets copies with the same initial weights: the engine changes its models in
    # place (memory format), which must not leak into the anchor-style loop.
    ref_teacher, ref_student = copy.deepcopy(teacher), copy.deepcopy(student)

    def kd_method() -> Method:
        m = build_method(methods[METHOD])
        taps = m.taps()
        try:  # the probe is the first forward pass: a model that cannot take these images fails here
            m.setup(probe(student, taps, shape, args.student), [probe(teacher, taps, shape, args.teacher)])
        except RuntimeError as exc:
            raise KdbenchError(f"'{args.teacher}' -> '{args.student}' cannot run on {info.name}'s "
                               f"{'x'.join(map(str, shape))} images: {str(exc).splitlines()[0]}") from None
        return m

    eng_method, ref_method = kd_method(), kd_method()
    flops = step_flops(teacher, student, eng_method, shape, info.num_classes)
    # A GPU's peak comes from its spec sheet; a CPU's is measured, before and after the rounds.
    peak_samples = [measured_cpu_kernels()] if device.type == "cpu" else []
    header(args, info, device)

    # The reference runs under PyTorch's defaults plus cudnn.benchmark, which CRD's and
    # mdistiller's train scripts switch on; the engine arms under whatever the engine sets. Each
    # arm's flags are put back before its rounds, so no arm inherits another's process-wide switches.
    ref_flags = replace(BackendFlags.now(), cudnn_benchmark=True)
    eng_flags = BackendFlags.now()
    data = bench.data.to(device)
    teacher, student = teacher.to(device), student.to(device)

    cache: ViewCache | None = None
    if args.teacher_cache:
        if not cacheable(eng_method.taps()):
            raise KdbenchError(f"method '{METHOD}' taps stage maps, which the teacher cache does not hold")
        distinct = bench.distinct.to(device)
        views = view_count(recipe.crop_padding, recipe.flip)
        print(f"building the teacher cache: {len(distinct.train_labels):,} images x {views} views ...", flush=True)
        cache = build_view_cache(teacher, distinct, recipe, pooled=eng_method.taps().pooled, options=options)
        if bench.index is not None:
            # Repeated images have the same outputs: the cache is built over the distinct ones
            # (the cost a dataset of that size has) and indexed for the repeats.
            index = bench.index.to(device)
            cache = ViewCache(cache.logits[index], cache.pooled[index] if cache.pooled is not None else None,
                              cache.crop_padding, cache.flip, cache.build_time_s)
        eng_flags.apply()  # the build may have set the engine's switches
        print(f"teacher cache built in {cache.build_time_s:.2f} s ({cache.nbytes / 2**20:,.1f} MiB), once; not "
              "counted in its arm's images/s", flush=True)
        eng_flags = BackendFlags.now()

    loader = anchor_loader(bench.data, recipe, args.workers, device)
    reference = Reference(ref_student, ref_teacher, ref_method, recipe, loader, device)

    def reference_round() -> float:
        ref_flags.apply()
        seconds, n = reference.round()
        if n != images_per_round:
            raise RuntimeError(f"the reference trained on {n} images, not {images_per_round}")
        return seconds

    def engine_round(caches: list[ViewCache]) -> float:
        nonlocal eng_flags
        eng_flags.apply()
        result = train(student, data, recipe, seed=args.seed, method=eng_method, teachers=[teacher],
                       teacher_names=[args.teacher], model_name=args.student, options=options,
                       teacher_caches=caches)
        eng_flags = BackendFlags.now()
        return result.train_time_s

    arms: dict[str, Callable[[], float]] = {REFERENCE: reference_round, ENGINE: lambda: engine_round([])}
    if cache is not None:
        arms[CACHED] = lambda: engine_round([cache])
    names = list(arms)
    print("warm-up round (not counted) ...", flush=True)
    warmup = {k: f() for k, f in arms.items()}
    times: dict[str, list[float]] = {k: [] for k in arms}
    for r in range(args.rounds):
        # Rotating the order cancels slow drift (clock, other load) between the arms.
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            times[k].append(arms[k]())
        print(f"round {r + 1}/{args.rounds}: " + " | ".join(
            f"{k} {images_per_round / times[k][-1]:,.1f} img/s" for k in names), flush=True)

    peak = cpu_peak([*peak_samples, measured_cpu_kernels()]) if device.type == "cpu" else \
        spec_sheet_peak(device, options.precision, eng_flags.cudnn_tf32)
    report = summarise(args, info, device, flops, peak, times, warmup, cache, len(bench.distinct.train_labels),
                       ref_flags, eng_flags)
    print_summary(report)
    write_outputs(Path(args.out), report)
    return 0


def header(args: argparse.Namespace, info: DatasetInfo, device: torch.device) -> None:
    data_note = "" if info.real_data else (" (random images of its shape, NOT REAL DATA: throughput does not "
                                          "depend on image content)")
    print(f"engine vs reference: method {METHOD}, {args.teacher} -> {args.student}, {info.name}{data_note}")
    print(f"device: {device_name(device)}; torch {torch.__version__}, torchvision {provenance.version('torchvision')}, "
          f"timm {provenance.version('timm')}")
    print(f"batch {BATCH}, {args.steps} steps ({args.steps * BATCH:,} images) per round and arm, {args.rounds} "
          f"timed round(s) after 1 warm-up round")
    print(f"reference: fp32, eager, NCHW, {args.workers} DataLoader workers (persistent), "
          f"pin_memory {device.type == 'cuda'}; engine: {args.options.label} (precision {args.options.precision}, "
          f"channels_last {args.options.channels_last}, compile {args.options.compile})", flush=True)


def summarise(args: argparse.Namespace, info: DatasetInfo, device: torch.device, flops: dict[str, int],
              peak: dict[str, Any], times: dict[str, list[float]], warmup: dict[str, float],
              cache: ViewCache | None, distinct: int, ref_flags: BackendFlags,
              eng_flags: BackendFlags) -> dict[str, Any]:
    """Every number and setting of the run, as the JSON file holds it."""
    options: EngineOptions = args.options
    images = args.steps * BATCH
    arms: dict[str, Any] = {}
    for k, ts in times.items():
        rates = [images / t for t in ts]
        median = statistics.median(rates)
        # With the cache the teacher's forward is not computed: only the student's FLOPs count.
        per_step = flops["student_forward_backward"] if k == CACHED else flops["step"]
        achieved = per_step * median / BATCH
        arms[k] = {
            "round_seconds": ts, "round_images_per_s": rates, "median_images_per_s": median,
            "warmup_seconds": warmup[k], "flops_per_step": per_step, "achieved_flop_per_s": achieved,
            "fraction_of_peak": achieved / peak["flops"] if peak["flops"] else None,
        }
    ref_median = arms[REFERENCE]["median_images_per_s"]
    for arm in arms.values():
        arm["ratio_over_reference"] = arm["median_images_per_s"] / ref_median
    arms[REFERENCE]["settings"] = {
        "precision": "fp32", "channels_last": False, "compile": False,
        "loader": "torch DataLoader, PIL images, torchvision.transforms RandomCrop + RandomHorizontalFlip + ToTensor "
                  "+ Normalize", "workers": args.workers, "persistent_workers": args.workers > 0,
        "pin_memory": device.type == "cuda", "host_syncs_per_step": 2, "backend_flags": asdict(ref_flags)}
    engine_settings = {**asdict(options), "label": options.label,
                       "loader": "kdbench.data.Loader (in memory, augmentation as batched tensor ops on the device)",
                       "backend_flags": asdict(eng_flags)}
    arms[ENGINE]["settings"] = engine_settings
    cache_info = None
    if cache is not None:
        arms[CACHED]["settings"] = {**engine_settings, "teacher_cache": True}
        cache_info = {"build_time_s": cache.build_time_s, "bytes": cache.nbytes, "views": cache.views,
                      "images": distinct, "dtype": str(cache.logits.dtype).removeprefix("torch."),
                      "note": "built once per (teacher, training set, augmentation) and shared by every student, "
                              "method and seed distilling from that teacher; not counted in its arm's images/s"}
    prov = provenance.collect(device)
    notes = [
        "The reference keeps its DataLoader workers alive between rounds (persistent_workers) and has an uncounted "
        "warm-up round: its steady state is compared, which is conservative for the engine.",
        "Rounds alternate between the arms in one process; the order rotates every round; medians are compared.",
        "The engine's time is TrainResult.train_time_s (evaluation excluded); the reference's is its whole loop "
        "including waiting for its loader.",
        "FLOPs: torch.utils.flop_counter on the CPU, fp32, batch 64, teacher forward + student forward and backward "
        "(a multiply-add is 2 FLOPs); the teacher-cache arm counts the student's only.",
    ]
    if not info.real_data:
        notes.append("Synthetic images (NOT REAL DATA); throughput does not depend on image content.")
    if distinct < images:
        notes.append(f"The set has {distinct:,} training images: each round's {images:,} repeat them"
                     + (" (the teacher cache is built over the distinct ones and indexed for the repeats)."
                        if cache is not None else "."))
    if device.type == "cpu":
        notes.append("On the CPU denormal floats are flushed to zero for every arm, as the engine does.")
    return {
        "benchmark": "engine_vs_reference",
        "method": METHOD, "teacher": args.teacher, "student": args.student,
        "dataset": info.name, "real_data": info.real_data, "data_source": info.source,
        "device": prov["device"], "device_slug": device_slug(device), "precision": options.precision,
        "engine_options": asdict(options),
        "batch_size": BATCH, "steps_per_round": args.steps, "images_per_round": images, "rounds": args.rounds,
        "warmup_rounds": 1, "seed": args.seed, "loader_workers": args.workers,
        "ratio_engine_over_reference": arms[ENGINE]["ratio_over_reference"],
        "ratio_cached_over_reference": arms[CACHED]["ratio_over_reference"] if CACHED in arms else None,
        "arms": arms, "teacher_cache": cache_info,
        "flops_per_step": flops, "peak": peak,
        "versions": {"torch": torch.__version__, "torchvision": prov["torchvision_version"],
                     "timm": prov["timm_version"], "python": platform.python_version()},
        "notes": notes,
        "command": "python " + shlex.join(sys.argv),
        "git_commit": prov["git_commit"],
        "provenance": prov,
        "time": provenance.now(),
    }


def table(report: dict[str, Any]) -> list[str]:
    """The result as markdown table rows."""
    peak = report["peak"]
    rows = ["| arm | settings | images/s per round | median images/s | vs reference | achieved FLOP/s | "
            f"fraction of {peak['kind']} |", "|---|---|---|---|---|---|---|"]
    for name, arm in report["arms"].items():
        s = arm["settings"]
        settings = s.get("label", "fp32") + (f", {s['workers']} workers" if "workers" in s else "")
        per_round = ", ".join(f"{r:,.1f}" for r in arm["round_images_per_s"])
        frac = f"{100 * arm['fraction_of_peak']:.2f}%" if arm["fraction_of_peak"] is not None else "n/a"
        rows.append(f"| {name} | {settings} | {per_round} | {arm['median_images_per_s']:,.1f} | "
                    f"{arm['ratio_over_reference']:.2f}x | {si(arm['achieved_flop_per_s'], 'FLOP/s')} | {frac} |")
    return rows


def print_summary(report: dict[str, Any]) -> None:
    arms, peak = report["arms"], report["peak"]
    print()
    print("\n".join(table(report)))
    print()
    print("median images/s: " + " | ".join(f"{k} {a['median_images_per_s']:,.1f}" for k, a in arms.items()))
    print(f"ratio engine / reference: {report['ratio_engine_over_reference']:.2f}x (median images/s)")
    if report["ratio_cached_over_reference"] is not None:
        c = report["teacher_cache"]
        print(f"ratio engine + teacher cache / reference: {report['ratio_cached_over_reference']:.2f}x "
              f"(median images/s; the cache's one-off build of {c['build_time_s']:.2f} s is not included)")
    f = report["flops_per_step"]
    print(f"FLOPs per step (batch {report['batch_size']}): {si(f['step'], 'FLOP')} (teacher forward "
          f"{si(f['teacher_forward'], 'FLOP')}, student forward+backward {si(f['student_forward_backward'], 'FLOP')})")
    peak_text = si(peak["flops"], "FLOP/s") if peak["flops"] else "unknown"
    for k, a in arms.items():
        frac = f"{100 * a['fraction_of_peak']:.2f}%" if a["fraction_of_peak"] is not None else "n/a"
        print(f"achieved FLOP/s, {k}: {si(a['achieved_flop_per_s'], 'FLOP/s')} = {frac} of the {peak['kind']} "
              f"{peak_text} ({peak['detail']})")
    for note in report["notes"]:
        print(f"note: {note}")


def write_outputs(out: Path, report: dict[str, Any]) -> None:
    stem = f"engine_vs_reference-{report['device_slug']}-{report['precision']}"
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    text = json.dumps(report, indent=2) + "\n"
    atomic_write(json_path, lambda tmp: tmp.write_text(text))
    s = report
    md = [
        f"# kdbench's engine vs an anchor-style KD loop: {s['device']}, {s['precision']}", "",
        f"Method `{s['method']}`, `{s['teacher']}` -> `{s['student']}`, {s['dataset']}"
        + ("" if s["real_data"] else " (synthetic: NOT REAL DATA; throughput does not depend on image content)")
        + f"; batch {s['batch_size']}, {s['steps_per_round']} steps per round and arm, {s['rounds']} timed rounds "
          f"after {s['warmup_rounds']} warm-up round, alternating in one process.", "",
        *table(s), "",
        f"**Ratio engine / reference: {s['ratio_engine_over_reference']:.2f}x** (median images/s).",
    ]
    if s["teacher_cache"] is not None:
        c = s["teacher_cache"]
        md.append(f"With the teacher cache: **{s['ratio_cached_over_reference']:.2f}x**; the cache ({c['views']} views "
                  f"per image, {c['bytes'] / 2**20:,.1f} MiB) took {c['build_time_s']:.2f} s to build, once, "
                  "not counted above.")
    md += [
        "",
        f"torch {s['versions']['torch']}, torchvision {s['versions']['torchvision']}, timm {s['versions']['timm']}; "
        f"commit `{s['git_commit']}`; {s['time']}.", "",
        *[f"- {n}" for n in s["notes"]], "",
        "Produced by:", "", "```sh", s["command"], "```", "",
    ]
    atomic_write(md_path, lambda tmp: tmp.write_text("\n".join(md)))
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    sys.exit(main())
