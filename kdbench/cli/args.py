"""The `kdbench` command line: its parser, options and help text."""

from __future__ import annotations

import argparse
import os
import textwrap
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import KdbenchError

EXAMPLES = """\
examples:
  kdbench run --methods all                      # embedded digits suite, every method (~5 min on 2 CPU cores)
  kdbench run --methods kd,fitnets --seeds 0,1,2 --set kd.temperature=8
  kdbench run --suite hinton-mnist --data-dir ~/data --epochs 10
  kdbench run --dataset cifar100 --download --pairs cifar_resnet32x4:cifar_resnet8x4 --recipe crd
  kdbench run --methods ensemble_kd --pairs cifar_resnet56+cifar_wrn_40_2:cifar_resnet20
  kdbench run --methods ce,kd --pairs "cifar_resnet8:hinton_mlp_30*3"   # 3 students from one teacher, as one model
  kdbench run --methods my_kd --plugin my_kd.py   # a method in one file, no install
  kdbench run --suite crd-table1 --gpus 0,1,2,3   # one worker process per GPU
  kdbench run --suite crd-table1 --executor ray --ray-address auto --gpus-per-run 0.25   # 4 runs per GPU
  kdbench run --suite crd-table1 --executor slurm --slurm-partition gpu --gpus-per-run 1 --slurm-max-concurrent 16
  torchrun --nproc_per_node=8 -m kdbench reproduce imagenet-r34-r18 --data-dir /data --data-backend stream
  kdbench report --metric top1_best
  kdbench list methods
"""

REPRODUCE_EXAMPLES = """\
examples:
  kdbench reproduce hinton-mnist --data-dir ~/data                     # Hinton et al. 2015, MNIST
  kdbench reproduce crd-table1 --data-dir ~/data --download           # CRD Table 1, 3 seeds, 240 epochs
  kdbench reproduce crd-table1 --pairs resnet32x4:resnet8x4 --methods ce,kd --seeds 0
  kdbench reproduce crd-table2 --epochs-scale 0.1 --dry-run           # plan and time estimate only
  kdbench reproduce crd-table1 --synthetic --epochs 1                 # smoke run without CIFAR (NOT REAL DATA)
  kdbench reproduce my-suite.toml                                     # a copy of a suite file, edited
"""


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(t) for t in _csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers like 0,1,2, got '{text}'") from None
    if not seeds:
        raise argparse.ArgumentTypeError("--seeds needs at least one seed")
    return seeds


def _number(cast: type, *, low: float, high: float = float("inf"), low_open: bool = False,
            what: str) -> Any:
    """An argparse type: ``cast(text)`` within [low, high] (or (low, high]), else a message saying what it takes."""
    def parse(text: str) -> Any:
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'") from None
        if not ((v > low if low_open else v >= low) and v <= high):  # NaN fails too
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return v
    return parse


