"""The row schema: what one finished run writes into the results store, field by field.

A row is a flat JSON object (``runs/<run_id>.json``). Student and teacher runs share the common
fields; each kind adds its own. The report reads rows back through the store
(:meth:`kdbench.sweep.store.ResultsStore.rows`) and derives every table and plot from them.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from typing import Any

from .. import provenance
from ..executors.base import DIVERGED, OK
from ..recipe import Recipe
from ..ensemble import ensemble_text
from ..suites import pair_label
from ..train import EngineOptions, TrainResult
from ..train.options import tf32_flags
from .columns import Col
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
    # The resolution the runs trained and were evaluated at: the images' side in pixels, and how they were resized
    # to it (crop fraction, interpolation; '' when they are as stored).
    image_size: int = 0
    crop_pct: float = 1.0
    interpolation: str = ""
    data_backend: str = "memory"  # where the images were while training: memory or stream (kdbench.data.stream)


def common(ctx: Context, *, run_id: str, kind: str, method: str, model: str, pair: str, recipe: Recipe,
           seed: int, result: TrainResult, measured: Measurements, peak: Any) -> dict[str, Any]:
    """The fields every row has: the spec, accuracy, size, speed, the training log, provenance."""
    ok = evaluated(result)
    tf32 = tf32_flags(ctx.device_type)
    return {
        Col.RUN_ID: run_id, Col.KIND: kind, Col.METHOD: method, Col.STUDENT: model, Col.PAIR: pair,
        Col.DATASET: ctx.dataset, Col.DATASET_SOURCE: ctx.dataset_source, Col.REAL_DATA: ctx.real_data,
        Col.TRAIN_SIZE: ctx.train_size, Col.TEST_SIZE: ctx.test_size,
        Col.IMAGE_SIZE: ctx.image_size, Col.CROP_PCT: ctx.crop_pct, Col.INTERPOLATION: ctx.interpolation,
        Col.DATA_BACKEND: ctx.data_backend,
        Col.RECIPE: recipe.name, Col.EPOCHS: recipe.epochs, Col.RECIPE_EPOCHS: recipe.full_epochs,
        Col.SHORTENED: recipe.shortened, Col.SCHEDULE: recipe.label, Col.RECIPE_CONFIG: json.dumps(recipe.to_dict()),
        Col.SEED: seed,
        Col.STATUS: OK,
        Col.TOP1_LAST: result.last.top1 if ok else NAN, Col.TOP5_LAST: result.last.top5 if ok else NAN,
        Col.TOP1_BEST: result.best_top1 if ok else NAN, Col.TOP5_BEST: result.best_top5 if ok else NAN,
        Col.BEST_EPOCH: result.best_epoch,
        Col.AGREEMENT: measured.agreement,
        Col.PARAMS: measured.params, Col.EXTRA_PARAMS: 0,
        **measured.costs,
        Col.TRAIN_TIME: result.train_time_s, Col.EVAL_TIME: result.eval_time_s,
        Col.CHECKPOINT_TIME: result.checkpoint_time_s, Col.RESUMED_FROM: result.resumed_from,
        Col.WORLD_SIZE: ctx.world_size,
        Col.PEAK_MEM: peak.mb if peak else NAN, Col.PEAK_MEM_KIND: peak.kind if peak else "",
        Col.PEAK_MEM_RUN: peak.run_mb if peak else NAN,
        Col.FLUSH_DENORMAL: ctx.device_type == "cpu",
        Col.PRECISION: ctx.options.precision, Col.CHANNELS_LAST: ctx.options.channels_last,
        Col.TF32_CONV: tf32[Col.TF32_CONV], Col.TF32_MATMUL: tf32[Col.TF32_MATMUL],  # as the run set them
        Col.COMPILED: ctx.options.compile and not result.compile_error, Col.COMPILE_ERROR: result.compile_error,
        **epoch_time_columns(result),
        Col.HISTORY_TOP1: json.dumps([round(h.top1, 4) for h in result.history]),
        Col.HISTORY_LOSS: json.dumps([{k: round(v, 6) for k, v in h.losses.items()} for h in result.history]),
        **validation_columns(recipe, result, ok),
        **{f"{Col.CLASS_PREFIX}{k}.{i}": v for k, vals in measured.per_class.items() for i, v in enumerate(vals)},
        Col.TEST_ERRORS: measured.test_errors,
        **{f"{Col.CLASS_ERRORS}.{i}": n for i, n in enumerate(measured.class_errors)},
        **ctx.provenance,
        Col.FINISHED_AT: provenance.now(),
    }


def epoch_time_columns(result: TrainResult) -> dict[str, float]:
    """The run's first epoch's training time and the median of its steady-state epochs' (NaN where unknown:
    an evaluated checkpoint, a one-epoch run, epochs from a checkpoint of an older version), and the time its
    steps spent compiling."""
    first = result.epoch_train_s.get(0)
    steady = [t for epoch, t in result.epoch_train_s.items() if epoch not in result.warm_up_epochs]
    return {Col.FIRST_EPOCH_TIME: NAN if first is None else first,
            Col.EPOCH_TIME: statistics.median(steady) if steady else NAN,
            Col.COMPILE_TIME: result.compile_time_s}


def validation_columns(recipe: Recipe, result: TrainResult, ok: bool) -> dict[str, Any]:
    """The validation split's settings, and its results (NaN and '' for a run without one)."""
    val = result.val_best_epoch is not None

    def number(x: float | None) -> float:
        return x if val and x is not None else NAN

    return {
        Col.VAL_FRACTION: recipe.val_fraction, Col.EARLY_STOP: recipe.early_stop,
        Col.HISTORY_VAL_TOP1: json.dumps([round(h.val_top1, 4) for h in result.history]) if val else "",
        Col.VAL_BEST_EPOCH: number(result.val_best_epoch), Col.VAL_TOP1_BEST: number(result.val_best_top1),
        Col.TOP1_VAL_BEST: number(result.top1_val_best) if ok else NAN,
        Col.TOP5_VAL_BEST: number(result.top5_val_best) if ok else NAN,
        Col.STOPPED_AT: number(result.stopped_epoch),
    }


