"""Why soft targets help or hurt a student in Hinton et al.'s MNIST experiment, measured.

For a trained ``hinton-mnist`` teacher (read from a results folder) this measures the three things
that decide whether logit distillation at a high temperature can work:

1. **The teacher's logit scale and how soft its targets are**: per-image logit spread and top-1
   margin on the training images, and for each temperature the mean top probability, the mean
   entropy (as a fraction of ln 10, the uniform distribution's) and the mass on the nine other classes.
2. **The KD term's gradient against the CE term's**, for kdbench's ``kd`` loss
   ``ce_weight · CE + kd_weight · T² · KL(p_t^T ‖ p_s^T)``: the mean per-image norm of each weighted
   term's gradient with respect to the student's logits. At a high T the KD gradient is about
   ``kd_weight · (z_s - z_t) / N`` (Hinton et al. §2.1), so it grows with the teacher's logit scale.
3. **The student's effective learning rate**: the norm of the gradient of the whole loss with
   respect to the student's weights, as a multiple of plain cross-entropy's at the same weights
   (same SGD learning rate, so this is the ratio of step sizes).

Items 2 and 3 are measured on a freshly initialised student and again after ``--epochs`` epochs of
training with the suite's ``kd`` loss (kdbench's own engine), so the change over training shows.

    python benchmarks/hinton_soft_targets.py --results-dir results/hinton-mnist --data-dir /tmp/data \\
        --out results/hinton-mnist/soft_targets.md
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench import provenance, train, zoo
from kdbench.data import load_dataset, normalize
from kdbench.files import atomic_write_bytes
from kdbench.losses import kd_loss
from kdbench.registry import build_method, load_methods
from kdbench.suites import get_suite, load_suite_file

TEMPERATURES = (1.0, 2.5, 4.0, 8.0, 20.0)


def _teacher(results: Path, model: str, info: Any) -> tuple[nn.Module, dict[str, Any]]:
    rows = [json.loads(p.read_text()) for p in sorted((results / "runs").glob("*.json"))]
    rows = [r for r in rows if r.get("kind") == "teacher" and r.get("student") == model]
    if not rows:
        raise SystemExit(f"no trained {model} teacher in {results}/runs: run `kdbench reproduce hinton-mnist "
                         f"--results-dir {results}` first")
    row = max(rows, key=lambda r: r["epochs"])
    kwargs = row.get("model_kwargs") or {}
    kwargs = json.loads(kwargs) if isinstance(kwargs, str) else kwargs
    net = zoo.create(model, num_classes=info.num_classes, in_chans=info.in_chans, img_size=info.img_size, **kwargs)
    net.load_state_dict(torch.load(results / "teachers" / f"{row['run_id']}.pt", weights_only=True))
    return net.eval(), row


def logit_scale(logits: Tensor) -> dict[str, float]:
    """Per-image spread of the logits, and the gap between the top two."""
    top2 = logits.topk(2, dim=1).values
    return {"logit std per image (mean)": logits.std(dim=1).mean().item(),
            "logit range per image (mean)": (logits.max(1).values - logits.min(1).values).mean().item(),
            "top-1 margin (mean)": (top2[:, 0] - top2[:, 1]).mean().item(),
            "top-1 margin (median)": (top2[:, 0] - top2[:, 1]).median().item()}


def softness(logits: Tensor) -> list[dict[str, float]]:
    """How soft the teacher's targets are at each temperature."""
    out = []
    for t in TEMPERATURES:
        p = F.softmax(logits / t, dim=1)
        entropy = -(p * p.clamp_min(1e-30).log()).sum(1)
        out.append({"T": t, "top probability (mean)": p.max(1).values.mean().item(),
                    "entropy / ln 10 (mean)": (entropy / math.log(p.shape[1])).mean().item(),
                    "mass on the other 9 classes (mean)": (1 - p.max(1).values).mean().item()})
    return out


def gradients(student: nn.Module, teacher_logits: Tensor, x: Tensor, y: Tensor, *, ce_weight: float,
              kd_weight: float, temperature: float, batch: int = 128) -> dict[str, float]:
    """Mean per-image logit-gradient norms of each weighted term, and the weight-gradient ratio to CE."""
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    sums = {"ce": 0.0, "kd": 0.0, "kd/ce step": 0.0}
    n_batches = 0
    for start in range(0, len(x), batch):
        xb, yb, tb = x[start:start + batch], y[start:start + batch], teacher_logits[start:start + batch]
        torch.manual_seed(start)  # the same dropout masks (if any) for both losses
        z = student(xb)
        ce = F.cross_entropy(z, yb)
        kd = kd_loss(z, tb, temperature)
        g_ce = torch.autograd.grad(ce_weight * ce, z, retain_graph=True)[0]
        g_kd = torch.autograd.grad(kd_weight * kd, z, retain_graph=True)[0]
        # per-image gradients: the batch mean divides each image's by len(xb); undo that
        sums["ce"] += (g_ce * len(xb)).norm(dim=1).mean().item()
        sums["kd"] += (g_kd * len(xb)).norm(dim=1).mean().item()
        w_total = torch.autograd.grad(ce_weight * ce + kd_weight * kd, params, retain_graph=True)
        w_plain = torch.autograd.grad(ce, params)
        sums["kd/ce step"] += (_norm(w_total) / _norm(w_plain))
        n_batches += 1
    return {"CE term: logit-gradient norm per image": sums["ce"] / n_batches,
            "KD term: logit-gradient norm per image": sums["kd"] / n_batches,
            "KD/CE logit-gradient ratio": sums["kd"] / sums["ce"],
            "step size vs plain CE (same lr)": sums["kd/ce step"] / n_batches}