_positive = _number(int, low=1, what="a positive integer")
_nonnegative_int = _number(int, low=0, what="a whole number >= 0")
_nonnegative_float = _number(float, low=0, what="a number >= 0 like 0.25")
_fraction_incl = _number(float, low=0, high=1, what="a probability in [0, 1] like 0.5")
_fraction = _number(float, low=0, low_open=True, high=1, what="a number in (0, 1] like 0.1 (--epochs-scale must be "
                    "in (0, 1])")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdbench",
        description="Benchmark knowledge-distillation methods over the timm model zoo: accuracy, size "
                    "and speed, with provenance for every number.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"kdbench {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run", help="train and evaluate methods over teacher→student pairs, then write the report",
        description=textwrap.fill(
            "Train every (method × pair × seed) of a suite, one results row per finished run. Runs already in the "
            "results folder are skipped, so re-running a command resumes it. Teachers without a checkpoint are "
            "trained once per (model, dataset, recipe, seed) and cached.", 88),
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _run_options(run, reproduce=False)

    repro = sub.add_parser(
        "reproduce", help="run a suite with published numbers and compare them with kdbench's, cell by cell",
        description=textwrap.fill(
            "Run a suite that has published numbers (crd-table1, crd-table2, hinton-mnist; `kdbench list suites`), "
            "then write a table per published cell: the paper's value, kdbench's mean ± std over seeds at the same "
            "selection rule (last or best epoch) with the other rule beside it, the gap Δ and a verdict within "
            "tolerance, plus a published-vs-kdbench plot. Finished runs are reused, so re-running resumes; a "
            "shortened schedule or synthetic data is marked in every output.", 88),
        epilog=REPRODUCE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    repro.add_argument("suite", metavar="SUITE", help="a built-in suite name or a suite .toml file")
    _run_options(repro, reproduce=True)

    rep = sub.add_parser("report", help="derive tables and plots from a results folder",
                         description="Derive markdown/CSV tables and PNG plots from the rows in a results folder.")
    rep.add_argument("--results-dir", default=None, help="results folder (default: $KDBENCH_RESULTS, "
                     "else ./kdbench-results)")
    rep.add_argument("--out", type=Path, default=None, help="where to write (default: RESULTS_DIR/report)")
    rep.add_argument("--metric", default="top1_last", metavar="M[,M...]",
                     help="what the tables show; several, comma-separated, give a table each (the first also the "
                          "plots). top1_last (default: the CRD tables report the last epoch), top1_best (the DKD "
                          "tables: the best epoch, chosen on the test set), top5_last, top5_best, top1_val_best and "
                          "top5_val_best (at the epoch with the best validation top-1, for runs with a recipe "
                          "val_fraction), agreement (with the teacher). From the stored test-set predictions, at the "
                          "last epoch: precision_macro, recall_macro, f1_macro, ece (15 bins), nll, kl_teacher "
                          "(KL(teacher || student) at T = 1), kl_teacher_t (at the method's temperature)")

    rep.add_argument("--ensemble-seeds", action="store_true",
                     help="also judge each method's students of one pair with different seeds as one ensemble (the "
                          "mean of their probabilities): each member's and the ensemble's top-1, diversity, summed "
                          "parameters; from the stored test-set predictions")

    ls = sub.add_parser("list", help="list methods, models, suites, recipes or datasets")
    ls.add_argument("what", choices=["methods", "models", "suites", "recipes", "datasets"])
    ls.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="FILE.py",
                    help="also load method classes from this file")
    return parser


def _run_options(parser: argparse.ArgumentParser, *, reproduce: bool) -> None:
    """The options `run` and `reproduce` share (reproduce takes its suite as an argument)."""
    _what_options(parser, reproduce)
    _data_options(parser, reproduce)
    _training_options(parser, reproduce)
    _executor_options(parser)
    _output_options(parser, reproduce)


def _what_options(parser: argparse.ArgumentParser, reproduce: bool) -> None:
    what = parser.add_argument_group("what to run")
    if not reproduce:
        what.add_argument("--suite", default="digits", help="built-in suite name or a suite .toml file (default: "
                          "digits, the embedded data; see `kdbench list suites`)")
    what.add_argument("--methods", default=None, help="comma-separated method names, or 'all' (default: the "
                      "suite's methods, else all). A method is left out of a pair with more teachers than it takes (a note "
                      "says so); naming one that fits no pair at all is an error")
    what.add_argument("--pairs", help="comma-separated TEACHER[+TEACHER...]:STUDENT pairs of timm model names"
                      + (" (CRD names like resnet56:resnet20 work too), a subset of the suite's" if reproduce else
                         ", replacing the suite's (e.g. cifar_resnet56:cifar_resnet20); MODEL@N fixes a teacher's "
                         "seed; a student side S*3 or A+B is a student ensemble, judged as one model by the report"))
    if not reproduce:
        what.add_argument("--transfer", action="append", default=[], metavar="SPEC",
                          help="the student distils on a transfer set instead of the training set, for every pair: "
                               "exclude=3[,5] (without these classes), only=7,8, dataset=NAME (another dataset's "
                               "training images, same classes), unlabelled (no labels: soft targets only); "
                               "repeatable, e.g. --transfer dataset=fashion_mnist --transfer unlabelled")
        what.add_argument("--bias", action="append", default=[], metavar="CLASS=OFFSET|val",
                          help="also report test errors with OFFSET added to CLASS's logit (e.g. 3=3.5), or with "
                               "one offset for the classes the transfer set leaves out, searched on held-out "
                               "training images (val; needs --val-fraction); repeatable")
    what.add_argument("--seeds", type=_seeds, help="comma-separated seeds (default: the suite's, e.g. 0); tables "
                      "show mean ± std over them")
    what.add_argument("--set", dest="sets", action="append", default=[], metavar="METHOD.HP=VALUE",
                      help="override a method hyperparameter, e.g. --set kd.temperature=8 (repeatable)")
    what.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="FILE.py",
                      help="load method classes from a Python file (repeatable)")
    what.add_argument("--pretrained-file", dest="pretrained_files", action="append", default=[],
                      metavar="MODEL=FILE", help="start MODEL (a teacher or student of the pairs) from the pretrained "
                      "weights in FILE, as timm's pretrained_cfg_overlay=dict(file=...) loads them. A model named "
                      "with a timm tag (resnet50.a1_in1k) or hf-hub: starts from timm's weights without it (from the "
                      "Hugging Face cache, or the Hub)")
    what.add_argument("--teacher-finetune", action="store_true",
                      help="fine-tune a pretrained teacher trained for other classes (resnet50.a1_in1k on your "
                      "10-class ImageFolder): timm's new classifier and the body train with the run's recipe for 10 "
                      "epochs, cosine, 1 warm-up epoch, a tenth of the learning rate (a suite's [teacher_finetune] "
                      "table sets its own); without it such a teacher is refused")
    what.add_argument("--teacher-checkpoint", dest="teacher_ckpts", action="append", default=[],
                      metavar="[MODEL=]FILE[#ema]", help="use these weights for a teacher instead of training it "
                      "(a state dict, or a dict with it under 'model' as RepDistiller publishes, or timm train.py's "
                      "model_best.pth.tar; FILE#ema loads its EMA weights, state_dict_ema)")


