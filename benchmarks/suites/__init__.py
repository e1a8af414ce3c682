"""kdbench's built-in suite files (installed as the ``kdbench_suites`` package; see README.md)."""
