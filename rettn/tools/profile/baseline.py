"""The dense baseline: the ``F.scaled_dot_product_attention`` backend measured fastest at the
model's attention shape, and the context every timed run uses so that the model's own SDPA calls
(all of them in the dense run, the ones rettn leaves to the model in the rettn run) run on it.

Why: PyTorch's default order is not the fastest everywhere (on an H200 at CogVideoX-2B's shape,
B=2 H=30 S=17,776 D=64 bf16, it picks flash at 15.2 ms while cuDNN takes 11.2 ms); a speedup
against a slower baseline flatters rettn. So the profile times SDPA under each backend
(``torch.nn.attention.sdpa_kernel``) at the captured shape, outside the timed runs, and pins the
fastest first in the priority order (the others follow, so a call the fastest cannot take falls
back as it would by default). Every speedup the report prints names it: "vs dense SDPA (cudnn)".

Backends: ``cudnn``, ``flash``, ``efficient``, ``math`` (on CPU ``cpu flash`` and ``math``).
``math`` materialises the score matrix: it is timed only when that fits (:data:`MATH_LIMIT_BYTES`).
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from rettn.errors import UsageError

CHOICES = ("auto", "default", "cudnn", "flash", "efficient", "math")  # --dense-backend
_BY_NAME = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
_DEFAULT_ORDER = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH,
                  SDPBackend.CUDNN_ATTENTION)
MATH_LIMIT_BYTES = 1 << 30  # fp32 scores B*H*Sq*Sk*4 above this: math is not timed
_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters


def label(backend: SDPBackend | None, device_type: str) -> str:
    """The backend's name in reports: ``cudnn``, ``flash``, ``efficient``, ``math``; the CPU's
    flash kernel is ``cpu flash``."""
    if backend is None:
        return "unknown"
    name = next((n for n, b in _BY_NAME.items() if b == backend), str(backend).split(".")[-1].lower())
    return "cpu flash" if (name == "flash" and device_type == "cpu") else name


def _default_order() -> list:
    try:  # the process's current priority order (ints), so fallbacks keep PyTorch's order
        values = {int(b.value): b for b in _DEFAULT_ORDER}
        order = [values[int(v)] for v in torch._C._get_sdp_priority_order() if int(v) in values]
        return order or list(_DEFAULT_ORDER)
    except (AttributeError, RuntimeError, TypeError, ValueError):
        return list(_DEFAULT_ORDER)


def backend_named(name: str) -> SDPBackend:
    """The ``SDPBackend`` of ``--dense-backend NAME`` (``cudnn``, ``flash``, ``efficient``, ``math``)."""
    if name not in _BY_NAME:
        raise UsageError(f"--dense-backend {name!r} names no SDPA backend; choose from {', '.join(_BY_NAME)}")
    return _BY_NAME[name]


def pinned(backend: SDPBackend | None, device_type: str = "cuda"):
    """A context where SDPA tries ``backend`` first, then PyTorch's order (no-op for None). CPU
    SDPA ignores priorities (flash, then math): there math is pinned by enabling it alone."""
    if backend is None:
        return contextlib.nullcontext()
    if device_type == "cpu":
        return sdpa_kernel(backend if backend == SDPBackend.MATH else [backend, SDPBackend.MATH])
    if not _PRIORITY:  # a torch without priorities: only the chosen backend, and math as a last resort
        return sdpa_kernel([backend, SDPBackend.MATH])
    return sdpa_kernel([backend] + [b for b in _default_order() if b != backend], set_priority=True)


def default_pick(q, k, v, scale=None) -> SDPBackend | None:
    """The backend PyTorch's own order picks for these inputs (what diffusers' default runs)."""
    try:
        value = int(torch._fused_sdp_choice(q, k, v, scale=scale))
    except (AttributeError, RuntimeError, TypeError):
        return None
    return next((b for b in SDPBackend.__members__.values() if int(b.value) == value), None)


@dataclass
class DenseBaseline:
    """The dense SDPA backend the timed runs pin, and how it was chosen."""

    backend: SDPBackend | None  # None: PyTorch's own order, not pinned
    device_type: str
    source: str  # "measured", "named" (--dense-backend NAME) or "default" (PyTorch's order)
    default: SDPBackend | None = None  # what PyTorch's order picks at the shape
    timings_ms: dict = field(default_factory=dict)  # label -> ms per call at the shape
    skipped: dict = field(default_factory=dict)  # label -> reason
    shape: dict | None = None
    note: str | None = None
    verified: bool | None = None  # PyTorch picks ``backend`` at the shape inside :meth:`context`

    @property
    def name(self) -> str:
        return label(self.backend if self.backend is not None else self.default, self.device_type)

    def describe(self) -> str:
        """``dense SDPA (cudnn)``; PyTorch's unpinned order says so."""
        if self.backend is None:
            return f"dense SDPA ({self.name}, PyTorch's default pick)" if self.default is not None else \
                "dense SDPA (PyTorch's default pick)"
        return f"dense SDPA ({self.name})"

    def context(self):
        return pinned(self.backend, self.device_type)

    def to_json(self) -> dict:
        return {"backend": self.name, "pinned": self.backend is not None, "source": self.source,
                "describe": self.describe(), "pytorch_default": label(self.default, self.device_type)
                if self.default is not None else None, "timings_ms": dict(self.timings_ms),
                "skipped": dict(self.skipped), "shape": self.shape, "note": self.note,
                "verified": self.verified}