def _data_options(parser: argparse.ArgumentParser, reproduce: bool) -> None:
    data = parser.add_argument_group("data")
    if reproduce:
        data.add_argument("--synthetic", action="store_true", help="train on random images shaped like the "
                          "suite's dataset (torchvision FakeData, 512 train / 256 test) instead of the real data: "
                          "checks that the whole suite runs; every output is marked NOT REAL DATA")
    else:
        data.add_argument("--dataset", help="digits, mnist, fashion_mnist, cifar10, cifar100, synthetic:NAME, or an "
                          "ImageFolder path with train/ and val/ (default: the suite's)")
    data.add_argument("--data-dir", help="where torchvision datasets live (default: $KDBENCH_DATA, else "
                      "~/.cache/kdbench/data)")
    data.add_argument("--download", action="store_true", help="let torchvision download a missing dataset")
    data.add_argument("--limit", type=_positive, default=0, metavar="N",
                      help="use only the first N train and N test images (smoke tests; labelled in every output)")
    data.add_argument("--pad-to", type=_positive, default=None, metavar="S", help="zero-pad images to S×S, e.g. "
                      "28×28 Fashion-MNIST to 32 for CIFAR models (default: the suite's, else none)")
    data.add_argument("--image-size", type=_positive, default=None, metavar="N", help="train and evaluate at N×N: "
                      "each image's shorter side resized to N / crop-pct, then centre-cropped to N (default: the "
                      "suite's, else as stored; an ImageFolder 32). FLOPs and throughput are measured at it, and it "
                      "is part of every run id and dataset label (~Npx)")
    data.add_argument("--crop-pct", type=float, default=None, metavar="F", help="with --image-size: the fraction "
                      "of the resized image the centre crop keeps, in (0, 1] (timm's eval default 0.875; default 1)")
    data.add_argument("--interpolation", default=None, choices=["bilinear", "bicubic", "nearest"],
                      help="with --image-size: how images are resized (default bilinear)")
    data.add_argument("--data-backend", default="auto", choices=["auto", "memory", "stream"],
                      help="memory: decode the dataset once and train from uint8 tensors on the device; stream: read "
                      "an ImageFolder (or train.tar/val.tar) from disk batch by batch (timm's transforms in DataLoader workers; its random "
                      "resized crops come from the full image; under torchrun each rank reads its own shard); auto "
                      "(default): memory when the decoded set fits in 80%% of the memory available (and of the GPU's "
                      "free memory), else stream. Rows record it; a streamed set is other runs (dataset label /stream)")
    data.add_argument("--loader-workers", type=_positive, default=None, metavar="N",
                      help="with --data-backend stream: DataLoader worker processes per training process (default: "
                      "the cores available to it, less one, at most 8)")


