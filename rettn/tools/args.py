"""What the commands share: argument types, the sparsity/schedule flags generated from
:class:`~rettn.core.config.RettnConfig`'s fields, device / backend / output checks, prompt files,
JSON output and the one-line error report (exit code 2)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from pathlib import Path

import torch

from rettn.core import config as config_module
from rettn.core.config import RettnConfig
from rettn.errors import RettnError, UsageError

EXIT_USAGE = 2
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CLIError(UsageError):
    """A user-facing error of a command: printed as one line, exit code 2."""


# ---------------------------------------------------------------------------------- the parser
class HelpFormatter(argparse.HelpFormatter):
    """argparse's help, with each option's default appended where it has one (not None, not an
    on/off switch) and its help does not already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if not action.option_strings or default is None or default is argparse.SUPPRESS or \
                isinstance(default, bool) or "default" in text:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class Parser(argparse.ArgumentParser):
    """The parser of ``rettn`` and, through ``add_subparsers``, of each command: a usage error
    is one line ``rettn: error: <message> (see rettn <command> --help)`` on stderr and exit code 2,
    the format of rettn's own errors (:func:`report_errors`)."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message):
        self.exit(EXIT_USAGE, f"rettn: error: {' '.join(message.split())} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------------- value types
def _int(text: str, low: int, high: int | None, expected: str) -> int:
    """``text`` as an int in [low, high) (no upper bound when ``high`` is None), else an
    argparse error saying what was ``expected``."""
    try:
        v = int(text)
    except ValueError:
        v = None
    if v is None or v < low or (high is not None and v >= high):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return v


def positive_int(text: str) -> int:
    return _int(text, 1, None, "a positive integer")


def nonneg_int(text: str) -> int:
    return _int(text, 0, None, "an integer >= 0")


def seed(text: str) -> int:
    """A random seed: an integer in [0, 2**63) (torch's generators take up to 2**64 - 1; the
    margin leaves room for ``seed + line``)."""
    return _int(text, 0, 2**63, "a seed, an integer from 0 to 2**63 - 1")


def _finite(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def positive_float(text: str) -> float:
    v = _finite(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return v


def nonneg_float(text: str) -> float:
    v = _finite(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return v


def fraction(text: str) -> float:
    """A keep ratio: a fraction in (0, 1]."""
    v = _finite(text)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return v


def step_fraction(text: str) -> float:
    """A share of the denoising steps: a fraction in [0, 1)."""
    v = _finite(text)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction of the steps in [0, 1), got {text!r}")
    return v


_PERCENT = re.compile(r"^\s*[0-9]*\.?[0-9]+\s*%\s*$")


def schedule_value(text: str):
    """A schedule value as typed: ``"12"`` -> 12 steps, ``"0.3"`` -> the fraction 0.3, ``"30%"`` ->
    the string ``"30%"``, ``"auto"`` -> ``"auto"`` (passed on: :class:`RettnConfig` decides what it
    accepts)."""
    if text.strip().lower() == "auto":
        return "auto"
    if _PERCENT.match(text):
        return text.strip()
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step count, a fraction or auto, got {text!r} "
                                         "(e.g. 12, 0.3, 30% or auto)") from None


# ---------------------------------------------------------------------------------- config flags
# Per-field help; a field not listed here takes the first sentence of RettnConfig's docstring.
CONFIG_HELP = {
    "keep": "fraction of key blocks kept per query block, (0, 1]",
    "pattern": "block pattern: topk (dynamic, per head), window (1-D band) or frame_window (video)",
    "block_size": "tokens per block",
    "reselect": "when top-k blocks are chosen: at each cache step, or at every sparse step",
    "warmup": "leading dense steps: a step count (12), a fraction of the steps (0.3), a percentage (30%%), "
              "or auto (until the cached statistics settle under --tolerance)",
    "refresh_interval": "a cache step every N steps after warm-up: a count, a fraction, a percentage, or auto "
                        "(follows the staleness measured at each cache step)",
    "tolerance": "the adaptive schedule's tolerance on the relative error of stale statistics (default 0.09; "
                 "with warmup or refresh-interval auto)",
    "dense_final": "trailing dense steps: a count, a fraction or a percentage",
    "ramp": "the paper's lambda: rho grows by this after each sparse step (default 0.04)",
    "use_rho": "do not rescale by rho (residual only: DiTFastAttn-style)",
    "use_residual": "do not add the cached residual R",
    "min_seq_len": "layers whose sequence is shorter stay dense",
    "residual_dtype": "dtype of the cached R (default: the attention's)",
    "backend": "sparse attention kernel (default: auto)",
    "fallback_when_slower": "run a call shape dense where its sparse steps are measured slower than dense "
                            "(rettn always warns there)",
}
# The argument type of a field where its annotation's default (below) is not the one.
CONFIG_TYPES = {"block_size": positive_int}
CONFIG_CHOICES = {
    "pattern": config_module.PATTERNS, "reselect": config_module.RESELECT,
    "backend": tuple(b for b in config_module.BACKEND_CHOICES if b is not None),
    "residual_dtype": tuple(config_module.RESIDUAL_DTYPES), "residual_device": ("cpu",),
}
# A bool field whose default is True is switched off by --no-<name>; these have shorter names.
CONFIG_FLAG_NAMES = {"use_rho": "--no-rho", "use_residual": "--no-residual"}
# Annotation (as written in RettnConfig) -> argument type; None: no flag (set another way).
_TYPES = {"float": float, "int": nonneg_int, "int | float": schedule_value, "int | float | str": schedule_value, "str": str, "str | None": str,
          "int | str | None": str, "float | None": float, "list[int]": nonneg_int, "int | None": None, "bool": bool}

# Which fields each command exposes (dataclass order is the order of --help).
GENERATE_FIELDS = ("keep", "pattern", "block_size", "reselect", "warmup", "refresh_interval", "dense_final",
                   "tolerance", "ramp",
                   "use_rho", "use_residual", "min_seq_len", "residual_dtype", "backend",
                   "fallback_when_slower")
PROFILE_FIELDS = ("keep", "pattern", "block_size", "reselect", "warmup", "refresh_interval", "dense_final",
                  "tolerance", "min_seq_len", "backend")
EVAL_FIELDS = ("block_size", "reselect", "warmup", "refresh_interval", "dense_final", "min_seq_len", "backend")


def _doc_help(name: str) -> str:
    m = re.search(rf"\b{name}: (.+?)(?:\.\s|\n\s*\n|$)", RettnConfig.__doc__ or "", re.S)
    return " ".join(m.group(1).split()).replace("%", "%%") if m else name


@dataclasses.dataclass(frozen=True)
class ConfigFlag:
    """One command-line flag of a RettnConfig field: ``--keep`` sets ``keep``, ``--no-rho`` sets
    ``use_rho=False``. The parsed value lands in ``args.<field>`` (None: not given)."""

    field: str
    flag: str
    kwargs: dict


def config_flag(name: str) -> ConfigFlag:
    """The flag of RettnConfig field ``name``, generated from the field's annotation and default."""
    fields = {f.name: f for f in dataclasses.fields(RettnConfig)}
    if name not in fields:
        raise KeyError(f"RettnConfig has no field {name!r}")
    f = fields[name]
    annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    kind = _TYPES.get(annotation)
    if kind is None:
        raise KeyError(f"RettnConfig.{name} ({annotation}) has no command-line flag")
    text = CONFIG_HELP.get(name) or _doc_help(name)
    kw: dict = {"dest": name, "default": None, "help": text}
    if kind is bool:
        on = f.default is not True
        flag = CONFIG_FLAG_NAMES.get(name) or ("--" if on else "--no-") + name.replace("_", "-")
        kw.update(action="store_const", const=on)
    else:
        flag = CONFIG_FLAG_NAMES.get(name) or "--" + name.replace("_", "-")
        if name in CONFIG_CHOICES:
            kw["choices"] = list(CONFIG_CHOICES[name])
        else:
            kw["type"] = CONFIG_TYPES.get(name, kind)
        if annotation.startswith("list["):
            kw["nargs"] = "+"
    return ConfigFlag(name, flag, kw)


