"""Sequence parallelism: what rettn accepts of diffusers' context parallelism (Ulysses yes, ring
attention refused with a reason)."""

from __future__ import annotations

from rettn.errors import UnsupportedError


def context_parallel(parallel_config):
    """diffusers' ContextParallelConfig of a processor when it spans more than one process, else
    None. Ring attention (each rank holds a shard of the keys) cannot give rettn a whole
    attention row to select blocks from and would need the lse merged across shards: an error,
    not a wrong result."""
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None or getattr(cp, "_world_size", 1) <= 1:
        return None
    if getattr(cp, "ring_degree", 1) > 1:
        raise UnsupportedError(
            f"rettn does not support ring attention (ContextParallelConfig(ring_degree={cp.ring_degree})): "
            "block selection needs every key of a row on one rank; use "
            "ContextParallelConfig(ulysses_degree=N) instead, or remove rettn for this run"
        )
    return cp
