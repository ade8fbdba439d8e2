"""The Triton kernel's launch facts that need no triton: which inputs it takes, its tiles per GPU
(shared-memory tables), the rows' alignment hint, the programs' order and the finite flag's
scratch words. The chooser, the AOT checks and the kernel's launcher read them from here.

Tiles depend on the GPU's compute capability so that the shared memory they need fits each
architecture (:func:`tile_config`). Programs run heaviest first: the query tiles are launched in
decreasing order of their key-block count (dense text rows before video rows), an order computed
once per layout tensor and cached (:func:`launch_order`).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import weakref
from dataclasses import dataclass

import torch

from rettn.ops.layout import BlockSparseLayout

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256

# Looked up once, at import: torch 2.11's dynamo refuses to trace importlib.util.find_spec, and
# this is asked inside compiled regions (a fullgraph compile of a patched block broke on it).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_installed() -> bool:
    return _TRITON_INSTALLED


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _is_pow2(x: int) -> bool:
    return x >= 1 and (x & (x - 1)) == 0


def unsupported_reason(q: torch.Tensor, layout: BlockSparseLayout | None) -> str | None:
    """Why the Triton kernel cannot run these inputs, or None if it can."""
    if q.device.type != "cuda" and not (interpreting() and q.device.type == "cpu"):
        return "the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 with CPU tensors)"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"the triton backend supports float16, bfloat16 and float32, not {q.dtype}"
    if q.shape[-1] > MAX_HEAD_DIM or q.shape[-1] < 16:
        return f"the triton backend supports head dims 16 to {MAX_HEAD_DIM}, got {q.shape[-1]}"
    if layout is not None:
        for name, blk in (("block_q", layout.block_q), ("block_k", layout.block_k)):
            if not _is_pow2(blk) or blk < 16:
                return f"the triton backend needs power-of-two block sizes >= 16, got {name}={blk}"
    return None


# ------------------------------------------------------------------------------ tiles per GPU
# Largest dynamic shared memory per block (bytes) by compute capability.
SMEM_LIMIT = {(8, 0): 166912, (8, 6): 101376, (8, 7): 166912, (8, 9): 101376, (9, 0): 232448,
              (10, 0): 232448, (12, 0): 101376}


def smem_limit(capability: tuple[int, int]) -> int:
    """Shared memory a block may use on ``capability`` (unknown GPUs: the smallest Ampere+ limit)."""
    return SMEM_LIMIT.get(tuple(capability), 101376 if tuple(capability) >= (8, 0) else 65536)


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    prefetch: bool = False  # MODE 1: load R before the key loop
    max_registers: int | None = None  # ptx .maxnreg (None: the compiler's choice)


def smem_estimate(cfg: TileConfig, block_d: int, elem: int, capability: tuple[int, int]) -> int:
    """Shared memory the pipelined kernel needs: the Q tile plus K and V tiles per buffer.

    Triton's Hopper pipeline (wgmma) keeps ``num_stages`` K/V buffers, the Ampere one
    ``num_stages - 1``; on Ampere, tiles of fewer than 128 query rows also pass P through shared
    memory (measured: triton 3.6 and 3.7.1). Checked against the compiled kernels by
    :mod:`rettn.ops.aot` (tests/test_aot.py)."""
    hopper = tuple(capability) >= (9, 0)
    bufs = cfg.num_stages if hopper else max(1, cfg.num_stages - 1)
    need = cfg.block_m * block_d * elem + bufs * 2 * cfg.block_n * block_d * elem
    if not hopper and cfg.block_m < 128:
        need += cfg.block_m * cfg.block_n * elem
    return need


# Candidate tiles, best first, per padded head dim (BLOCK_D) for 16-bit inputs; the first that
# fits the architecture's shared memory wins (see tile_config).
_CANDIDATES_16 = {
    16: [(128, 64, 8, 3)], 32: [(128, 64, 8, 3)], 64: [(128, 64, 8, 3)],
    128: [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)],
    256: [(64, 64, 8, 3), (64, 32, 8, 3), (32, 32, 4, 3), (32, 16, 4, 3)],
}
_CANDIDATES_32 = {  # fp32: twice the bytes per element
    16: [(64, 64, 4, 3)], 32: [(64, 64, 4, 3)], 64: [(64, 64, 4, 3), (64, 32, 4, 2)],
    128: [(64, 64, 4, 3), (64, 32, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2)],
    256: [(64, 32, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2), (32, 16, 4, 2)],
}

# The fused cache step (rettn.ops._triton_cache) holds the selected blocks' output in registers
# beside its accumulator through the second half of its sweep: 16-bit tiles compiled without
# spills (rettn.ops.aot, triton 3.7.1), per (Hopper?, padded head dim).
_FUSED_16 = {
    True: {128: [(128, 64, 8, 3), (128, 32, 8, 3)], 256: [(64, 32, 8, 3), (32, 32, 4, 3)]},
    False: {128: [(64, 64, 8, 3), (64, 32, 8, 3)], 256: [(32, 32, 4, 3), (32, 16, 4, 3)]},
}


def block_d_for(head_dim: int) -> int:
    """The head dim padded to a power of two >= 16 (the kernel's lanes)."""
    return max(16, 1 << (head_dim - 1).bit_length())


@functools.lru_cache(maxsize=1024)
def tile_config(capability, head_dim: int, dtype: torch.dtype, block_q: int, block_k: int,
                mode: str = "plain") -> TileConfig:
    """Tiles for a GPU of ``capability`` ((major, minor); None = the CPU interpreter).

    Tiles divide the layout's blocks and fit the architecture's shared memory (sm_80 163 KB,
    sm_86/89 99 KB, sm_90 227 KB); the sparse step prefetches R into registers before the key
    loop where registers allow it without spills (16-bit, head dim <= 64, or <= 128 on Hopper).
    ``mode="fused"`` (the one-pass cache step) takes its own table for head dims over 64."""
    if capability is None:  # interpreter: large tiles are fastest on CPU
        return TileConfig(min(block_q, 128), min(block_k, 128), 4, 1)
    bd = block_d_for(head_dim)
    elem = 4 if dtype == torch.float32 else 2
    hopper = tuple(capability) >= (9, 0)
    candidates = (_CANDIDATES_32 if elem == 4 else _CANDIDATES_16)[bd]
    if mode == "fused" and elem == 2:
        candidates = _FUSED_16[hopper].get(bd, candidates)
    if mode in ("step", "cache") and elem == 2 and bd == 128 and not hopper:
        candidates = [(128, 32, 8, 3)] + candidates  # 128 x 64 spills there (R, rho, check in the epilogue)
    limit = smem_limit(capability)
    chosen = None
    for bm, bn, warps, stages in candidates:
        if block_q < bm and not hopper:
            warps = 4  # a layout block smaller than the tile: 8 warps on 64 rows spill on Ampere
        cfg = TileConfig(min(block_q, bm), min(block_k, bn), warps, stages)
        chosen = cfg
        if smem_estimate(cfg, bd, elem, capability) <= limit:
            break
    # the fused cache step at head dim <= 64 on Hopper: 140 registers, held to 128 without spills
    # (aot: triton 3.7.1), so two 8-warp programs share an SM as the plain kernel's do
    cap_regs = 128 if mode == "fused" and elem == 2 and hopper and bd <= 64 and chosen.num_warps == 8 else None
    return TileConfig(chosen.block_m, chosen.block_n, chosen.num_warps, chosen.num_stages,
                      prefetch=mode == "step" and elem == 2 and (bd <= 64 or (bd <= 128 and hopper)),
                      max_registers=cap_regs)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def device_capability(device: torch.device):
    """(major, minor) of a CUDA device, None for the CPU interpreter."""
    if device.type != "cuda":
        return None
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


def row_alignment(*tensors) -> int:
    """Largest power of two <= 16 dividing every non-unit stride of ``tensors`` (elements)."""
    align = 16
    for t in tensors:
        for s in t.stride()[:-1]:
            while s % align:
                align //= 2
    return align


# ------------------------------------------------------------------------------ launch order
_ORDERS: dict = {}


def launch_order(layout: BlockSparseLayout, b: int, h: int, n_tiles: int, block_m: int) -> torch.Tensor:
    """(b * h * n_tiles,) int64: the programs' (bh * n_tiles + tile) codes, heaviest tile first.

    Cached per ``kv_num_blocks`` tensor (by identity and version), so a static layout pays the
    sort once; a layout selected anew pays one argsort on the device (no sync)."""
    counts = layout.kv_num_blocks
    key = (id(counts), counts._version, b, h, n_tiles, block_m)
    hit = _ORDERS.get(key)
    if hit is not None and hit[0]() is counts:
        return hit[1]
    per_row = layout.block_q // block_m
    if per_row > 1:  # each layout row's count for each of its tiles (an expand: no device-side repeat)
        work = counts.unsqueeze(-1).expand(*counts.shape, per_row).reshape(*counts.shape[:2], -1).narrow(2, 0, n_tiles)
    else:
        work = counts
    order = torch.argsort(work.expand(b, h, n_tiles).reshape(-1), descending=True, stable=True)
    if len(_ORDERS) > 256:
        for k in [k for k, (ref, _) in _ORDERS.items() if ref() is None] or list(_ORDERS)[:128]:
            _ORDERS.pop(k, None)
    _ORDERS[key] = (weakref.ref(counts), order)
    return order


# ------------------------------------------------------------------------------ finite flag scratch
_SCRATCH: dict = {}


def flag_scratch(device: torch.device) -> torch.Tensor:
    """Two int32 words per (device, stream), zero between launches (the kernel's last program
    resets them): launches on one stream run in order, so they never share the words at once."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = ("cuda", index, torch.cuda.current_stream(index).cuda_stream)
    else:
        key = (device.type, device.index, 0)
    t = _SCRATCH.get(key)
    if t is None:
        t = _SCRATCH[key] = torch.zeros(2, dtype=torch.int32, device=device)
    return t
