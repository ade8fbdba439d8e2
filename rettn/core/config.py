"""RettnConfig: what runs sparse, when, and how the Re-ttention statistics are used.

Presets live as YAML files in the repository's ``configs/`` folder (packaged as
``rettn.configs``) and load by name: ``RettnConfig.from_preset("cogvideox-2b")``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from fractions import Fraction
from importlib import resources
from pathlib import Path

import torch

from rettn.errors import ConfigError

PATTERNS = ("topk", "window", "frame_window")
RESELECT = ("cache", "step")
BACKEND_CHOICES = (None, "triton", "torch", "flex")
RESIDUAL_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                   "float8_e4m3fn": torch.float8_e4m3fn}  # fp8: with a float32 scale per row (core.residual)
FP8_RESIDUAL = "float8_e4m3fn"
STEP_KINDS = ("dense", "cache", "sparse")
AUTO = "auto"  # warmup / refresh_interval decided at run time from the measured staleness (core.adaptive)
DEFAULT_TOLERANCE = 0.09  # the adaptive schedule's relative-error tolerance when none is given


def _is_int(x) -> bool:
    """Python or numpy integers, not bools."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x) -> bool:
    """A finite real number (NaN and inf would poison every step they touch), not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


# the schedule fields (each a step count or a fraction of the steps) -> their smallest step count
SCHEDULE_FIELDS = {"warmup": 0, "refresh_interval": 1, "dense_final": 0}
_PERCENT = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*%\s*$")
_INT = re.compile(r"^\s*[+-]?[0-9]+\s*$")


def parse_steps(value, field: str = "steps") -> int | float:
    """A schedule value: a step count, or a fraction of the generation's steps, in a form whose
    unit cannot be confused.

    - an int (Python or numpy; not a bool) is a step count: ``1`` is one step;
    - a fraction of the steps is a string such as ``"30%"`` (``"100%"``: every step), a
      :class:`fractions.Fraction`, or a float strictly between 0 and 1 (``0.3``); ``0.0`` is zero
      steps either way and is taken;
    - a float that is a whole number (``1.0``, ``2.0``) is ambiguous and a :class:`ConfigError`;
    - a string of digits (``"5"``) or of a float (``"0.3"``) follows the rules of the number.

    Returns an int for a step count, a float in [0, 1] for a fraction (``"30%"`` gives exactly
    ``0.3``, so it resolves against the number of steps as ``0.3`` did). ``field`` names the value
    in errors; for a field of :data:`SCHEDULE_FIELDS` its smallest value is checked too
    (``refresh_interval``: 1 step, or a fraction above 0).
    """
    least = SCHEDULE_FIELDS.get(field, 0)
    floats = "[0, 1)" if least == 0 else "(0, 1)"

    def bad():
        return ConfigError(
            f"{field} must be a step count (int >= {least}) or a fraction of the steps ('30%' up to "
            f"'100%', Fraction(3, 10), or a float in {floats}), got {value!r}"
        )

    def fraction(f: Fraction) -> float:
        if f < 0 or f > 1 or (least > 0 and f == 0):
            raise bad()
        return float(f)

    x = value
    if isinstance(x, str):
        m = _PERCENT.match(x)
        if m:
            return fraction(Fraction(m.group(1)) / 100)
        if _INT.match(x):
            x = int(x)
        else:
            try:
                x = float(x)
            except ValueError:
                raise bad() from None
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise bad()
    if _is_int(x):
        if x < least:
            raise bad()
        return int(x)
    if isinstance(x, numbers.Rational):  # Fraction: always a fraction of the steps
        return fraction(Fraction(x))
    x = float(x)
    if not math.isfinite(x):
        raise bad()
    if x.is_integer() and x >= 1:
        n = int(x)
        fractions = "'30%', Fraction(3, 10) or a float between 0 and 1"
        raise ConfigError(
            f"{field}={value!r} is ambiguous (one step, or every step?): write {field}=1 for one step, "
            f"or {field}='100%' for every step (other fractions of the steps: {fractions})"
            if n == 1 else
            f"{field}={value!r} is ambiguous (a float, but a whole number): write {field}={n} for {n} "
            f"steps (a fraction of the steps is written {fractions}; '100%' is every step)"
        )
    if x == 0 and least == 0:
        return 0.0
    if not 0 < x < 1:
        raise bad()
    return x


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value) -> int | None:
    """An int of bytes, or a string such as ``"8GB"`` / ``"512MiB"``; None means no limit."""
    if value is None:
        return None
    if _is_int(value):
        if value < 0:
            raise ConfigError(f"max_cache_bytes must be >= 0, got {value}")
        return int(value)
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    raise ConfigError(
        f"max_cache_bytes must be a byte count or a size such as '8GB' or '512MiB', got {value!r}"
    )


@dataclass
class RettnConfig:
    """How rettn sparsifies a diffusion transformer's attention.

    Sparsity
        keep: fraction of key blocks each query block keeps, in (0, 1] (paper: 0.03125-0.0625).
        pattern: ``"topk"`` (dynamic, per head, from pooled Q/K), ``"window"`` (the paper's 1-D
            band, images) or ``"frame_window"`` (the paper's in-frame window + same positions in
            every frame, video; needs the model's token grid).
        block_size: tokens per block (128 on GPUs; the torch path takes any size).
        dense_conditioning: keep text/conditioning tokens' rows and columns dense in joint
            attention (CogVideoX, Flux, HunyuanVideo).
        reselect: when top-k blocks are chosen: ``"cache"`` (at each cache step, reused by the
            sparse steps after it, so the cached rho and R describe exactly the blocks used) or
            ``"step"`` (fresh at every sparse step).

    Schedule (each a step count, an int, or a fraction of the number of steps: ``"30%"``,
    ``Fraction(3, 10)`` or a float strictly between 0 and 1; a whole-number float such as ``1.0``
    is ambiguous and an error, see :func:`parse_steps`; fractions are stored as floats)
        warmup: leading dense steps. refresh_interval: a cache step every N steps after warm-up
            (the first step after warm-up is a cache step); steps in between are sparse.
        dense_final: trailing dense steps. Paper: PixArt 20 steps -> warmup 5, interval 5;
            CogVideoX 50 steps -> warmup 15, interval 5.
        num_inference_steps: only needed for fractions or dense_final when rettn is applied to a
            bare transformer (with a pipeline it is read from the pipeline's scheduler).
        ``warmup="auto"`` / ``refresh_interval="auto"``: decided at run time from the measured
            staleness of the cached statistics (:mod:`rettn.core.adaptive`): warm-up ends once
            one-step-old statistics stay under ``tolerance``, and the interval follows the error
            measured at each refresh (the longest whose extrapolated error stays within it).
        tolerance: the adaptive schedule's tolerance on the relative L2 error of the stale
            statistics' output against the dense output at a cache step (default 0.09 when a field
            is ``"auto"``; an error when none is).

    Statistics (use_rho and use_residual both False = plain sparse attention; use_residual only
    = DiTFastAttn-style window + residual sharing; both = Re-ttention)
        ramp: the paper's lambda: rho grows by ``ramp`` after each sparse step (paper 0.04).
        clamp_rho: keep the ramped rho in (0, 1] (the paper's code does not clamp).

    Which attention runs sparse
        sparse_cross_attention: also sparsify cross-attention (top-k only); default dense.
        skip_layers: indices (in model order) of self-attention layers that stay dense.
        min_seq_len: layers whose sequence is shorter stay dense (sparse does not pay there).

    Memory and kernels
        residual_dtype: dtype of the cached R (``None`` = the attention's dtype);
            ``"float8_e4m3fn"`` stores R in fp8 with a float32 scale per row (about half of bf16's
            bytes; measure its quality cost with ``rettn calibrate``).
        residual_device: ``None`` (next to the activations) or ``"cpu"`` (offload).
        layer_residual: per-layer R, ``{layer index: residual_dtype name or "none"}`` (``"none"``:
            no R for that layer, rho only); other layers follow ``residual_dtype`` and
            ``use_residual``. ``rettn calibrate`` writes it to fit a memory budget.
        max_cache_bytes: budget for cached rho + R; exceeding it is an error at the start of a
            generation (before any step runs sparse), naming the bytes needed.
        backend: kernel backend for sparse attention (``None`` = auto).
        check_finite: after each transformer call, raise ``FloatingPointError`` if an attention
            output rettn computed holds NaN or inf, naming the layers and step (one device sync
            per call); False skips the check.
        fallback_when_slower: rettn times a few dense and sparse-step attention calls per call
            shape; where a sparse step is measured slower than the dense call it replaces (it
            always warns and ``handle.stats()`` says so), run that shape's later sparse and cache
            calls dense. Default False (warn only).
    """

    keep: float = 0.0625
    pattern: str = "topk"
    block_size: int = 128
    dense_conditioning: bool = True
    reselect: str = "cache"
    warmup: int | float | str = 0.3
    refresh_interval: int | float | str = 5
    dense_final: int | float | str = 0
    tolerance: float | None = None
    num_inference_steps: int | None = None
    ramp: float = 0.04
    clamp_rho: bool = True
    use_rho: bool = True
    use_residual: bool = True
    sparse_cross_attention: bool = False
    skip_layers: list[int] = field(default_factory=list)
    min_seq_len: int = 1024
    residual_dtype: str | None = None
    residual_device: str | None = None
    layer_residual: dict[int, str] = field(default_factory=dict)
    max_cache_bytes: int | str | None = None
    backend: str | None = None
    check_finite: bool = True
    fallback_when_slower: bool = False

    def __post_init__(self):
        if not _is_number(self.keep) or not 0 < self.keep <= 1:
            raise ConfigError(f"keep must be a fraction in (0, 1], got {self.keep!r}")
        self.keep = float(self.keep)
        if self.pattern not in PATTERNS:
            raise ConfigError(f"pattern must be one of {PATTERNS}, got {self.pattern!r}")
        if not _is_int(self.block_size) or self.block_size <= 0:
            raise ConfigError(f"block_size must be a positive integer, got {self.block_size!r}")
        self.block_size = int(self.block_size)
        if self.reselect not in RESELECT:
            raise ConfigError(f"reselect must be one of {RESELECT}, got {self.reselect!r}")
        for name in SCHEDULE_FIELDS:  # int: a step count; float in [0, 1]: a fraction of the steps
            value = getattr(self, name)
            if not (name != "dense_final" and isinstance(value, str) and value.strip().lower() == AUTO):
                setattr(self, name, parse_steps(value, name))
            else:
                setattr(self, name, AUTO)
        self._check_auto()
        n = self.num_inference_steps
        if n is not None and (not _is_int(n) or n <= 0):
            raise ConfigError(f"num_inference_steps must be a positive integer or None, got {n!r}")
        self.num_inference_steps = None if n is None else int(n)
        if not _is_number(self.ramp) or self.ramp < 0:
            raise ConfigError(f"ramp (the paper's lambda) must be a finite number >= 0, got {self.ramp!r}")
        self.ramp = float(self.ramp)
        for name in ("dense_conditioning", "clamp_rho", "use_rho", "use_residual", "sparse_cross_attention",
                     "check_finite", "fallback_when_slower"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.sparse_cross_attention and self.pattern != "topk":
            raise ConfigError("sparse_cross_attention needs pattern='topk' (windows are for self-attention)")
        if not isinstance(self.skip_layers, (list, tuple)) or not all(
            _is_int(i) and i >= 0 for i in self.skip_layers
        ):
            raise ConfigError(f"skip_layers must be a list of layer indices >= 0, got {self.skip_layers!r}")
        self.skip_layers = [int(i) for i in self.skip_layers]
        if not _is_int(self.min_seq_len) or self.min_seq_len < 0:
            raise ConfigError(f"min_seq_len must be an integer >= 0, got {self.min_seq_len!r}")
        self.min_seq_len = int(self.min_seq_len)
        if self.residual_dtype is not None and self.residual_dtype not in RESIDUAL_DTYPES:
            raise ConfigError(
                f"residual_dtype must be one of {sorted(RESIDUAL_DTYPES)} or None, got {self.residual_dtype!r}"
            )
        if not isinstance(self.layer_residual, dict) or not all(
            _is_int(i) and i >= 0 and (r == "none" or r in RESIDUAL_DTYPES) for i, r in self.layer_residual.items()
        ):
            raise ConfigError(f"layer_residual must map layer indices >= 0 to one of {sorted(RESIDUAL_DTYPES)} "
                              f"or 'none', got {self.layer_residual!r}")
        self.layer_residual = {int(i): r for i, r in self.layer_residual.items()}
        if self.residual_device not in (None, "cpu"):
            raise ConfigError(f"residual_device must be None or 'cpu', got {self.residual_device!r}")
        self.max_cache_bytes = parse_bytes(self.max_cache_bytes)
        if self.backend not in BACKEND_CHOICES:
            raise ConfigError(f"backend must be one of {BACKEND_CHOICES}, got {self.backend!r}")

    def _check_auto(self):
        auto = [n for n in ("warmup", "refresh_interval") if getattr(self, n) == AUTO]
        t = self.tolerance
        if t is not None and (not _is_number(t) or t <= 0):
            raise ConfigError(f"tolerance must be a positive number (a relative error, e.g. 0.1), got {t!r}")
        if t is not None and not auto:
            raise ConfigError(f"tolerance={t!r} has no meaning without warmup='auto' or refresh_interval='auto' "
                              f"(the schedule is fixed: warmup={self.warmup!r}, refresh_interval="
                              f"{self.refresh_interval!r})")
        if not auto:
            return
        self.tolerance = DEFAULT_TOLERANCE if t is None else float(t)
        if self.warmup == AUTO and self.refresh_interval in (1, 1.0):
            raise ConfigError("refresh_interval=1 with warmup='auto' has no meaning: after the adaptive warm-up "
                              "every step would be a cache step (slower than dense); use refresh_interval='auto' "
                              "or a count >= 2")
        if not (self.use_rho or self.use_residual):
            raise ConfigError(f"{' and '.join(f'{n}=' + repr(AUTO) for n in auto)} needs cached statistics to "
                              "measure: use_rho and use_residual are both False (plain sparse attention has "
                              "nothing that goes stale); set a fixed schedule")

    @property
    def is_auto(self) -> bool:
        """Is the schedule decided at run time (``warmup`` or ``refresh_interval`` is "auto")?"""
        return AUTO in (self.warmup, self.refresh_interval)

    # ----------------------------------------------------------------- construction
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict) -> "RettnConfig":
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ConfigError(f"unknown RettnConfig field(s) {unknown}; allowed: {cls.field_names()}")
        return cls(**values)

    @classmethod
    def from_preset(cls, name, **overrides) -> "RettnConfig":
        """Load ``configs/presets/<name>.yaml`` (or a preset file: a path ending in ``.yaml``)
        and apply keyword overrides."""
        values = load_preset(name)["config"]
        values.update(overrides)
        return cls.from_dict(values)

    def replace(self, **changes) -> "RettnConfig":
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise ConfigError(f"unknown RettnConfig field(s) {unknown}; allowed: {self.field_names()}")
        # a kept fraction is passed on as a Fraction (exactly the same float once parsed): "100%"
        # is kept as 1.0, which a float argument would spell ambiguously
        kept = {name: Fraction(v) for name in SCHEDULE_FIELDS if name not in changes
                for v in [getattr(self, name)] if isinstance(v, float)}
        if "tolerance" not in changes and not any(
                changes.get(n, getattr(self, n)) == AUTO for n in ("warmup", "refresh_interval")):
            kept["tolerance"] = None  # the changes fix the schedule: the adaptive tolerance goes with "auto"
        return dataclasses.replace(self, **kept, **changes)

    # ----------------------------------------------------------------- schedule
    def _steps(self, value, n: int) -> int:
        return int(round(value * n)) if isinstance(value, float) else int(value)

    def needs_num_steps(self) -> bool:
        fields = (self.warmup, self.refresh_interval, self.dense_final)
        return any(isinstance(v, float) for v in fields) or self.dense_final != 0

    def schedule(self, num_steps: int | None) -> "Schedule":
        """The step kinds for a generation of ``num_steps`` steps (a fixed schedule: an adaptive
        one is decided as the generation runs, :class:`rettn.core.adaptive.AutoSchedule`)."""
        if self.is_auto:
            raise ConfigError("this schedule is adaptive (warmup or refresh_interval is 'auto'): its steps are "
                              "decided as the generation runs (handle.stats().kinds() says what it did)")
        if num_steps is None:
            if self.needs_num_steps():
                raise ConfigError(
                    "the schedule uses fractions or dense_final, so it needs the number of steps: "
                    "apply rettn to the pipeline (not the bare transformer), or set "
                    "RettnConfig(num_inference_steps=N) / handle.set_num_inference_steps(N)"
                )
            return Schedule(self._steps(self.warmup, 1), max(1, self._steps(self.refresh_interval, 1)), None)
        warmup = self._steps(self.warmup, num_steps)
        interval = max(1, self._steps(self.refresh_interval, num_steps))
        final = self._steps(self.dense_final, num_steps)
        return Schedule(warmup, interval, num_steps - final)


@dataclass(frozen=True)
class Schedule:
    """Resolved schedule: dense below ``warmup`` and from ``dense_from`` on; a cache step at
    ``warmup``, ``warmup + interval``, ...; sparse steps in between."""

    warmup: int
    interval: int
    dense_from: int | None

    def kind(self, step: int) -> str:
        if step < self.warmup or (self.dense_from is not None and step >= self.dense_from):
            return "dense"
        return "cache" if (step - self.warmup) % self.interval == 0 else "sparse"

    def last_cache_step(self, step: int) -> int:
        return self.warmup + ((step - self.warmup) // self.interval) * self.interval

    def kinds(self, num_steps: int) -> list[str]:
        return [self.kind(i) for i in range(num_steps)]


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in resources.files("rettn.configs.presets").iterdir()
                  if p.name.endswith(".yaml"))


def load_preset(name: str) -> dict:
    """The parsed preset file: ``{"config": {...}, "family": ..., "tuned": ..., "notes": ...}``."""
    import yaml

    if isinstance(name, os.PathLike) or (isinstance(name, str) and name.endswith((".yaml", ".yml"))):
        path = Path(name)  # a preset file of the user's (rettn calibrate writes them)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read preset file '{path}': {e.strerror or e}") from None
    elif not isinstance(name, str) or name not in preset_names():
        raise ConfigError(f"unknown preset {name!r}; available presets: {preset_names()} "
                          "(or a path to a preset file ending in .yaml)")
    else:
        text = resources.files("rettn.configs.presets").joinpath(f"{name}.yaml").read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"preset {name!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"preset {name!r} must be a mapping with a 'config' mapping")
    if "config" not in data or not isinstance(data["config"], dict):
        raise ConfigError(f"preset {name!r} has no 'config' mapping")
    return data
