"""A sweep, in the order its data flows: the frozen :class:`Request` (``request``), its hyperparameters
(``hparams``), run specs (``spec``) and the :class:`Plan` (``plan``), the :class:`Runner` that trains
and measures runs (``runner``, ``measure``), their rows (``rows``) in the results store (``store``),
and the :class:`Sweep` that drives it all (``driver``), with the worker processes' task (``worker``)."""

from .driver import Sweep, SweepResult
from .hparams import HParams
from .plan import Plan
from .request import Request
from .spec import RunSpec, TeacherSpec
from .store import ResultsStore

__all__ = ["HParams", "Plan", "Request", "ResultsStore", "RunSpec", "Sweep", "SweepResult", "TeacherSpec"]
