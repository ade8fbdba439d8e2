"""rettn: Re-ttention sparse attention for diffusion transformers.

Four floors, imports running downward only: ``rettn.ops`` (attention operations and kernels),
``rettn.core`` (config, presets, engine), ``rettn.diffusers`` (the integration), ``rettn.tools``
(the command line). docs/architecture.md draws them.
"""

from rettn import errors
from rettn._version import __version__  # noqa: F401  (rettn.__version__)
from rettn.core.config import RettnConfig
from rettn.diffusers.apply import apply_rettention, describe
from rettn.diffusers.handle import RettnHandle
from rettn.ops import selection
from rettn.ops.attention import (BACKENDS, attention_with_lse, backend_choices, block_sparse_attention,
                                 sparse_attention_rescaled)
from rettn.ops.layout import BlockSparseLayout


def calibrate(pipe, prompts, seeds=(0,), **options):
    """The cheapest schedule that holds a quality floor: :func:`rettn.tools.calibrate.calibrate`
    (a tool, imported when first called)."""
    from rettn.tools.calibrate import calibrate as run

    return run(pipe, prompts, seeds, **options)

__all__ = [
    "BACKENDS",
    "BlockSparseLayout",
    "RettnConfig",
    "RettnHandle",
    "apply_rettention",
    "attention_with_lse",
    "backend_choices",
    "block_sparse_attention",
    "calibrate",
    "describe",
    "errors",
    "selection",
    "sparse_attention_rescaled",
]
