"""Input checks shared by the public ops: q/k/v tensors, a layout against them, the score scale
and the cached Re-ttention statistics. Each raises rettn's input errors (:mod:`rettn.errors`)."""

from __future__ import annotations

import torch

from rettn.errors import InputError, InputTypeError
from rettn.ops.layout import BlockSparseLayout

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT_SET = frozenset(FLOAT_DTYPES)


def check_qkv(q, k, v) -> None:
    """q, k, v: 4-D (B, H, S, D) float tensors of one dtype and device, agreeing on batch, heads
    and head dim (k and v on sequence length), with positive sequence lengths."""
    if type(q) is type(k) is type(v) is torch.Tensor:  # the usual case, checked in one pass
        qs, ks, vs = q.shape, k.shape, v.shape
        if (len(qs) == len(ks) == len(vs) == 4 and q.dtype is k.dtype is v.dtype and q.dtype in _FLOAT_SET
                and qs[0] == ks[0] == vs[0] and qs[1] == ks[1] == vs[1] and ks[2] == vs[2]
                and qs[3] == ks[3] == vs[3] and qs[2] and ks[2] and q.device == k.device == v.device):
            return
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise InputTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise InputError(
                f"{name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise InputTypeError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise InputTypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise InputError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or k.shape[:3] != v.shape[:3]:
        raise InputError(
            "q, k, v must agree on batch and heads, and k, v on sequence length: got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.shape[3] == k.shape[3] == v.shape[3]):
        raise InputError(
            f"q, k, v must share the head dim, got {q.shape[3]}, {k.shape[3]}, {v.shape[3]}"
        )
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise InputError("sequence lengths must be positive")


def resolve_scale(scale, q) -> float:
    """The score scale as a positive float (``None``: ``D ** -0.5`` for q's head dim D)."""
    if scale is None:
        return q.shape[-1] ** -0.5
    if type(scale) is not float:  # a plain float (the usual case) needs no conversion
        # numbers, numpy scalars and one-element tensors convert; text and bools are not scales
        if isinstance(scale, (str, bytes, bool)):
            raise InputError(f"scale must be a positive number, got {scale!r}")
        try:
            scale = float(scale)
        except (TypeError, ValueError, RuntimeError):
            raise InputError(f"scale must be a positive number, got {scale!r}") from None
    if not scale > 0:
        raise InputError(f"scale must be positive, got {scale}")
    return scale


def check_layout(layout, q, k) -> None:
    """``layout`` is a :class:`BlockSparseLayout` for q's and k's sequence lengths, with batch and
    heads that match q's or are 1, on q's device."""
    if not isinstance(layout, BlockSparseLayout):
        raise InputTypeError(f"layout must be a rettn.BlockSparseLayout, got {type(layout).__name__}")
    if layout.seq_q != q.shape[2] or layout.seq_k != k.shape[2]:
        raise InputError(
            f"layout is for seq_q={layout.seq_q}, seq_k={layout.seq_k} but q has {q.shape[2]} "
            f"and k has {k.shape[2]} tokens"
        )
    lb, lh, _ = layout.kv_num_blocks.shape
    if lb not in (1, q.shape[0]) or lh not in (1, q.shape[1]):
        raise InputError(
            f"layout has batch={lb}, heads={lh}; q has batch={q.shape[0]}, heads={q.shape[1]} "
            "(each must match or be 1)"
        )
    if layout.device != q.device:
        raise InputError(
            f"layout is on {layout.device} but q is on {q.device}; move it with layout.to(device)"
        )


def check_stat(name, t, q, dims) -> None:
    """``t`` must broadcast to q's leading ``dims`` dims (B|1, H|1, Sq[, D])."""
    if not isinstance(t, torch.Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    want = tuple(q.shape[:dims])
    if t.dim() != dims or t.shape[2:] != want[2:] or any(n not in (1, w) for n, w in zip(t.shape[:2], want[:2])):
        raise InputError(f"{name} must have shape {want} (batch and heads may be 1), got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise InputTypeError(f"{name} must be a floating tensor, got {t.dtype}")