def _inputs(shape, dtype, device, transposed: bool):
    b, h, s, d = shape
    g = torch.Generator(device="cpu").manual_seed(0)

    def one():
        if transposed:  # (B, S, H, D) buffers seen as (B, H, S, D), as diffusers' processors pass them
            return torch.randn(b, s, h, d, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
        return torch.randn(b, h, s, d, generator=g).to(device=device, dtype=dtype)

    return one(), one(), one()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def choose(choice: str, shape, dtype, device, scale=None, transposed=False, windows: int = 3) -> DenseBaseline:
    """The baseline for ``--dense-backend choice`` at attention ``shape`` (B, H, S, D): ``auto``
    times SDPA under each backend that runs there and keeps the fastest."""
    from rettn.tools.profile.kernels import time_calls

    if choice not in CHOICES:
        raise UsageError(f"--dense-backend must be one of {', '.join(CHOICES)}, got {choice!r}")
    dev = torch.device(device).type
    b, h, s, d = shape
    info = {"batch": b, "heads": h, "seq": s, "head_dim": d, "dtype": str(dtype).replace("torch.", "")}
    q, k, v = _inputs(shape, dtype, device, transposed)
    default = default_pick(q, k, v, scale)
    if choice == "default":
        return DenseBaseline(None, dev, "default", default, shape=info,
                             note="--dense-backend default: PyTorch's own order, not measured")
    if choice != "auto":
        backend = backend_named(choice)
        with sdpa_kernel(backend), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                F.scaled_dot_product_attention(q, k, v, scale=scale)
            except RuntimeError as e:
                raise UsageError(f"--dense-backend {choice} cannot run SDPA at the model's attention shape "
                                 f"{info}: {_first_line(e)}") from None
        return _verified(DenseBaseline(backend, dev, "named", default, shape=info,
                                       note=f"--dense-backend {choice}: not measured"), q, k, v, scale)
    names = ("cudnn", "flash", "efficient", "math") if dev == "cuda" else ("flash", "math")
    fns, skipped = {}, {}
    for name in names:
        backend = _BY_NAME[name]
        tag = label(backend, dev)
        if name == "math" and b * h * s * s * 4 > MATH_LIMIT_BYTES:
            skipped[tag] = f"not timed: its {b * h * s * s * 4 / 2**30:.1f} GiB score matrix exceeds {MATH_LIMIT_BYTES / 2**30:g} GiB"
            continue

        def call(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, scale=scale)

        with warnings.catch_warnings(record=True) as said:  # SDPA warns why a backend cannot run
            warnings.simplefilter("always")
            try:
                call()
            except RuntimeError as e:  # no kernel for these inputs under this backend
                why = [str(w.message).strip().splitlines()[0] for w in said if str(w.message).strip()]
                skipped[tag] = "; ".join(why[:2]) or _first_line(e)
                continue
        fns[tag] = call
    if not fns:
        return DenseBaseline(None, dev, "default", default, skipped=skipped, shape=info,
                             note="no SDPA backend ran alone at this shape: PyTorch's own order, not pinned")
    timed = time_calls(fns, torch.device(device), windows, warmup=0)  # each ran once just above
    ms = {tag: 1e3 * r["median_s"] for tag, r in timed.items()}
    best = min(ms, key=ms.get)
    backend = next(_BY_NAME[n] for n in names if label(_BY_NAME[n], dev) == best)
    return _verified(DenseBaseline(backend, dev, "measured", default, ms, skipped, info,
                                   note=None if len(fns) > 1 else "one SDPA backend runs here"), q, k, v, scale)


def _verified(baseline: DenseBaseline, q, k, v, scale) -> DenseBaseline:
    """Ask PyTorch which backend it picks at the shape inside the baseline's context."""
    with baseline.context():
        picked = default_pick(q, k, v, scale)
    baseline.verified = picked == baseline.backend if picked is not None else None
    if baseline.verified is False:
        got = label(picked, baseline.device_type)
        baseline.note = "; ".join(x for x in (baseline.note, f"inside the pinned context PyTorch picks {got} at "
                                              f"this shape, not {baseline.name}") if x)
    return baseline



def _attention_projection(model):
    """(head dim, query projection weight) of a diffusers model's first attention module, or None."""
    for m in model.modules():
        heads, to_q = getattr(m, "heads", None), getattr(m, "to_q", None)
        if isinstance(heads, int) and heads > 0 and isinstance(to_q, torch.nn.Linear):
            return to_q.out_features // heads, to_q.weight
    return None


def default_description(model) -> str:
    """What a plain dense run of ``model`` attends with, unpinned: ``dense SDPA (flash, PyTorch's
    default pick)`` (PyTorch's order asked at the model's head dim, on its attention weights'
    device and dtype; a mask or an odd sequence length can make it pick another)."""
    found = _attention_projection(model) if model is not None else None
    if found is None:
        return DenseBaseline(None, "cpu", "default").describe()
    d, w = found
    q = torch.zeros(1, 1, 128, d, device=w.device, dtype=w.dtype)
    return DenseBaseline(None, w.device.type, "default", default_pick(q, q, q)).describe()
