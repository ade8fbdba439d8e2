"""Block-sparse layouts: which key blocks each query block attends.

The metadata follows FlexAttention's ``BlockMask`` (``kv_num_blocks``, ``kv_indices``), so a
layout converts to one for free, and ``to_dense()`` gives tests a reference.
"""

from __future__ import annotations

import math
import numbers
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from rettn.errors import InputError, InputTypeError


def num_blocks(seq: int, block: int) -> int:
    """How many blocks of ``block`` tokens cover ``seq`` tokens (the last may be short)."""
    return (seq + block - 1) // block


def check_positive_int(name: str, value) -> int:
    """``value`` as an int: any integer type (numpy's included) but bool, and > 0."""
    if type(value) is int and value > 0:  # the usual case
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def block_sizes(seq: int, block: int, device=None) -> torch.Tensor:
    """Real number of tokens in each block of a sequence of ``seq`` tokens (the tail may be short).

    Made on ``device`` by kernels (no host-to-device copy, no sync): capturable in a CUDA graph."""
    starts = torch.arange(num_blocks(seq, block), device=device) * block
    return (seq - starts).clamp_(max=block)


def constant(key: tuple, build):
    """A small tensor that depends only on ``key`` (shapes, block sizes, spans and a device as the
    last element), built once by ``build()`` and then served from a bounded cache.

    Selection's per-shape constants (diagonal and span masks, block sizes) come from here, so a
    hot call launches no kernel for them and never copies from the host. Nothing is cached while
    a CUDA graph is being captured on the current stream (the kernels that fill a tensor built
    there only run when the graph replays), under ``torch.compile`` (the build is traced into the
    graph instead) or for fake tensors. Callers must not modify the tensor in place.
    """
    device = torch.device(key[-1]) if key[-1] is not None else torch.device("cpu")
    if torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return build()
    value = _constants.get(key)
    if value is None:
        with torch.inference_mode(False):  # a plain tensor, usable in and out of inference mode
            value = build()
        if type(value) is not torch.Tensor:  # a fake or traced tensor: do not keep it
            return value
        with _constants_lock:
            _constants[key] = value
            while len(_constants) > _CONSTANTS_SIZE:
                _constants.popitem(last=False)
    return value


_CONSTANTS_SIZE = 256
_constants: OrderedDict = OrderedDict()
_constants_lock = threading.Lock()


def dense_to_kv(block_mask: torch.Tensor, width: int | None = None):
    """(B, H, nQ, nK) bool -> (counts (B, H, nQ) int32, indices (B, H, nQ, width) int32).

    Row ``r`` of the indices is the permutation of ``0..nK-1`` that puts the selected block
    indices first, in increasing order, then the others, in increasing order (a stable sort of
    the mask), cut to ``width`` columns. Built with a cumulative sum and a scatter: no sort, no
    sync, shapes fixed by ``width``. ``width=None`` means the largest count, which reads it back
    from the device (a sync): hot paths pass a width.
    """
    nk = block_mask.shape[-1]
    incl = block_mask.cumsum(-1)  # int64: selected blocks up to and including each column
    counts = incl[..., -1:]
    cols = constant(("dense_to_kv.cols", nk, block_mask.device),
                    lambda: torch.arange(nk, dtype=torch.int32, device=block_mask.device))
    # a selected column j goes to incl[j] - 1; an unselected one after the selected blocks, at
    # counts + (number of unselected columns before j)
    pos = torch.where(block_mask, incl - 1, counts + cols - incl)
    order = torch.empty(pos.shape, dtype=torch.int32, device=pos.device).scatter_(-1, pos, cols.expand(pos.shape))
    counts = counts.squeeze(-1).to(torch.int32)
    if width is None:
        width = max(int(counts.max()) if counts.numel() else 1, 1)
    return counts, order[..., :width].contiguous()


def tensor_version(t: torch.Tensor):
    """The tensor's in-place version counter; None for inference tensors, which keep none."""
    try:
        return t._version
    except RuntimeError:
        return None