def student_row(ctx: Context, spec: RunSpec, *, paper: str, extra_params: int, result: TrainResult,
                measured: Measurements, peak: Any, cache_build_s: list[float], error: str = "") -> dict[str, Any]:
    """A student run's row; ``error`` names why a diverged run stopped."""
    row = common(ctx, run_id=spec.run_id, kind="student", method=spec.method, model=spec.student, pair=spec.pair,
                 recipe=spec.recipe, seed=spec.seed, result=result, measured=measured, peak=peak)
    row.update({
        Col.METHOD_PAPER: paper,
        Col.METHOD_SOURCE: spec.method_source,
        Col.TEACHERS: "+".join(spec.teacher_names),
        Col.HPARAMS: json.dumps(dict(spec.hparams), sort_keys=True, default=str),
        **{f"{Col.HP_PREFIX}{k}": (json.dumps(v) if isinstance(v, tuple) else v) for k, v in spec.hparams},
        Col.EXTRA_PARAMS: extra_params,
        Col.INIT_EPOCHS: result.init_epochs,
        Col.HISTORY_INIT_LOSS: json.dumps([{k: round(v, 6) for k, v in h.items()} for h in result.init_losses]),
        Col.METHOD_STATE_MB: result.method_state_bytes / 2**20,
        Col.TEACHER_IDS: "+".join(t.run_id for t in spec.teachers),
        Col.TEACHER_SEEDS: "+".join(str(t.seed) for t in spec.teachers),
        Col.MODEL_KWARGS: json.dumps(dict(spec.student_kwargs), sort_keys=True),
        Col.TEACHER_CACHE: bool(cache_build_s),
        Col.TEACHER_CACHE_BUILD: sum(cache_build_s),
        Col.WEIGHTS: spec.student_weights,
    })
    if spec.ensemble:
        row.update({Col.ENSEMBLE: ensemble_text(spec.ensemble), Col.MEMBER: spec.member,
                    Col.MEMBER_SEED: spec.train_seed})
    if measured.teacher_ensemble_top1 is not None:
        row["teacher_ensemble_top1"] = measured.teacher_ensemble_top1
    if error:
        row.update({Col.STATUS: DIVERGED, Col.ERROR: error, Col.DIVERGED_AT: len(result.history),
                    Col.TOP1_LAST: NAN, Col.TOP5_LAST: NAN, Col.TOP1_BEST: NAN, Col.TOP5_BEST: NAN,
                    Col.TOP1_VAL_BEST: NAN, Col.TOP5_VAL_BEST: NAN})
    elif result.history:
        row.update({f"{Col.LOSS_PREFIX}{k}": v for k, v in result.last.losses.items()})
    return row


def teacher_row(ctx: Context, ts: TeacherSpec, *, result: TrainResult, measured: Measurements, trained: bool,
                peak: Any = None) -> dict[str, Any]:
    """A teacher's row: trained by kdbench, or loaded from a checkpoint and evaluated."""
    row = common(ctx, run_id=ts.run_id, kind="teacher", method="teacher", model=ts.model,
                 pair=pair_label((ts.model,), ""), recipe=ts.recipe, seed=ts.seed, result=result, measured=measured, peak=peak)
    row.update({Col.METHOD_PAPER: "", Col.TEACHERS: "", Col.TRAINED_BY_KDBENCH: trained,
                Col.CHECKPOINT_SHA256: ts.checkpoint_sha256, Col.WEIGHTS: ts.weights,
                Col.MODEL_KWARGS: json.dumps(dict(ts.model_kwargs), sort_keys=True)})
    return row


def summary_line(row: dict[str, Any], label: str) -> str:
    """The line printed when a run finishes."""
    if row.get(Col.STATUS) == DIVERGED:
        return f"{label}: DIVERGED: {row.get(Col.ERROR, '')}"
    return (f"{label}: top-1 {row[Col.TOP1_LAST]:.2f} (best {row[Col.TOP1_BEST]:.2f} at epoch {row[Col.BEST_EPOCH]}), "
            f"{row[Col.TRAIN_TIME]:.1f} s" + (f", resumed at epoch {row[Col.RESUMED_FROM]}"
                                               if row.get(Col.RESUMED_FROM) else ""))
