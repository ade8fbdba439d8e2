"""The backend chooser's candidates: which backend strings may run a call (and why others may not),
what runs without measurement, and how candidates are timed and checked against the reference.
:mod:`._choice` keys, stores and reports the choices."""

from __future__ import annotations

import functools
import statistics
import time

import torch

from rettn.ops import _dense as dense
from rettn.ops._flex import available as flex_available
from rettn.ops._tiles import (
    device_capability,
    interpreting,
    tile_config,
    triton_installed,
    unsupported_reason,
)

FP32_CUDA_REASON = ("float32 on CUDA does not run the Triton kernel (its fp32 dot products are FMA with "
                    "register spills); the torch path (cuBLAS) and FlexAttention are timed instead")
_WINDOW_S = 5e-3
_WINDOWS = 3


def triton_reason(q: torch.Tensor, layout) -> str | None:
    """Why auto must not pick the Triton kernel for these inputs, or None."""
    if not triton_installed():
        return "the triton package is not installed"
    reason = unsupported_reason(q, layout)
    if reason:
        return reason
    if q.device.type == "cuda" and q.dtype == torch.float32:
        return FP32_CUDA_REASON
    return None


def tiles_hopper(q) -> bool:
    cap = device_capability(q.device)
    return cap is not None and tuple(cap) >= (9, 0)


def tile_options(block_q: int, block_k: int, head_dim: int, device_type: str,
                 default: tuple[int, int] | None = None) -> list[tuple[int, int]]:
    """Tile shapes (BLOCK_M, BLOCK_N) to time for the Triton kernel, the kernel's default first
    (``default``: what its dispatcher picks for this GPU, when known); each divides the layout's
    blocks (tiles larger than a block are cut to the block)."""
    if device_type != "cuda":
        base = [(128, 128), (64, 32), (32, 16)]  # the interpreter (tests): large tiles are fastest
    elif head_dim <= 128:
        base = [(128, 64), (64, 64), (128, 32)]
    else:
        base = [(64, 32), (32, 32), (64, 64)]
    if default is not None:
        base = [tuple(default)] + base
    out = []
    for bm, bn in base:
        t = (min(bm, block_q), min(bn, block_k))
        if t[0] >= 16 and t[1] >= 16 and block_q % t[0] == 0 and block_k % t[1] == 0 and t not in out:
            out.append(t)
    return out[:3]


@functools.lru_cache(maxsize=64)
def parse(backend: str) -> tuple[str, object]:
    """``"triton:128x64"`` -> ("triton", (128, 64)) (``"fused:..."`` alike); ``"sdpa:flash"`` ->
    ("sdpa", "flash"); ``"torch"`` -> ("torch", None)."""
    kind, _, arg = backend.partition(":")
    if kind in ("triton", "fused") and arg:
        bm, _, bn = arg.partition("x")
        return kind, (int(bm), int(bn))
    return kind, (arg or None)


def default_candidates(op: str, q: torch.Tensor, layout, grad: bool, full: bool):
    """(candidate backend strings, {skipped candidate: reason}) for one call."""
    names, skipped = [], {}
    dev = q.device.type
    if op == "cache":  # a whole cache step: two passes (the baseline) or the one-pass kernel
        names.append("dense+stats")
        reason = "no backward (autograd is on)" if grad else triton_reason(q, layout)
        if reason is None and dev != "cuda" and not interpreting():
            reason = "the triton backend needs CUDA tensors"
        if reason is None:
            names.append("fused")
            big = layout.block_k >= 128 and layout.block_q >= 128
            if dev == "cuda" and big and q.shape[-1] <= 64:
                names.append("fused:128x128")  # larger key tiles, one program per SM: timed, not assumed
            elif dev == "cuda" and big and q.shape[-1] <= 128 and tiles_hopper(q):
                names.append("fused:64x64")  # ~140 registers instead of 255: timed, not assumed
        else:
            skipped["fused"] = reason
        return names, skipped
    if layout is None or full:
        for kname in (("flash", "cudnn", "efficient") if dev == "cuda" else ("cpu",)):
            reason = dense.unsupported_reason(kname, q)
            if reason is None:
                names.append(f"sdpa:{kname}")
            else:
                skipped[f"sdpa:{kname}"] = reason
    reason = "no backward (autograd is on)" if grad else triton_reason(q, layout)
    if reason is None and dev != "cuda" and not interpreting():
        reason = "the triton backend needs CUDA tensors"
    if reason is None:
        bq, bk = (layout.block_q, layout.block_k) if layout is not None else ((128, 128) if dev == "cuda" else (64, 64))
        own = None
        if dev != "cuda" or torch.cuda.is_available():  # the kernel's own pick for this GPU first
            cfg = tile_config(device_capability(q.device), q.shape[-1], q.dtype, bq, bk)
            own = (cfg.block_m, cfg.block_n)
        names.extend(f"triton:{bm}x{bn}" for bm, bn in tile_options(bq, bk, q.shape[-1], dev, own))
    else:
        skipped["triton"] = reason
    if layout is not None:
        if flex_available():
            names.append("flex")
        else:
            skipped["flex"] = "this torch has no torch.nn.attention.flex_attention"
    if layout is not None or not names:
        names.append("torch")
    return names, skipped


def default_choice(op: str, q: torch.Tensor, names: list[str]) -> str:
    """What runs without measurement: on CUDA the Triton kernel (dense: flash, then efficient),
    elsewhere the torch path (dense: PyTorch's CPU flash kernel); a cache step: two passes."""
    if op == "cache":
        return "dense+stats"
    if q.device.type == "cuda":
        order = ("sdpa:flash", "sdpa:efficient", "triton", "torch") if op == "dense+lse" else ("triton", "torch")
    else:
        order = ("sdpa:cpu", "torch") if op == "dense+lse" else ("torch",)
    for want in order:
        for name in names:
            if name == want or (want == "triton" and name.startswith("triton:")):
                return "triton" if want == "triton" else name
    return "torch"


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_seconds(fns: dict, device: torch.device) -> dict:
    """Median seconds per call of each function, timed round-robin in windows of ~5 ms."""
    reps = {}
    for name, fn in fns.items():
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        reps[name] = max(1, min(50, int(_WINDOW_S / max(time.perf_counter() - t, 1e-6))))
    times = {name: [] for name in fns}
    for _ in range(_WINDOWS):
        for name, fn in fns.items():
            n = reps[name]
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(n):
                    fn()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / 1e3 / n)
            else:
                t = time.perf_counter()
                for _ in range(n):
                    fn()
                times[name].append((time.perf_counter() - t) / n)
    return {name: statistics.median(t) for name, t in times.items()}


def _tolerance(dtype) -> float:
    if dtype in (torch.float16, torch.bfloat16):
        return 2e-2
    return 1e-3 if dtype == torch.float32 else 1e-6


def disagreement(result, reference, dtype) -> str | None:
    """Why ``result`` = (out, lse) does not match ``reference``, or None when it does."""
    tol = _tolerance(dtype)
    (out, lse), (ref_out, ref_lse) = result, reference
    ref = ref_out.float()
    err = float((out.float() - ref).abs().max())
    bound = tol * (1.0 + float(ref.abs().max()))
    if not err <= bound:
        return f"output differs from the reference by {err:.3g} (allowed {bound:.3g})"
    if lse is not None and ref_lse is not None and lse.numel() and ref_lse.numel():
        lerr = float((lse.float() - ref_lse.float()).abs().max())
        if not lerr <= tol * 10:
            return f"lse differs from the reference by {lerr:.3g} (allowed {tol * 10:.3g})"
    return None


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__
