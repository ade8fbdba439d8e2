"""rettn's version (one place: the package, the profiler's report and pyproject agree)."""

__version__ = "0.1.0"
