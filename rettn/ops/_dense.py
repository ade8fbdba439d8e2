"""Dense attention that returns the log-sum-exp, through PyTorch's own fused kernels.

``torch.ops.aten`` exposes the kernels behind ``F.scaled_dot_product_attention`` together with
their softmax statistics:

| name | op | inputs |
|---|---|---|
| ``"flash"`` | ``_scaled_dot_product_flash_attention`` | CUDA fp16/bf16, head dim % 8 == 0, <= 256 |
| ``"cudnn"`` | ``_scaled_dot_product_cudnn_attention`` | CUDA fp16/bf16, head dim % 8 == 0, <= 256 (cuDNN may refuse more) |
| ``"efficient"`` | ``_scaled_dot_product_efficient_attention`` | CUDA fp16/bf16/fp32 (the fp32 dense route) |
| ``"cpu"`` | ``_scaled_dot_product_flash_attention_for_cpu`` | CPU, every float dtype |

Their schemas were read here from torch 2.13 (``torch.ops.aten.<op>.default._schema``); torch
2.11 was not installed here, and the cuDNN schema diffusers cites (pytorch commit 8904ba6, with
``attn_bias`` and ``compute_log_sumexp``) is the same. So that a difference cannot break a call,
calls are built at run time from the schema's argument names (an argument added with a default
keeps its default) and the lse is found by its output name (``logsumexp``, or the efficient
op's ``log_sumexp``); a schema without query/key/value/scale or an lse output makes the kernel
unavailable (a reason in the backend table), never a wrong call. The lse some
kernels return is padded along the query axis (the efficient kernel rounds up to 32) or carries a
trailing unit axis (cuDNN's (B, H, Sq, 1)): it is cut and reshaped to (B, H, Sq) float32.
"""

from __future__ import annotations

import functools

import torch

from rettn.errors import UnsupportedError

KERNELS = ("flash", "cudnn", "efficient", "cpu")
_OPS = {
    "flash": "_scaled_dot_product_flash_attention",
    "cudnn": "_scaled_dot_product_cudnn_attention",
    "efficient": "_scaled_dot_product_efficient_attention",
    "cpu": "_scaled_dot_product_flash_attention_for_cpu",
}
# values for the schema's arguments besides query/key/value/scale (anything else keeps its default)
_FIXED = {"dropout_p": 0.0, "is_causal": False, "return_debug_mask": False, "attn_bias": None,
          "attn_mask": None, "compute_log_sumexp": True}
_LSE_NAMES = ("logsumexp", "log_sumexp", "lse", "softmax_lse")


@functools.lru_cache(maxsize=None)
def kernel_op(name: str):
    """(overload, fixed keyword arguments, index of the lse output) or None when torch lacks it."""
    packet = getattr(torch.ops.aten, _OPS[name], None)
    if packet is None:
        return None
    try:
        overload = packet.default
        schema = overload._schema
    except (AttributeError, RuntimeError):
        return None
    names = [a.name for a in schema.arguments]
    if names[:3] != ["query", "key", "value"] or "scale" not in names:
        return None
    fixed = {n: _FIXED[n] for n in names[3:] if n in _FIXED}
    lse_at = next((i for i, r in enumerate(schema.returns) if r.name in _LSE_NAMES), None)
    if lse_at is None:
        return None
    return overload, fixed, lse_at


def available(name: str) -> bool:
    return kernel_op(name) is not None


def unsupported_reason(name: str, q: torch.Tensor) -> str | None:
    """Why kernel ``name`` cannot take ``q`` (static facts only), or None if it may."""
    if name not in _OPS:
        return f"unknown dense kernel {name!r}; expected one of {KERNELS}"
    if not available(name):
        return f"this torch has no torch.ops.aten.{_OPS[name]} with a log-sum-exp output"
    d = q.shape[-1]
    if name == "cpu":
        return None if q.device.type == "cpu" else "the cpu flash kernel needs CPU tensors"
    if q.device.type != "cuda":
        return f"the {name} kernel needs CUDA tensors"
    if name in ("flash", "cudnn"):
        if q.dtype not in (torch.float16, torch.bfloat16):
            return f"the {name} kernel takes float16/bfloat16, not {q.dtype}"
        if d % 8 or d > 256:
            return f"the {name} kernel needs a head dim divisible by 8 and <= 256, got {d}"
        return None
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the efficient kernel takes float16/bfloat16/float32, not {q.dtype}"
    return None


def attention(name: str, q, k, v, scale: float):
    """Dense attention with kernel ``name``: ``(out, lse)``, lse (B, H, Sq) float32 contiguous."""
    op = kernel_op(name)
    if op is None:
        raise UnsupportedError(unsupported_reason(name, q))
    overload, fixed, lse_at = op
    res = overload(q, k, v, **fixed, scale=scale)
    b, h, sq = q.shape[:3]
    lse = res[lse_at]
    if lse.dim() == 4:  # cuDNN: (B, H, Sq, 1)
        lse = lse[..., 0]
    return res[0], lse[..., :sq].to(torch.float32).contiguous()


# read once at import, so that code traced by torch.compile sees a constant
CPU_AVAILABLE = available("cpu")
