"""Reports derived from result rows: tables, plots (``kdbench report``) and the comparison with
published numbers (``kdbench reproduce``).

Modules, in the order data flows through them: ``rows`` (the store's rows as a frame),
``aggregate`` (benchmarks, table columns, mean ± std), ``markdown`` and ``plots`` (the outputs),
``build`` (the whole report); ``published``, ``reproduce``, ``reproduce_markdown`` and
``reproduce_plot`` (the comparison with a paper).
"""

from .build import build_report
from .reproduce import Cell, check_ordering, compare, write_reproduction
from .rows import load_rows

__all__ = ["Cell", "build_report", "check_ordering", "compare", "load_rows", "write_reproduction"]