def add_run_flags(parser) -> None:
    """``--device`` and ``--no-progress``, as every command that runs a pipeline has them."""
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_config_flags(parser, fields, title: str = "sparsity and schedule (override the preset)"):
    """Add the flags of ``fields`` (RettnConfig field names) to ``parser`` in a group; returns it."""
    group = parser.add_argument_group(title)
    for name in fields:
        spec = config_flag(name)
        group.add_argument(spec.flag, **spec.kwargs)
    return group


def config_overrides(args, fields) -> dict:
    """``{field: value}`` of the config flags given on the command line."""
    return {name: getattr(args, name) for name in fields if getattr(args, name, None) is not None}


def flags_used(args, fields) -> list[str]:
    """The config flags given, as the user typed them (``--keep``, ``--no-rho``)."""
    return [config_flag(name).flag for name in config_overrides(args, fields)]


def check_config_flags(args, fields) -> None:
    """Each given value against RettnConfig's own rule for its field (its message as it is),
    before anything loads; the combination is checked when the config is built on its preset."""
    given = config_overrides(args, fields)
    for name, value in given.items():  # a tolerance alone: its own range (with "auto" it has a meaning)
        RettnConfig.from_dict({name: value, **({"refresh_interval": "auto"} if name == "tolerance" else {})})
    if "warmup" in given and "refresh_interval" in given:  # warmup auto with refresh_interval 1
        RettnConfig.from_dict({n: given[n] for n in ("warmup", "refresh_interval")})


