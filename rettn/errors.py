"""rettn's errors: one base class, a few specific ones, each also the builtin a user already
catches (a bad config is a ``ValueError``, a budget a ``MemoryError``, NaN a
``FloatingPointError``), so ``except ValueError`` keeps working.

The command line catches :class:`RettnError` (and argparse's usage errors) and prints one line;
anything else is a bug in rettn or a library and shows its traceback.
"""

from __future__ import annotations


class RettnError(Exception):
    """Base of every error rettn raises on purpose."""


class ConfigError(RettnError, ValueError):
    """A RettnConfig field, a preset or a schedule that is not valid."""


class InputError(RettnError, ValueError):
    """Bad arguments to an attention op, a layout or a selection (shapes, values, devices)."""


class InputTypeError(RettnError, TypeError):
    """Arguments of the wrong type (not a tensor, not a layout, not a diffusers model)."""


class UnsupportedModelError(RettnError, ValueError):
    """A model rettn cannot make sparse (linear attention, no self-attention, nothing reached)."""


class NotReachedError(UnsupportedModelError, RuntimeError):
    """No attention call of a patched model reached rettn (its processors bypass torch's SDPA)."""


class StateError(RettnError, RuntimeError):
    """An operation that the handle's state does not allow (applying rettn twice to one model)."""


class UnsupportedError(RettnError, NotImplementedError):
    """A setting rettn refuses rather than computing a wrong result (ring attention)."""


class MemoryBudgetError(RettnError, MemoryError):
    """The Re-ttention statistics would not fit ``max_cache_bytes``."""


class NumericalError(RettnError, FloatingPointError):
    """An attention output rettn computed holds NaN or inf."""


class UsageError(RettnError, ValueError):
    """A command-line tool's arguments or inputs that cannot work (one line, exit code 2)."""


class RettnWarning(RettnError, UserWarning):
    """Base of the warnings rettn emits (``warnings.filterwarnings("error", category=RettnWarning)``
    turns them into errors)."""


class SlowerThanDenseWarning(RettnWarning, RuntimeWarning):
    """A sparse step was measured slower than the dense attention it replaces, at one call shape
    (once per shape; ``RettnConfig(fallback_when_slower=True)`` runs those calls dense)."""


class ScheduleWarning(RettnWarning, RuntimeWarning):
    """A schedule that resolves to no sparse step (every step dense, or a cache step every step
    after warm-up: slower than dense), once per step count and schedule; ``handle.stats()`` says
    so too (``Stats.schedule_warning``)."""


__all__ = ["RettnError", "ConfigError", "InputError", "InputTypeError", "UnsupportedModelError", "NotReachedError", "StateError",
           "UnsupportedError",
           "MemoryBudgetError", "NumericalError", "UsageError", "RettnWarning", "SlowerThanDenseWarning",
           "ScheduleWarning"]
