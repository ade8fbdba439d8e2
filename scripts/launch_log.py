"""Which Triton kernel specialisations a process compiles: the launch recorder of
scripts/gpu_check.sh.

Off unless ``RETTN_LAUNCH_LOG=FILE`` is set. The GPU check sets it for each of its steps;
``scripts/bench_attention.py``, ``bench_compile.py`` and ``profile_latency.py`` call
:func:`install_from_env`, and pytest loads this module as a plugin (``-p launch_log``). It wraps,
in this process only, the ``@triton.jit`` kernels found in ``rettn.ops._triton`` and
that module's public functions (``triton_attention`` and any other entry point; nothing of
torch, nothing process-wide):

- every launch is keyed by its specialisation: kernel, dtype and head dim (last dim) of the first
  tensor argument, the constexpr arguments (tiles, flags) and ``num_warps`` / ``num_stages``;
  the JIT also specialises on which int arguments are 1 or multiples of 16 (sequence lengths,
  strides), which this key leaves out: the GPU's ``compiled`` count below includes those;
- on CUDA those are the keys the JIT compiles, and at exit the JIT's own cache size per kernel
  is written too (``compiled``: it also counts variants from int/stride divisibility);
- on CPU (``TRITON_INTERPRET=1``) a launch carries the interpreter's tiles, not the GPU's, so
  each distinct ``triton_attention`` call is replayed once on fake CUDA tensors (no GPU, no
  launch: ``FakeTensorMode``) with the device reported as an H200 (sm_90), and the launch the
  GPU would make is what is recorded. Interpreter launches from outside those functions are
  counted as ``unmapped``.

Under pytest-xdist each worker writes FILE with ``-gwN`` before the extension. At exit FILE
gets JSON: ``{"device", "kernels": [key, ...], "compiled", "unmapped",
"replay_errors"}``.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import inspect
import json
import os
import types

ENV = "RETTN_LAUNCH_LOG"
# what a replayed call sees of "the GPU": an H200 (sm_90), as torch would report it
_H200 = types.SimpleNamespace(name="NVIDIA H200", major=9, minor=0, multi_processor_count=132,
                              total_memory=150_754_820_096, shared_memory_per_block=49152,
                              shared_memory_per_block_optin=232448, shared_memory_per_multiprocessor=233472,
                              regs_per_multiprocessor=65536, warp_size=32, L2_cache_size=62914560)

_recorder = None


def _constexpr_names(kernel) -> list[str]:
    params = getattr(kernel, "params", None)
    if params and all(hasattr(p, "is_constexpr") for p in params):
        return [p.name for p in params if p.is_constexpr]
    try:  # the interpreter's kernels: read the annotations (strings under postponed evaluation)
        sig = inspect.signature(kernel.fn)
    except (AttributeError, TypeError, ValueError):
        return []
    return [n for n, p in sig.parameters.items() if "constexpr" in str(p.annotation)]


def _is_kernel(obj) -> bool:
    try:
        from triton.runtime.jit import KernelInterface
    except ImportError:  # pragma: no cover - triton without it
        return False
    return isinstance(obj, KernelInterface)


class _Recorder:
    def __init__(self, path: str):
        self.path = path
        self.keys: dict[str, dict] = {}  # json text -> key
        self.unmapped: dict[str, dict] = {}
        self.replay_errors: dict[str, str] = {}
        self.replayed: set = set()
        self.replaying = False
        self.in_entry = 0
        self.kernels: dict = {}
        self.device = None

    # ---------------------------------------------------------------- launches
    def launch(self, name, kernel, consts, args, kwargs):
        first = next((a for a in args if hasattr(a, "dtype") and hasattr(a, "stride")), None)
        dtype = None if first is None else str(first.dtype).replace("torch.", "")
        device = None if first is None else first.device.type
        values = dict(zip(getattr(kernel, "arg_names", []), args))
        values.update(kwargs)
        key = {"kernel": name, "dtype": dtype, "head_dim": None if first is None else int(first.shape[-1])}
        key.update({n: values[n] for n in consts if n in values})
        for n in ("num_warps", "num_stages"):
            if n in kwargs:
                key[n] = kwargs[n]
        text = json.dumps(key, sort_keys=True, default=str)
        if self.replaying or device == "cuda":
            self.keys.setdefault(text, key)
            self.device = self.device or ("cuda (replayed on fake tensors)" if self.replaying else "cuda")
        elif not self.in_entry:
            self.unmapped.setdefault(text, key)

    def wrap_kernel(self, name, kernel):
        rec, consts = self, _constexpr_names(kernel)

        class Proxy:
            def __getitem__(self, grid):
                launch = kernel[grid]

                def run(*args, **kwargs):
                    rec.launch(name, kernel, consts, args, kwargs)
                    if rec.replaying:
                        return None  # fake tensors: record, do not launch
                    return launch(*args, **kwargs)

                return run

            def __getattr__(self, attr):
                return getattr(kernel, attr)

        self.kernels[name] = kernel
        return Proxy()

    # ---------------------------------------------------------------- replays
    def wrap_entry(self, fn):
        rec = self
        import torch

        def entry(*args, **kwargs):
            if torch.compiler.is_compiling():  # inside a graph torch.compile traces: pass through
                return fn(*args, **kwargs)
            rec.in_entry += 1
            try:
                out = fn(*args, **kwargs)
            finally:
                rec.in_entry -= 1
            if not rec.replaying and _on_cpu(args):
                rec.replay(fn, args, kwargs)
            return out

        entry.__wrapped__ = fn
        return entry

    def replay(self, fn, args, kwargs):
        sig = json.dumps([_signature(a) for a in args] + sorted((k, _signature(v)) for k, v in kwargs.items()),
                         default=str)
        if sig in self.replayed:
            return
        self.replayed.add(sig)
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode

        try:
            with FakeTensorMode():
                # the first fake CUDA tensor primes torch's (cached) GPU-context check while
                # torch.cuda still says there is no GPU; the patched queries below come after
                torch.empty(1, device="cuda")
                with _as_h200(torch):
                    fake_args = [_to_fake_cuda(a, torch) for a in args]
                    fake_kwargs = {k: _to_fake_cuda(v, torch) for k, v in kwargs.items()}
                    self.replaying = True
                    try:
                        fn(*fake_args, **fake_kwargs)
                    finally:
                        self.replaying = False
        except Exception as e:  # noqa: BLE001 - a replay never breaks the real run; it is reported
            self.replay_errors.setdefault(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", sig)

    # ---------------------------------------------------------------- report
    def compiled(self) -> dict:
        """{kernel: compiled variants} from the JIT's own caches (CUDA only; None otherwise)."""
        out = {}
        for name, kernel in self.kernels.items():
            caches = getattr(kernel, "device_caches", None)
            if caches is None:
                out[name] = None
                continue
            n = 0
            for entry in caches.values():
                cache = entry[0] if isinstance(entry, tuple) else entry
                n += len(cache) if hasattr(cache, "__len__") else 0
            out[name] = n
        return out

    def report(self) -> dict:
        return {"device": self.device, "kernels": sorted(self.keys.values(), key=_order),
                "compiled": self.compiled(), "unmapped": sorted(self.unmapped.values(), key=_order),
                "replay_errors": sorted(self.replay_errors)}

    def write(self):
        with open(self.path, "w") as f:
            json.dump(self.report(), f, indent=1, default=str)