def _norm(grads: tuple[Tensor, ...]) -> float:
    return math.sqrt(sum(float(g.pow(2).sum()) for g in grads))


def _table(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---:|" * len(keys)]
    lines += ["| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |"
              for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results-dir", type=Path, required=True, help="a hinton-mnist results folder with a teacher")
    ap.add_argument("--data-dir", default=None, help="where MNIST is (torchvision layout)")
    ap.add_argument("--suite", default="hinton-mnist", help="the suite whose student, recipe and kd settings to use")
    ap.add_argument("--epochs", type=int, default=5, help="epochs of kd training before the second measurement")
    ap.add_argument("--images", type=int, default=4096, help="training images the gradients are measured on")
    ap.add_argument("--lr", type=float, default=None, help="the students' learning rate (default: the suite's)")
    ap.add_argument("--warmup", type=int, default=None, help="the students' warm-up epochs (default: the suite's)")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown here (else print it)")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    suite = load_suite_file(Path(args.suite)) if args.suite.endswith(".toml") else get_suite(args.suite)
    pair = suite.pairs[0]
    data = load_dataset(suite.dataset, data_dir=args.data_dir)
    teacher, trow = _teacher(args.results_dir, pair.teachers[0], data.info)
    x = normalize(data.train_images, data.info)
    with torch.inference_mode():
        t_logits = torch.cat([teacher(c) for c in x.split(2048)])
    kd_kwargs = {k.split(".", 1)[1]: v for k, v in suite.hparams if k.startswith("kd.")}
    method = build_method(load_methods()["kd"], kd_kwargs)
    w = {"ce_weight": method.ce_weight, "kd_weight": method.kd_weight, "temperature": method.temperature}
    xs, ys, ts = x[:args.images], data.train_labels[:args.images], t_logits[:args.images]

    student = zoo.create(pair.student, num_classes=10, in_chans=data.info.in_chans, img_size=data.info.img_size)
    grad_rows = [{"student": "at initialisation", **gradients(student, ts, xs, ys, **w)}]
    by_model = suite.recipe_by_model.get(pair.student)
    recipe = suite.recipe.with_overrides(by_model, pair.student) if by_model else suite.recipe
    recipe = recipe.with_epochs(args.epochs) if args.epochs < recipe.epochs else recipe
    recipe = recipe.with_overrides({"lr": args.lr}, "--lr") if args.lr else recipe
    recipe = recipe.with_overrides({"warmup_epochs": args.warmup}, "--warmup") if args.warmup is not None else recipe
    try:
        train.train(student, data, recipe, seed=0, method=method.train(), teachers=[teacher], model_name=pair.student)
        grad_rows.append({"student": f"after {args.epochs} epoch(s) of kd, lr {recipe.lr}, warm-up {recipe.warmup_epochs} ({recipe.label})",
                          **gradients(student, ts, xs, ys, **w)})
    except train.Diverged as exc:  # what a too-large step does: the row says so instead of a number
        grad_rows.append({"student": f"kd, lr {recipe.lr}, warm-up {recipe.warmup_epochs} ({recipe.label}): diverged at epoch {exc.epoch}", **{
            k: float("nan") for k in grad_rows[0] if k != "student"}})
    md = [f"# Soft targets in `{suite.name}`: the teacher's scale, the terms' gradients, the step size",
          "", f"Teacher: run `{trow['run_id']}` ({pair.teachers[0]}, {trow['schedule']}, "
          f"top-1 {trow['top1_last']:.2f}, {round((100 - trow['top1_last']) * trow['test_size'] / 100)} test errors). "
          f"Loss: `kd` with {w}.", "",
          "## 1. Teacher logits on the 60,000 training images (eval mode, untranslated)", "",
          _table([{k: v for k, v in logit_scale(t_logits).items()}]), "",
          "## 2. How soft the targets are", "", _table(softness(t_logits)), "",
          f"## 3. Gradients on {args.images} training images (per-image norms w.r.t. the student's logits)", "",
          _table(grad_rows), "",
          f"Command: `python benchmarks/hinton_soft_targets.py --results-dir {args.results_dir} "
          f"--suite {args.suite} --epochs {args.epochs} --images {args.images}"
          f"{f' --lr {args.lr}' if args.lr else ''}{f' --warmup {args.warmup}' if args.warmup is not None else ''}`; "
          f"commit {provenance.git_commit()}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
          f"wall {time.perf_counter() - t0:.0f} s."]
    text = "\n".join(md) + "\n"
    if args.out:
        atomic_write_bytes(args.out, text.encode())
    print(text)


if __name__ == "__main__":
    main()
