"""``rettn profile``: where the time of a generation goes, dense vs rettn. ``command`` (arguments
and the run), ``targets`` (what is timed), ``clocks``, ``runners``, ``summary``, ``kernels``, ``report``."""