def _training_options(parser: argparse.ArgumentParser, reproduce: bool) -> None:
    train = parser.add_argument_group("training")
    if not reproduce:
        train.add_argument("--recipe", help="named recipe (default: the suite's; see `kdbench list recipes`)")
    train.add_argument("--epochs", type=_positive, help="train for N epochs; fewer than the recipe's own length "
                       "scales its milestones and labels the run 'shortened' everywhere")
    if reproduce:
        train.add_argument("--epochs-scale", type=_fraction, metavar="F", help="train for F × the recipe's epochs "
                           "(e.g. 0.1: 24 of CRD's 240), at least 1; labelled 'shortened' everywhere")
    train.add_argument("--val-fraction", type=_nonnegative_float, metavar="F",
                       help="hold out F (0 < F <= 0.5; 0: none) of the training set, stratified, the same images for "
                            "every run, and evaluate it every epoch: top1_val_best is the test top-1 at the epoch "
                            "with the best validation top-1 (default: the recipe's, 0). Part of each run's id")
    train.add_argument("--early-stop", type=_nonnegative_int, metavar="N",
                       help="end training after N epochs without a new best validation top-1 (needs a validation "
                            "split; 0: off; default: the recipe's). Part of each run's id")
    train.add_argument("--mixup", type=_nonnegative_float, metavar="ALPHA", dest="mixup_alpha",
                       help="mixup each batch with itself reversed, λ ~ Beta(ALPHA, ALPHA) (timm's Mixup in batch mode; "
                            "0: off; default: the recipe's, 0). The teachers see the mixed images; the cross-entropy "
                            "uses the mixed labels. Part of each run's id and schedule label")
    train.add_argument("--cutmix", type=_nonnegative_float, metavar="ALPHA", dest="cutmix_alpha",
                       help="CutMix each batch with itself reversed, λ ~ Beta(ALPHA, ALPHA), corrected to the box's "
                            "area (0: off; default: the recipe's, 0). With --mixup too, one of the two per batch")
    train.add_argument("--mix-prob", type=_fraction_incl, metavar="P", dest="mix_prob",
                       help="probability that a batch is mixed at all (default: the recipe's, 1)")
    train.add_argument("--mix-switch-prob", type=_fraction_incl, metavar="P", dest="mix_switch_prob",
                       help="with both --mixup and --cutmix: probability of CutMix for a batch (default 0.5)")
    train.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu or cuda[:N]")
    train.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                       help="auto: bf16 on a GPU, fp32 on the CPU. bf16 runs the forward passes under autocast; "
                            "weights, optimizer, BatchNorm statistics and losses stay fp32. Part of each run's id")
    train.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                       help="torch.compile the training step (CUDA graphs on a GPU); auto: on on a GPU")
    train.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"],
                       help="NHWC memory format for models and batches; auto: on on a GPU")
    train.add_argument("--teacher-cache", default="auto", choices=["auto", "on", "off"],
                       help="compute each teacher's outputs once for every augmented view (162 per CIFAR image) "
                            "and reuse them in every run of that teacher; only for methods that need no feature "
                            "maps. auto: on a GPU, when it saves teacher compute. Kept in RESULTS_DIR/cache")


