"""rettn: Re-ttention sparse attention for diffusion transformers."""

from . import selection
from .attention import BACKENDS, attention_with_lse, block_sparse_attention
from .layout import BlockSparseLayout

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BlockSparseLayout",
    "attention_with_lse",
    "block_sparse_attention",
    "selection",
]
