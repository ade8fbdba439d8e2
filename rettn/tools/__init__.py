"""Floor 4, the command-line tools: one module per command (``generate``, ``evaluate``,
``profile``), shared argument definitions, model loading, media and metrics. Imports any floor below."""