def build_config(args, fields, preset: str | None) -> RettnConfig:
    """RettnConfig of ``preset`` (None: the defaults) with the config flags given."""
    overrides = config_overrides(args, fields)
    if preset is None:
        return RettnConfig.from_dict(overrides)
    return RettnConfig.from_preset(preset, **overrides)


# ---------------------------------------------------------------------------------- checks
def device(name: str | None) -> torch.device:
    """``--device``: cpu or cuda (None: cuda when available)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise CLIError(f"unknown device {name!r}; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was asked for, but torch sees no CUDA GPU on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise CLIError(f"unsupported device {name!r}; use cpu or cuda")
    return dev


def dtype(name: str | None, dev: torch.device) -> torch.dtype:
    """``--dtype``: the named dtype, else bfloat16 on CUDA and float32 on CPU."""
    if name:
        return DTYPES[name]
    return torch.bfloat16 if dev.type == "cuda" else torch.float32


def check_backend(backend: str | None, dev: torch.device, source: str = "--backend triton") -> None:
    """Fail before anything runs when the Triton backend cannot run on ``dev``: the same rule as
    the Triton kernel's own (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), told in
    terms of the command's flags."""
    if backend != "triton":
        return
    from rettn.ops.attention import triton_installed

    if not triton_installed():
        raise CLIError(f"{source} needs the triton package (pip install triton); or use --backend torch or flex")
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if dev.type != "cuda" and not (interpreting and dev.type == "cpu"):
        raise CLIError(f"{source} needs a CUDA device, but this run is on --device {dev.type}: use --device cuda "
                       "on a machine with a GPU, or --backend torch or flex (or set TRITON_INTERPRET=1 to run "
                       "Triton's CPU interpreter)")


def check_output(path, flag: str, folder: bool = False) -> None:
    """Fail before any model loads if ``path`` (a file, or with ``folder=True`` a folder) cannot be
    written: what exists of it must be folders, the deepest of them writable, and a file path must
    not name a folder. Nothing is created here; missing folders are made when the output is written."""
    path = Path(path)
    try:
        if not folder and path.is_dir():
            raise CLIError(f"cannot write {flag} '{path}': it is a folder; give a file name")
        here = path if folder else path.parent
        existing = next((p for p in (here, *here.parents) if p.exists()), None)
        if existing is None:  # only when the working folder itself is gone
            raise CLIError(f"cannot write {flag} '{path}': none of its folders exists")
        if not existing.is_dir():
            raise CLIError(f"cannot write {flag} '{path}': '{existing}' is not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise CLIError(f"cannot write {flag} '{path}': the folder '{existing}' is not writable")
    except OSError as e:
        raise CLIError(f"cannot write {flag} '{path}': {e.strerror or e}") from None


def write_failed(path, flag: str, e: OSError) -> CLIError:
    """The one-line error for an OSError met while writing ``path`` (the up-front check passed,
    but the disk said no: a full disk, a folder that changed meanwhile)."""
    try:
        check_output(path, flag)
    except CLIError as err:
        return err
    return CLIError(f"cannot write {flag} '{path}': {e.strerror or e}")


def write_json(path, data, flag: str = "--json") -> None:
    """Write ``data`` as JSON to ``path``, creating its folder; an OSError is a one-line CLIError."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2, default=str))
    except OSError as e:
        raise write_failed(path, flag, e) from None


def read_prompt_file(path, flag: str = "--prompts") -> list[tuple[int, str]]:
    """(line number from 1, prompt) for each non-blank line of a prompt file."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"{flag} file '{path}' does not exist")
    items = [(i, line.strip()) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    if not items:
        raise CLIError(f"{flag} file '{path}' holds no prompt")
    return items


def call_pipeline(pipe, **kwargs):
    """``pipe(**kwargs)``; a ValueError of the pipeline's own checks (sizes, frames) is one line
    ``<Pipeline> rejected the request: ...``, rettn's own errors pass as they are."""
    try:
        return pipe(**kwargs)
    except RettnError:
        raise
    except ValueError as e:
        raise CLIError(f"{type(pipe).__name__} rejected the request: {e}") from None


# ---------------------------------------------------------------------------------- errors
def report_errors(command, args) -> int:
    """Run ``command(args)``: its exit code (an int it returns, else 0), or for a
    :class:`~rettn.errors.RettnError` one line ``rettn: error: ...`` on stderr and
    :data:`EXIT_USAGE`. Any other exception is a bug: it propagates with its traceback."""
    try:
        rc = command(args)
    except RettnError as e:
        text = str(e).strip()
        print(f"rettn: error: {text.splitlines()[0] if text else type(e).__name__}", file=sys.stderr)
        return EXIT_USAGE
    return rc if isinstance(rc, int) and not isinstance(rc, bool) else 0
