"""The row schema: what one finished run writes into the results store, field by field.

A row is a flat JSON object (``runs/<run_id>.json``). Student and teacher runs share the common
fields; each kind adds its own. The report reads rows back through the store
(:meth:`kdbench.sweep.store.ResultsStore.rows`) and derives every table and plot from them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .. import provenance
from ..executors.base import DIVERGED, OK
from ..recipe import Recipe
from ..train import EngineOptions, TrainResult
from .measure import Measurements, evaluated
from .spec import RunSpec, TeacherSpec

NAN = float("nan")


@dataclass(frozen=True)
class Context:
    """What every row of one sweep shares: its data, how the engine computed, and provenance."""

    dataset: str                 # the dataset label (limit and padding marked)
    dataset_source: str
    real_data: bool
    train_size: int
    test_size: int
    device_type: str
    world_size: int
    options: EngineOptions
    provenance: dict[str, Any]


def common(ctx: Context, *, run_id: str, kind: str, method: str, model: str, pair: str, recipe: Recipe,
           seed: int, result: TrainResult, measured: Measurements, peak: Any) -> dict[str, Any]:
    """The fields every row has: the spec, accuracy, size, speed, the training log, provenance."""
    ok = evaluated(result)
    return {
        "run_id": run_id, "kind": kind, "method": method, "student": model, "pair": pair,
        "dataset": ctx.dataset, "dataset_source": ctx.dataset_source, "real_data": ctx.real_data,
        "train_size": ctx.train_size, "test_size": ctx.test_size,
        "recipe": recipe.name, "epochs": recipe.epochs, "recipe_epochs": recipe.full_epochs,
        "shortened": recipe.shortened, "schedule": recipe.label, "recipe_config": json.dumps(recipe.to_dict()),
        "seed": seed,
        "status": OK,
        "top1_last": result.last.top1 if ok else NAN, "top5_last": result.last.top5 if ok else NAN,
        "top1_best": result.best_top1 if ok else NAN, "top5_best": result.best_top5 if ok else NAN,
        "best_epoch": result.best_epoch,
        "agreement": measured.agreement,
        "params": measured.params, "extra_params": 0,
        **measured.costs,
        "train_time_s": result.train_time_s, "eval_time_s": result.eval_time_s,
        "checkpoint_time_s": result.checkpoint_time_s, "resumed_from_epoch": result.resumed_from,
        "world_size": ctx.world_size,
        "peak_mem_mb": peak.mb if peak else NAN, "peak_mem_kind": peak.kind if peak else "",
        "flush_denormal": ctx.device_type == "cpu",
        "precision": ctx.options.precision, "channels_last": ctx.options.channels_last,
        "compiled": ctx.options.compile,
        "history_top1": json.dumps([round(h.top1, 4) for h in result.history]),
        "history_loss": json.dumps([{k: round(v, 6) for k, v in h.losses.items()} for h in result.history]),
        **{f"class_{k}.{i}": v for k, vals in measured.per_class.items() for i, v in enumerate(vals)},
        **ctx.provenance,
        "finished_at": provenance.now(),
    }


def student_row(ctx: Context, spec: RunSpec, *, paper: str, extra_params: int, result: TrainResult,
                measured: Measurements, peak: Any, cache_build_s: list[float], error: str = "") -> dict[str, Any]:
    """A student run's row; ``error`` names why a diverged run stopped."""
    row = common(ctx, run_id=spec.run_id, kind="student", method=spec.method, model=spec.student, pair=spec.pair,
                 recipe=spec.recipe, seed=spec.seed, result=result, measured=measured, peak=peak)
    row.update({
        "method_paper": paper,
        "method_source": spec.method_source,
        "teachers": "+".join(spec.teacher_names),
        "hparams": json.dumps(dict(spec.hparams), sort_keys=True, default=str),
        **{f"hp.{k}": (json.dumps(v) if isinstance(v, tuple) else v) for k, v in spec.hparams},
        "extra_params": extra_params,
        "teacher_ids": "+".join(t.run_id for t in spec.teachers),
        "teacher_seeds": "+".join(str(t.seed) for t in spec.teachers),
        "model_kwargs": json.dumps(dict(spec.student_kwargs), sort_keys=True),
        "teacher_cache": bool(cache_build_s),
        "teacher_cache_build_s": sum(cache_build_s),
    })
    if measured.teacher_ensemble_top1 is not None:
        row["teacher_ensemble_top1"] = measured.teacher_ensemble_top1
    if error:
        row.update({"status": DIVERGED, "error": error, "diverged_at_epoch": len(result.history),
                    "top1_last": NAN, "top5_last": NAN, "top1_best": NAN, "top5_best": NAN})
    elif result.history:
        row.update({f"loss.{k}": v for k, v in result.last.losses.items()})
    return row


def teacher_row(ctx: Context, ts: TeacherSpec, *, result: TrainResult, measured: Measurements, trained: bool,
                peak: Any = None) -> dict[str, Any]:
    """A teacher's row: trained by kdbench, or loaded from a checkpoint and evaluated."""
    row = common(ctx, run_id=ts.run_id, kind="teacher", method="teacher", model=ts.model,
                 pair=f"{ts.model}→", recipe=ts.recipe, seed=ts.seed, result=result, measured=measured, peak=peak)
    row.update({"method_paper": "", "teachers": "", "trained_by_kdbench": trained,
                "checkpoint_sha256": ts.checkpoint_sha256,
                "model_kwargs": json.dumps(dict(ts.model_kwargs), sort_keys=True)})
    return row


def summary_line(row: dict[str, Any], label: str) -> str:
    """The line printed when a run finishes."""
    if row.get("status") == DIVERGED:
        return f"{label}: DIVERGED: {row.get('error', '')}"
    return (f"{label}: top-1 {row['top1_last']:.2f} (best {row['top1_best']:.2f} at epoch {row['best_epoch']}), "
            f"{row['train_time_s']:.1f} s" + (f", resumed at epoch {row['resumed_from_epoch']}"
                                               if row.get("resumed_from_epoch") else ""))