class _LayoutMemo:
    """Values computed from a layout's index tensors (its FlexAttention ``BlockMask``, its
    density), kept while those two tensors live and are not modified in place.

    Keyed by the tensors' identity, not by the layout object: the ``rettn::sparse_attention``
    op rebuilds a layout around the same tensors at every call, and this memo still serves it.
    An entry is checked against the tensors' version counters (an in-place change recomputes);
    inference tensors have none, so a layout built under ``torch.inference_mode`` and then
    modified in place inside it would be served stale values (rettn never does that). Entries
    go when either tensor is freed, and the oldest go past ``size`` entries.
    """

    def __init__(self, size: int = 256):
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._dead: list = []  # keys whose tensors were freed (appended by weakref callbacks)
        self._lock = threading.Lock()

    def get(self, layout: "BlockSparseLayout", what: str, compute):
        n, idx = layout.kv_num_blocks, layout.kv_indices
        key = (what, id(n), id(idx), layout.block_q, layout.block_k, layout.seq_q, layout.seq_k)
        stamp = (tensor_version(n), tensor_version(idx))
        with self._lock:
            while self._dead:
                self._items.pop(self._dead.pop(), None)
            item = self._items.get(key)
            if item is not None and item[0]() is n and item[1]() is idx and item[2] == stamp:
                self._items.move_to_end(key)
                return item[3]
        value = compute()
        with self._lock:
            def gone(_, key=key, dead=self._dead):
                dead.append(key)
            self._items[key] = (weakref.ref(n, gone), weakref.ref(idx, gone), stamp, value)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value

    def clear(self):
        with self._lock:
            self._items.clear()
            self._dead.clear()

    def __len__(self):
        return len(self._items)


layout_memo = _LayoutMemo()