def _order(key: dict):
    return json.dumps(key, sort_keys=True, default=str)


def _on_cpu(args) -> bool:
    return any(getattr(getattr(a, "device", None), "type", None) == "cpu" for a in args if hasattr(a, "stride"))


def _signature(x):
    if hasattr(x, "stride") and hasattr(x, "dtype"):
        return ["tensor", str(x.dtype), list(x.shape), list(x.stride())]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return [type(x).__name__] + [_signature(getattr(x, f.name)) for f in dataclasses.fields(x)]
    if isinstance(x, float):
        return "float"
    return repr(x)


def _to_fake_cuda(x, torch):
    if isinstance(x, torch.Tensor):
        return torch.empty_strided(tuple(x.shape), tuple(x.stride()), dtype=x.dtype, device="cuda")
    if dataclasses.is_dataclass(x) and not isinstance(x, type):  # e.g. a BlockSparseLayout
        changes = {f.name: _to_fake_cuda(getattr(x, f.name), torch) for f in dataclasses.fields(x)
                   if isinstance(getattr(x, f.name), torch.Tensor)}
        if "validate" in {f.name for f in dataclasses.fields(x)}:
            changes["validate"] = False
        return dataclasses.replace(x, **changes)
    if isinstance(x, tuple):
        return tuple(_to_fake_cuda(v, torch) for v in x)
    return x


@contextlib.contextmanager
def _as_h200(torch):
    """torch.cuda's device queries answer as an H200 would, for the replay only."""
    cuda = torch.cuda
    patches = {"is_available": lambda: True, "get_device_capability": lambda *a, **k: (9, 0),
               "get_device_properties": lambda *a, **k: _H200, "get_device_name": lambda *a, **k: _H200.name,
               "current_device": lambda: 0, "device_count": lambda: 1,
               "current_stream": lambda *a, **k: types.SimpleNamespace(cuda_stream=0)}
    saved = {n: getattr(cuda, n) for n in patches}
    try:
        for n, f in patches.items():
            setattr(cuda, n, f)
        yield
    finally:
        for n, f in saved.items():
            setattr(cuda, n, f)


def install(path: str):
    """Wrap rettn's Triton kernels and triton_attention in this process; write ``path`` at exit."""
    global _recorder
    if _recorder is not None:
        return _recorder
    from rettn.ops import _triton as triton_sparse

    rec = _Recorder(path)
    for name, obj in list(vars(triton_sparse).items()):
        if _is_kernel(obj):
            setattr(triton_sparse, name, rec.wrap_kernel(name, obj))
        elif inspect.isfunction(obj) and not name.startswith("_") and obj.__module__ == triton_sparse.__name__:
            setattr(triton_sparse, name, rec.wrap_entry(obj))  # triton_attention and any other entry point
    atexit.register(rec.write)
    _recorder = rec
    return rec


def install_from_env():
    path = os.environ.get(ENV)
    if path and os.environ.get("PYTEST_XDIST_WORKER"):  # pytest-xdist: one file per worker
        root, ext = os.path.splitext(path)
        path = f"{root}-{os.environ['PYTEST_XDIST_WORKER']}{ext}"
    return install(path) if path else None


def pytest_sessionstart(session):  # pytest plugin (-p launch_log): after conftest set TRITON_INTERPRET
    install_from_env()
