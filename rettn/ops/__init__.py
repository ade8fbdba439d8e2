"""Floor 1, the attention operations: public ops with their validation, the block layout, block
selection and the torch references; private backend modules (``_triton``, ``_torch``, ``_flex``,
``_dense``) behind one private dispatch module (``_dispatch``) that owns the custom op and the
backend choice. Nothing here imports from rettn's floors above (core, diffusers, tools)."""

from rettn.ops import selection
from rettn.ops.attention import (
                                 BACKENDS,
                                 attention_with_lse,
                                 backend_choices,
                                 block_sparse_attention,
                                 sparse_attention_rescaled,
)
from rettn.ops.layout import BlockSparseLayout

__all__ = ["BACKENDS", "BlockSparseLayout", "attention_with_lse", "backend_choices", "block_sparse_attention",
           "selection", "sparse_attention_rescaled"]