@dataclass(frozen=True, eq=False)
class BlockSparseLayout:
    """Which key blocks each query block attends, per batch row and head.

    Attributes:
        kv_num_blocks: (B, H, nQ) int32, how many key blocks query block ``r`` attends.
        kv_indices: (B, H, nQ, max_kv) int32; row ``[b, h, r, :kv_num_blocks[b, h, r]]`` holds the
            selected key-block indices, distinct and in strictly increasing order (kernels walk
            them in that order). Entries past the count are ignored (layouts built by
            :func:`dense_to_kv`, which selection's dense spans use, fill them with the unselected
            blocks in increasing order: in range, but not part of the layout).
        block_q, block_k: block sizes in tokens.
        seq_q, seq_k: sequence lengths in tokens (need not be multiples of the block sizes).

    B and H may be 1 to broadcast one layout over every batch row or head (static patterns).
    Every query block must attend at least one key block: a row with none is an error here,
    not NaN at run time. ``validate=False`` (what selection passes) checks only types and
    shapes: no device sync, so a layout can be built inside a captured CUDA graph.
    """

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    block_q: int
    block_k: int
    seq_q: int
    seq_k: int
    validate: bool = True

    def __post_init__(self):
        for name in ("block_q", "block_k", "seq_q", "seq_k"):
            value = getattr(self, name)
            checked = check_positive_int(name, value)
            if checked is not value:  # numpy integers are stored as plain ints
                object.__setattr__(self, name, checked)
        n, idx = self.kv_num_blocks, self.kv_indices
        if not isinstance(n, torch.Tensor) or not isinstance(idx, torch.Tensor):
            raise InputTypeError("kv_num_blocks and kv_indices must be torch tensors")
        if n.dtype != torch.int32 or idx.dtype != torch.int32:
            raise InputTypeError(
                f"kv_num_blocks and kv_indices must be int32, got {n.dtype} and {idx.dtype}"
            )
        if n.dim() != 3 or idx.dim() != 4 or idx.shape[:3] != n.shape:
            raise InputError(
                "expected kv_num_blocks of shape (B, H, nQ) and kv_indices of shape "
                f"(B, H, nQ, max_kv), got {tuple(n.shape)} and {tuple(idx.shape)}"
            )
        if n.device != idx.device:
            raise InputError("kv_num_blocks and kv_indices must be on the same device")
        if n.shape[2] != self.num_q_blocks:
            raise InputError(
                f"kv_num_blocks has {n.shape[2]} query blocks, but seq_q={self.seq_q} with "
                f"block_q={self.block_q} needs {self.num_q_blocks}"
            )
        if idx.shape[3] < 1:
            raise InputError("kv_indices must have at least one column")
        if self.validate:
            self.check()

    # ------------------------------------------------------------------ checks and views
    def check(self) -> None:
        """Full value check (costs a device sync on GPU): counts in [1, max_kv], indices in range."""
        n, idx = self.kv_num_blocks, self.kv_indices
        if n.numel() == 0:
            return
        if int(n.min()) < 1:
            b, h, r = (int(x) for x in torch.nonzero(n < 1)[0])
            raise InputError(
                f"query block {r} (batch {b}, head {h}) attends no key block; every query block "
                "needs at least one (keep the diagonal block or a dense span)"
            )
        if int(n.max()) > idx.shape[3]:
            raise InputError(
                f"kv_num_blocks has a count {int(n.max())} larger than kv_indices' {idx.shape[3]} columns"
            )
        valid = self._valid_mask()
        used = idx[valid]
        if used.numel() and (int(used.min()) < 0 or int(used.max()) >= self.num_k_blocks):
            raise InputError(
                f"kv_indices must lie in [0, {self.num_k_blocks}) (seq_k={self.seq_k}, "
                f"block_k={self.block_k}), got values in [{int(used.min())}, {int(used.max())}]"
            )

    @property
    def num_q_blocks(self) -> int:
        return num_blocks(self.seq_q, self.block_q)

    @property
    def num_k_blocks(self) -> int:
        return num_blocks(self.seq_k, self.block_k)

    @property
    def max_kv(self) -> int:
        return self.kv_indices.shape[3]

    @property
    def device(self) -> torch.device:
        return self.kv_num_blocks.device

    def _valid_mask(self) -> torch.Tensor:
        cols = torch.arange(self.max_kv, device=self.device)
        return cols < self.kv_num_blocks.unsqueeze(-1).long()

    @classmethod
    def from_dense(cls, block_mask: torch.Tensor, block_q: int, block_k: int, seq_q: int, seq_k: int):
        """Build a layout from a bool block mask of shape (B, H, nQ, nK)."""
        block_q, block_k = check_positive_int("block_q", block_q), check_positive_int("block_k", block_k)
        seq_q, seq_k = check_positive_int("seq_q", seq_q), check_positive_int("seq_k", seq_k)
        if not isinstance(block_mask, torch.Tensor) or block_mask.dim() != 4:
            raise InputError("block_mask must be a 4-D (B, H, nQ, nK) tensor")
        if block_mask.dtype != torch.bool:
            raise InputTypeError(f"block_mask must be a bool tensor, got {block_mask.dtype}")
        nq, nk = num_blocks(seq_q, block_q), num_blocks(seq_k, block_k)
        if tuple(block_mask.shape[2:]) != (nq, nk):
            raise InputError(
                f"block_mask has {tuple(block_mask.shape[2:])} (nQ, nK) blocks, but seq_q={seq_q}, "
                f"seq_k={seq_k} with blocks ({block_q}, {block_k}) need ({nq}, {nk})"
            )
        counts, indices = dense_to_kv(block_mask)
        return cls(counts, indices, block_q, block_k, seq_q, seq_k)

    @classmethod
    def dense(cls, seq_q: int, seq_k: int, block_q: int = 128, block_k: int = 128, device=None):
        """Every query block attends every key block (one broadcast row for all batches and heads)."""
        block_q, block_k = check_positive_int("block_q", block_q), check_positive_int("block_k", block_k)
        seq_q, seq_k = check_positive_int("seq_q", seq_q), check_positive_int("seq_k", seq_k)
        nq, nk = num_blocks(seq_q, block_q), num_blocks(seq_k, block_k)
        counts = torch.full((1, 1, nq), nk, dtype=torch.int32, device=device)
        indices = torch.arange(nk, dtype=torch.int32, device=device).expand(1, 1, nq, nk).contiguous()
        return cls(counts, indices, block_q, block_k, seq_q, seq_k, validate=False)

    def to_dense(self) -> torch.Tensor:
        """The bool block mask (B, H, nQ, nK)."""
        b, h, nq = self.kv_num_blocks.shape
        mask = torch.zeros(b, h, nq, self.num_k_blocks + 1, dtype=torch.bool, device=self.device)
        # Entries past the count go to a spare column that is dropped.
        idx = torch.where(self._valid_mask(), self.kv_indices.long(), self.num_k_blocks)
        mask.scatter_(-1, idx, True)
        return mask[..., : self.num_k_blocks]

    def density(self) -> float:
        """Fraction of the seq_q x seq_k (query, key) token pairs that are computed.

        Counted over real tokens: a partial tail block counts by its real size. Averaged over the
        layout's batch rows and heads. Reading it syncs the device once per layout (the value is
        kept while the layout's tensors are unchanged).
        """
        return layout_memo.get(self, "density", lambda: float(self.density_tensor()))

    def density_tensor(self) -> torch.Tensor:
        """:meth:`density` as a 0-d float64 tensor on the layout's device (no device sync)."""
        qs, ks = (constant(("density.sizes", seq, block, self.device),
                           lambda s=seq, b=block: block_sizes(s, b, self.device).to(torch.float64))
                  for seq, block in ((self.seq_q, self.block_q), (self.seq_k, self.block_k)))
        idx = self.kv_indices.long().clamp(0, self.num_k_blocks - 1)
        per_row = torch.where(self._valid_mask(), ks[idx], 0.0).sum(-1)  # (B, H, nQ) keys per query
        pairs = (per_row * qs).sum(-1)  # (B, H)
        return pairs.mean() / (self.seq_q * self.seq_k)

    def expand(self, batch: int, heads: int) -> "BlockSparseLayout":
        """A view broadcast to (batch, heads); raises if the layout cannot broadcast."""
        b, h, _ = self.kv_num_blocks.shape
        if b not in (1, batch) or h not in (1, heads):
            raise InputError(
                f"layout with batch={b}, heads={h} cannot be used for batch={batch}, heads={heads} "
                "(each must match or be 1)"
            )
        if (b, h) == (batch, heads):
            return self
        n = self.kv_num_blocks.expand(batch, heads, -1)
        idx = self.kv_indices.expand(batch, heads, -1, -1)
        return trusted_layout(n, idx, self.block_q, self.block_k, self.seq_q, self.seq_k)

    def to(self, device) -> "BlockSparseLayout":
        n, idx = self.kv_num_blocks.to(device), self.kv_indices.to(device)
        if n is self.kv_num_blocks and idx is self.kv_indices:
            return self
        return trusted_layout(n, idx, self.block_q, self.block_k, self.seq_q, self.seq_k)

    def to_block_mask(self):
        """This layout as a ``torch.nn.attention.flex_attention.BlockMask`` (FlexAttention).

        The mask_mod encodes the layout itself (eager FlexAttention applies only the mask_mod);
        blocks that touch a sequence tail are partial blocks, the rest are full blocks, so the
        compiled kernel evaluates the mask_mod only where it must.

        Built once per layout (the same index tensors, unchanged) and then served from a memo:
        calls with the same layout do not rebuild it.
        """
        return layout_memo.get(self, "block_mask", self._build_block_mask)

    def _build_block_mask(self):
        from torch.nn.attention.flex_attention import BlockMask

        dense = self.to_dense()
        b_, h_, nq, nk = dense.shape
        bq, bk, seq_q, seq_k = self.block_q, self.block_k, self.seq_q, self.seq_k

        def layout_mask(b, h, q_idx, kv_idx):
            inside = (q_idx < seq_q) & (kv_idx < seq_k)
            return inside & dense[b % b_, h % h_, q_idx // bq, kv_idx // bk]

        tail = torch.zeros(nq, nk, dtype=torch.bool, device=dense.device)
        if seq_q % bq:
            tail[-1, :] = True
        if seq_k % bk:
            tail[:, -1] = True
        partial_n, partial_idx = dense_to_kv(dense & tail, nk)
        full_n, full_idx = dense_to_kv(dense & ~tail, nk)
        return BlockMask.from_kv_blocks(
            partial_n,
            partial_idx,
            full_n,
            full_idx,
            BLOCK_SIZE=(bq, bk),
            mask_mod=layout_mask,
            seq_lengths=(seq_q, seq_k),
        )

    def __repr__(self) -> str:
        b, h, nq = self.kv_num_blocks.shape
        return (
            f"BlockSparseLayout(batch={b}, heads={h}, seq_q={self.seq_q}, seq_k={self.seq_k}, "
            f"block=({self.block_q}, {self.block_k}), blocks=({nq}, {self.num_k_blocks}), "
            f"max_kv={self.max_kv}, density={self.density():.4f})"
        )


def trusted_layout(kv_num_blocks, kv_indices, block_q, block_k, seq_q, seq_k) -> BlockSparseLayout:
    """A layout from parts already known to be consistent (plain ints, int32 tensors of matching
    shapes): no checks, about 1 us instead of 8 (per-call views and the custom op's body)."""
    self = object.__new__(BlockSparseLayout)
    for name, value in (("kv_num_blocks", kv_num_blocks), ("kv_indices", kv_indices),
                        ("block_q", block_q), ("block_k", block_k), ("seq_q", seq_q),
                        ("seq_k", seq_k), ("validate", False)):
        object.__setattr__(self, name, value)
    return self


def ceil_blocks(keep: float, n: int) -> int:
    """Number of blocks kept out of ``n`` for a keep fraction: ceil(keep * n), at least 1."""
    return max(1, min(n, math.ceil(keep * n - 1e-9)))
