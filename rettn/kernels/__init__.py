"""Attention kernels: the Triton kernel (imported lazily), the torch path, and the references."""

from .reference import block_sparse_reference, layout_token_mask, masked_attention_reference
from .torch_sparse import torch_block_sparse_attention

__all__ = [
    "block_sparse_reference",
    "layout_token_mask",
    "masked_attention_reference",
    "torch_block_sparse_attention",
]