def _executor_options(parser: argparse.ArgumentParser) -> None:
    ex = parser.add_argument_group(
        "where runs happen", "Every executor writes into the same results folder (shared by all machines), skips "
        "finished runs and resumes interrupted ones from their last epoch checkpoint.")
    ex.add_argument("--executor", default="local", metavar="NAME", help="local (default: here, one run after another, "
                    "or one worker per GPU with --gpus), ray (a Ray cluster), slurm (a job array through submitit)")
    ex.add_argument("--gpus", metavar="LIST", help="local: one worker process per GPU, e.g. 0,1,2,3 or 'all'")
    ex.add_argument("--runs-per-gpu", type=_positive, default=1, metavar="K",
                    help="local with --gpus: K worker processes per GPU, each training its own run (default 1)")
    ex.add_argument("--workers", type=_positive, default=0, metavar="N",
                    help="local: N worker processes on this machine (CPU runs in parallel)")
    ex.add_argument("--gpus-per-run", type=_nonnegative_float, default=None, metavar="F", help="ray/slurm: GPUs each "
                    "run asks for; a fraction packs small runs onto one GPU (ray, e.g. 0.25). Default 1 with a GPU "
                    "device, else 0")
    ex.add_argument("--cpus-per-run", type=_nonnegative_float, default=1.0, metavar="N",
                    help="ray/slurm: CPU cores each run asks for (default 1)")
    ex.add_argument("--max-retries", type=_nonnegative_int, default=2, metavar="N",
                    help="ray: tries after the first before a failing run is reported (default 2)")
    ex.add_argument("--ray-address", metavar="ADDR", help="ray: an existing cluster ('auto', or HOST:PORT); "
                    "default: start a local one")
    ex.add_argument("--env", dest="env", action="append", default=[], metavar="NAME[=VALUE]",
                    help="ray/slurm: an environment variable the runs need (KDBENCH_* ones always travel)")
    ex.add_argument("--slurm-partition", metavar="NAME", help="slurm: partition to submit to")
    ex.add_argument("--slurm-max-concurrent", type=_positive, default=None, metavar="N",
                    help="slurm: at most N jobs of the array run at once")
    ex.add_argument("--slurm-time", type=_positive, default=240, metavar="MIN",
                    help="slurm: time limit per job in minutes (default 240); a job that hits it is requeued and "
                    "resumes")
    ex.add_argument("--slurm-mem", type=_positive, default=None, metavar="GB", help="slurm: memory per job in GB")
    ex.add_argument("--slurm-account", metavar="NAME", help="slurm: account to charge")
    ex.add_argument("--slurm-qos", metavar="NAME", help="slurm: quality of service")
    ex.add_argument("--slurm-folder", type=Path, metavar="DIR",
                    help="slurm: where submitit keeps job scripts and logs (default RESULTS_DIR/slurm)")
    ex.add_argument("--slurm-extra", action="append", default=[], metavar="KEY=VALUE",
                    help="slurm: any other sbatch option, e.g. --slurm-extra constraint=h100 (repeatable)")


def _output_options(parser: argparse.ArgumentParser, reproduce: bool) -> None:
    out = parser.add_argument_group("output")
    out.add_argument("--results-dir", default=None, help="results folder (default: $KDBENCH_RESULTS, "
                     "else ./kdbench-results)")
    if reproduce:
        out.add_argument("--out", type=Path, default=None, help="where the comparison goes (default: "
                         "RESULTS_DIR/reproduce/SUITE)")
    out.add_argument("--throughput-batch", type=_positive, default=256, help="batch size of the inference "
                     "throughput measurement (default 256)")
    if not reproduce:
        out.add_argument("--no-report", action="store_true", help="don't derive the report at the end")
    out.add_argument("--dry-run", action="store_true", help="check everything and list the runs with an estimate "
                     "of their time on this device (from a few timed training steps); train nothing")
    out.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def results_dir(arg: str | Path | None) -> Path:
    """--results-dir, else $KDBENCH_RESULTS, else ./kdbench-results. An empty one is refused: it would
    scatter runs/, teachers/ and report/ into the current folder (write '.' to mean that)."""
    if arg is None:
        env = os.environ.get("KDBENCH_RESULTS")
        if env is None:
            return Path("kdbench-results")
        if not env.strip():
            raise KdbenchError("KDBENCH_RESULTS is set but empty, which would write results into the current "
                               "folder; set it to a folder (export KDBENCH_RESULTS=~/kdbench-results), or unset "
                               "it for the default ./kdbench-results")
        return Path(env)
    if not str(arg).strip():
        raise KdbenchError("--results-dir is empty, which would write results into the current folder; give a "
                           "folder (e.g. --results-dir kdbench-results, or '.' if you mean this folder)")
    return Path(arg)
