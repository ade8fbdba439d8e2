"""Backend choice by measurement: ``backend=None`` ("auto") times the candidates at the first call
of each (operation, shape, dtype, density bucket) and keeps the fastest.

Where it runs: inside the eager body of the ``rettn::sparse_attention`` custom op (and of the
direct call that autograd uses), which receives the backend string ``"auto"``. Under
``torch.compile`` the op is one opaque node whose fake implementation never reaches this module,
so the choice is never traced, guarded on or recompiled for; it is made at run time, on real
tensors, outside any graph.

Candidates (:mod:`._candidates`; the backend strings :func:`rettn.ops._dispatch.run` accepts):

- ``"triton:BMxBN"``: rettn's Triton kernel with query/key tiles BM x BN (a few tile shapes that
  divide the layout's blocks); not for float32 on CUDA (the kernel's fp32 dot products are FMA
  with register spills), not when autograd needs a backward;
- ``"flex"``: FlexAttention with the layout's ``BlockMask`` (built once per layout, outside the
  timed calls);
- ``"torch"``: the gather + batched matmul path (cuBLAS on CUDA): correct everywhere, the
  reference the other candidates are checked against;
- for a whole cache step (op ``"cache"``, :mod:`._cache_pass`): ``"fused"``, the one-pass Triton
  kernel (dense output, rho and R from one sweep over every key block; on CUDA at head dim <= 64
  also ``"fused:128x128"``, larger tiles, and on Hopper at 72-128 ``"fused:64x64"``), against
  ``"dense+stats"``, the fastest dense kernel with lse (cuDNN on an H200) then the statistics
  launch; not measured (CPU, capture): ``"dense+stats"``;
- ``"sdpa:flash"``, ``"sdpa:cudnn"``, ``"sdpa:efficient"`` (CUDA), ``"sdpa:cpu"``: PyTorch's
  dense kernels that return the lse (:mod:`rettn.ops._dense`), for dense attention with lse
  and for layouts that select every block (counted density 1), where dense attention computes
  exactly what the layout asks. They never stand in for a layout that skips blocks: a dense
  result there is a different result (nothing silently dense).

Measuring: every candidate runs once (compiles, warms up) and its output and lse are compared
with the reference candidate's; one that fails or disagrees is dropped with the reason. The rest
are timed round-robin in three windows (CUDA events on CUDA, ``perf_counter`` on CPU), each
repeating the call until about 5 ms have passed; the median per-call time decides. Under CUDA
graph capture nothing is measured (the default is used and not stored).

Where measurement is on: CUDA by default. CPU ``"auto"`` stays the torch path (dense: PyTorch's
CPU flash kernel) unless measurement is enabled explicitly (``configure(measure=True)`` or
``RETTN_BACKEND_MEASURE=1``): on shared CPU machines the timings are noisy enough to flip between
runs. ``RETTN_BACKEND_MEASURE=0`` turns measurement off everywhere (the static defaults run and
are listed with source ``"default"``). Both variables are read once, when the default chooser is
created (at the first auto call), never per call.

Keys and cache: the key holds the operation (``sparse``, ``sparse+lse``, ``rescaled``,
``dense+lse``, ``cache``), device, dtype, (B, H, Sq, Sk, D), the layout's block sizes, the density bucket
(half-octaves: ``(0.0442, 0.0625]``; ``full`` for a layout that selects every token pair) and
whether autograd is on. A layout's density is read (one device sync) the first time a layout of
its shape and index width is seen; later layouts with the same shape and width reuse that bucket,
so a call costs no sync. Choices live in memory and, with ``RETTN_BACKEND_CACHE=path.json`` or
``configure(cache_path=...)``, in a JSON file (keys include the device name and the torch and
triton versions, so an upgrade measures again). :func:`backend_choices` returns the table: the
choice, each candidate's time and each skipped candidate's reason.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import threading
import warnings
from pathlib import Path

import torch

from rettn.errors import InputError, UnsupportedError
from rettn.ops._candidates import (
    default_candidates,
    default_choice,
    disagreement,
    first_line,
    measure_seconds,
    sync,
)
from rettn.ops._tiles import triton_installed

ENV_MEASURE = "RETTN_BACKEND_MEASURE"
ENV_CACHE = "RETTN_BACKEND_CACHE"
FILE_FORMAT = "rettn-backend-choices/1"
OPS = ("sparse", "sparse+lse", "rescaled", "dense+lse", "cache")
_REFERENCES = ("torch", "sdpa:flash", "sdpa:efficient", "sdpa:cpu")  # agreement baseline, in order


def density_bucket(density: float) -> str:
    """``"full"`` for a layout that computes every token pair, else the half-octave holding it."""
    if density >= 1.0 - 1e-9:
        return "full"
    k = math.ceil(2.0 * math.log2(max(density, 1e-12)) - 1e-9)
    return f"({2.0 ** ((k - 1) / 2):.3g}, {2.0 ** (k / 2):.3g}]"


class BackendChooser:
    """Chooses the backend for ``backend="auto"`` calls and remembers why.

    Args:
        measure: ``"cuda"`` (time on CUDA only, the default), ``True`` (also on CPU), ``False``
            (never: the static defaults). ``None`` reads ``RETTN_BACKEND_MEASURE`` ("0": False,
            "1": True, unset: "cuda").
        cache_path: JSON file of measured choices, read at the first lookup and rewritten after
            each measurement. ``None`` reads ``RETTN_BACKEND_CACHE`` (unset: memory only).
        timer: ``timer(fns, device) -> {name: seconds}`` for ``{name: zero-argument callable}``
            (default :func:`measure_seconds`); tests inject timings here.
        candidates: ``candidates(op, q, layout, grad, full) -> (names, {skipped: reason})``
            (default :func:`default_candidates`).
    """

    def __init__(self, measure=None, cache_path=None, timer=None, candidates=None):
        if measure is None:
            env = os.environ.get(ENV_MEASURE)
            measure = {"0": False, "1": True}.get(env, "cuda")
        if measure not in ("cuda", True, False):
            raise InputError(f"measure must be 'cuda', True or False, got {measure!r}")
        self.measure = measure
        if cache_path is None:
            cache_path = os.environ.get(ENV_CACHE) or None
        self.cache_path = Path(cache_path).expanduser() if cache_path else None
        self.timer = timer or measure_seconds
        self.candidates = candidates or default_candidates
        self._fast: dict = {}  # key -> backend string
        self._records: dict = {}  # key -> record (the table)
        self._buckets: dict = {}  # layout signature -> density bucket
        self._disk: dict | None = None
        self._lock = threading.RLock()
        self._device_names: dict = {}
        self.measurements = 0

    # ------------------------------------------------------------------ the per-call path
    def measures(self, device: torch.device) -> bool:
        return self.measure is True or (self.measure == "cuda" and device.type == "cuda")

    def _bucket(self, layout) -> tuple:
        # (the layout is on q's device, which the key holds)
        sig = (layout.kv_num_blocks.shape, layout.kv_indices.shape[3], layout.block_q, layout.block_k,
               layout.seq_q, layout.seq_k)
        bucket = self._buckets.get(sig)
        if bucket is None:
            bucket = self._buckets[sig] = density_bucket(layout.density())
        return (layout.block_q, layout.block_k), bucket

    def key(self, op, q, k, layout, grad) -> tuple:
        blocks, bucket = (None, None) if layout is None else self._bucket(layout)
        return (op, q.device, q.dtype, q.shape, k.shape[2], blocks, bucket, grad)

    def resolve(self, q, k, v, layout, scale, return_lse, rho, residual, run) -> str:
        """The backend string for this call; measures first when the key is new.

        ``run(name) -> (out, lse)`` runs the call with backend ``name`` (measurement only)."""
        grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, rho, residual))
        if layout is None:
            op = "dense+lse"
        else:
            op = "rescaled" if rho is not None else ("sparse+lse" if return_lse else "sparse")
        key = self.key(op, q, k, layout, grad)
        found = self._fast.get(key)
        if found is None:
            found = self._decide(key, op, q, layout, grad, run)
        name, fallback = found
        if fallback is not None and layout.density() < 1.0 - 1e-9:
            # a dense kernel was chosen for full layouts of this shape and index width; this one
            # skips blocks, so it runs the fastest sparse candidate instead (one sync per layout)
            return fallback
        return name

    def resolve_cache(self, q, k, layout, run) -> str:
        """The route of a whole cache step (op ``"cache"``): ``"fused"``/``"fused:BMxBN"`` (one
        Triton pass over every key block) or ``"dense+stats"`` (the dense kernel with lse, then the statistics launch);
        measured at the first call of a key. ``run(name) -> (R or out_dense, rho)``."""
        key = self.key("cache", q, k, layout, False)
        found = self._fast.get(key)
        if found is None:
            found = self._decide(key, "cache", q, layout, False, run)
        return found[0]

    def lookup(self, op, q, k, layout, grad=False) -> str | None:
        """The stored choice for such a call, or None when none was made yet (measures nothing)."""
        found = self._fast.get(self.key(op, q, k, layout, grad))
        return None if found is None else found[0]

    # ------------------------------------------------------------------ deciding
    def _decide(self, key, op, q, layout, grad, run) -> tuple:
        """(choice, fallback for non-full layouts when the choice is a dense kernel, else None)."""
        with self._lock:
            if key in self._fast:
                return self._fast[key]
            full = key[6] == "full"
            names, skipped = self.candidates(op, q, layout, grad, full)
            record = {"op": op, "device": self._device_name(q.device), "dtype": str(q.dtype).replace("torch.", ""),
                      "shape": [*key[3][:3], key[4], key[3][3]], "blocks": None if key[5] is None else list(key[5]),
                      "density_bucket": key[6], "autograd": grad, "candidates": list(names),
                      "skipped": dict(skipped), "timings_ms": {}}
            stored = self._from_disk(self._key_text(record))
            capturing = q.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
            if stored is not None and stored.get("choice") in names:
                record.update(choice=stored["choice"], source="disk", timings_ms=stored.get("timings_ms", {}),
                              skipped={**record["skipped"], **stored.get("skipped", {})})
            elif self.measures(q.device) and not capturing and len(names) > 1:
                self._measure(record, names, run, q)
                record["source"] = "measured"
                self._to_disk(record)
            else:
                record["choice"] = default_choice(op, q, names)
                record["source"] = "default"
                record["note"] = ("one candidate" if len(names) == 1 else "CUDA graph capture: not measured"
                                  if capturing else f"not measured on {q.device.type} (measure={self.measure!r})")
            fallback = None
            if record["choice"].startswith("sdpa:") and layout is not None:
                timed = {n: t for n, t in record["timings_ms"].items() if not n.startswith("sdpa:")}
                fallback = record["fallback"] = (
                    min(timed, key=timed.get) if timed
                    else default_choice(op, q, [n for n in names if not n.startswith("sdpa:")]))
            if not capturing:
                self._records[key] = record
                self._fast[key] = (record["choice"], fallback)
            return record["choice"], fallback

    def _measure(self, record, names, run, q):
        self.measurements += 1
        outputs = {}
        with torch.no_grad():
            for name in names:
                try:
                    outputs[name] = run(name)
                    sync(q.device)
                except Exception as e:  # noqa: BLE001 - a candidate that cannot run is reported, not raised
                    record["skipped"][name] = f"failed: {first_line(e)}"
            if not outputs:
                raise UnsupportedError(f"rettn: no attention backend could run this call: {record['skipped']}")
            baseline = next((n for n in _REFERENCES if n in outputs), next(iter(outputs)))
            record["baseline"] = baseline
            for name in list(outputs):
                why = None if name == baseline else disagreement(outputs[name], outputs[baseline], q.dtype)
                if why:
                    record["skipped"][name] = f"disagrees with {baseline}: {why}"
                    del outputs[name]
            ok = list(outputs)
            outputs.clear()
            secs = self.timer({name: functools.partial(run, name) for name in ok}, q.device)
        record["timings_ms"] = {name: 1e3 * float(secs[name]) for name in ok}
        record["choice"] = min(ok, key=lambda n: record["timings_ms"][n])

    # ------------------------------------------------------------------ table and disk
    def choices(self) -> list[dict]:
        """Every choice made so far: op, device, dtype, shape [B, H, Sq, Sk, D], blocks, density
        bucket, choice, source (measured / disk / default), timings_ms, skipped reasons."""
        with self._lock:
            return [json.loads(json.dumps(r)) for r in self._records.values()]

    def clear(self):
        with self._lock:
            self._fast.clear()
            self._records.clear()
            self._buckets.clear()
            self._disk = None

    def _device_name(self, device: torch.device) -> str:
        name = self._device_names.get(device)
        if name is None:
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
            self._device_names[device] = name
        return name

    @staticmethod
    def _key_text(record) -> str:
        triton = "-"
        if triton_installed():
            import triton

            triton = triton.__version__
        parts = [record["op"], record["device"], record["dtype"], "x".join(map(str, record["shape"])),
                 "-" if record["blocks"] is None else "x".join(map(str, record["blocks"])),
                 str(record["density_bucket"]), "grad" if record["autograd"] else "nograd",
                 f"torch={torch.__version__}", f"triton={triton}"]
        return "|".join(parts)

    def _read_file(self) -> dict:
        try:
            data = json.loads(self.cache_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            warnings.warn(f"rettn: ignoring the backend cache {self.cache_path}: {first_line(e)}", stacklevel=3)
            return {}
        if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
            return {}
        entries = data.get("entries")
        return entries if isinstance(entries, dict) else {}

    def _from_disk(self, text: str):
        if self.cache_path is None:
            return None
        if self._disk is None:
            self._disk = self._read_file()
        return self._disk.get(text)

    def _to_disk(self, record):
        if self.cache_path is None:
            return
        entry = {k: record[k] for k in ("choice", "timings_ms", "skipped")}
        entries = self._read_file()  # another process may have added entries meanwhile
        entries[self._key_text(record)] = entry
        self._disk = entries
        try:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_path.with_name(f"{self.cache_path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"format": FILE_FORMAT, "entries": entries}, indent=1, sort_keys=True))
            os.replace(tmp, self.cache_path)
        except OSError as e:
            warnings.warn(f"rettn: could not write the backend cache {self.cache_path}: {first_line(e)}",
                          stacklevel=3)


_default: BackendChooser | None = None
_default_lock = threading.Lock()
# whether CPU auto calls go to the chooser: read by the public functions in traced code too, so a
# plain module flag (set with the chooser), not a call that could create one mid-trace
_measure_cpu = os.environ.get(ENV_MEASURE) == "1"


def measures_cpu() -> bool:
    return _measure_cpu


def _install(chooser: BackendChooser | None):
    global _default, _measure_cpu
    _default = chooser
    _measure_cpu = (chooser.measure is True) if chooser is not None else os.environ.get(ENV_MEASURE) == "1"


def default_chooser() -> BackendChooser:
    """The process's chooser (created at first use, reading the environment once)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = BackendChooser()
    return _default


def configure(**kwargs) -> BackendChooser:
    """Replace the process's chooser with ``BackendChooser(**kwargs)`` (forgetting its choices)."""
    chooser = BackendChooser(**kwargs)
    with _default_lock:
        _install(chooser)
    return chooser


@contextlib.contextmanager
def use_chooser(chooser: BackendChooser):
    """Use ``chooser`` for auto calls inside the block (tests, benchmarks)."""
    with _default_lock:
        previous = _default
        _install(chooser)
    try:
        yield chooser
    finally:
        with _default_lock:
            _install(previous)


def backend_choices() -> list[dict]:
    """The choice table of the process's chooser (see :meth:`BackendChooser.choices`)."""
    return default_chooser().choices()


def resolve(q, k, v, layout, scale, return_lse, rho, residual, run) -> str:
    return default_chooser().resolve(q, k, v, layout, scale, return_lse, rho, residual, run)


def resolve_cache(q, k, layout, run) -> str:
    return default_chooser().resolve_cache(q, k, layout, run)
