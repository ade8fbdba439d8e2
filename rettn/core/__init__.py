"""Floor 2, the method: ``RettnConfig`` and its schedules, presets, the engine (per-layer state,
statistics, step tracking, observers) and the residual store. Imports only ``rettn.ops`` below it."""

from rettn.core.config import RettnConfig, load_preset, parse_steps, preset_names

__all__ = ["RettnConfig", "load_preset", "parse_steps", "preset_names"]
