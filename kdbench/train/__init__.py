"""Training: how the engine computes (:mod:`.options`), one step (:mod:`.step`), epoch checkpoints
(:mod:`.checkpoint`), the loop and evaluation (:mod:`.engine`), and the teacher-output cache
(:mod:`.teacher_cache`)."""

from .engine import (
    Diverged,
    EpochLog,
    TrainResult,
    evaluate,
    make_optimizer,
    predict,
    train,
)
from .options import PRECISIONS, EngineOptions, as_fp32, freeze
from .step import TrainStep, apply_max_norm
from .teacher_cache import ViewCache, build_view_cache, cacheable

__all__ = [
    "Diverged", "EpochLog", "TrainResult", "apply_max_norm", "evaluate", "make_optimizer", "predict", "train",
    "TrainStep", "PRECISIONS", "EngineOptions", "as_fp32", "freeze", "ViewCache", "build_view_cache", "cacheable",
]
