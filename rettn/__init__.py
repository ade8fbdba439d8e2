"""rettn: Re-ttention sparse attention for diffusion transformers."""

from . import selection
from .attention import BACKENDS, attention_with_lse, backend_choices, block_sparse_attention
from .config import RettnConfig
from .integration import RettnHandle, apply_rettention, describe
from .layout import BlockSparseLayout

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BlockSparseLayout",
    "RettnConfig",
    "RettnHandle",
    "apply_rettention",
    "attention_with_lse",
    "backend_choices",
    "block_sparse_attention",
    "describe",
    "selection",
]
