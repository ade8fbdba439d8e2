"""Where the cached residuals R live between steps: next to the activations, or offloaded to host
memory (``RettnConfig.residual_device="cpu"``).

R is as large as the attention output of every sparsified layer (136 MB per layer for
CogVideoX-2B in bf16, 4.1 GB for the model); rho is 1/D of it and stays on the device.

Offload on CUDA:

- cache step (:meth:`ResidualStore.put`): R is cast to its storage dtype on the compute stream;
  a side stream waits for that (an event) and copies it into pinned host memory
  (``non_blocking``); ``record_stream`` keeps the device tensor's memory from being reused before
  the copy has read it. The compute stream does not wait.
- sparse step (:meth:`ResidualStore.fetch`): the host copy goes back to the device on the side
  stream and the compute stream waits for it (an event). Then the next residual in cache-step
  order (the next layer's, or the first one's after the last) is prefetched on the side stream
  into a fresh device buffer, so its copy overlaps the rest of this layer's compute; when the
  next call asks for it, only an event wait remains. The buffer is handed to the compute
  stream with ``record_stream``. At most one prefetched residual is held on the device.
- copies in both directions share the side stream, so a prefetch never reads a host buffer that
  its cache-step copy has not finished writing.

On CPU (or with tensors already where they are asked for) ``put`` is ``tensor.to(device, dtype)``
and ``fetch`` is ``tensor.to(device)``: the results are exactly those without offload.
"""

from __future__ import annotations

import bisect
import itertools
import threading
import weakref

import torch

from rettn.errors import ConfigError


FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def quantize_fp8(residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """R in float8_e4m3fn with a float32 scale per row (its largest magnitude maps to 448):
    ``(data, scale)``, ``scale`` of shape (..., 1). A zero row keeps scale 1."""
    amax = residual.abs().amax(dim=-1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (residual.float() / scale).to(torch.float8_e4m3fn), scale


def dequantize_fp8(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of :func:`quantize_fp8`, in ``dtype`` on ``data``'s device."""
    return (data.float() * scale.to(data.device)).to(dtype)


class ResidualStore:
    """Puts cached residuals where the config says and brings them back for the sparse steps.

    Args:
        device: ``None`` (keep them on the device of the activations) or ``"cpu"`` (offload).
        prefetch: prefetch the next residual in cache-step order (offload on CUDA only).
    """

    def __init__(self, device: str | None = None, prefetch: bool = True):
        if device not in (None, "cpu"):
            raise ConfigError(f"residual device must be None or 'cpu', got {device!r}")
        self.device = device
        self.prefetch = prefetch
        self._order: list[int] = []  # sequence numbers of the live offloaded residuals, increasing
        self._live: dict[int, tuple] = {}  # sequence number -> (weakref to host tensor, D2H event)
        self._seq_of: dict[int, int] = {}  # id(host tensor) -> sequence number
        self._counter = itertools.count()
        self._streams: dict = {}  # CUDA device -> side stream
        self._pending = None  # (weakref host residual, device tensor, event) of the prefetched one
        self._lock = threading.RLock()  # RLock: a weakref callback may run while it is held
        self.counts = {"offloaded": 0, "fetched": 0, "prefetched": 0, "prefetch_hits": 0}

    def __repr__(self):
        return (f"ResidualStore(device={self.device!r}, live={len(self._order)}, "
                f"prefetch={self.prefetch}, counts={self.counts})")

    # ------------------------------------------------------------------ cache step
    def put(self, residual: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Store a freshly computed residual in ``dtype``; returns the tensor to keep."""
        stored = residual.to(dtype=dtype)
        if self.device is None:
            return stored
        if residual.device.type != "cuda":
            host, done = stored.to(self.device), None
        else:
            side = self._side(residual.device)
            host = torch.empty(stored.shape, dtype=dtype, pin_memory=True)
            done = torch.cuda.Event()
            side.wait_stream(torch.cuda.current_stream(residual.device))
            with torch.cuda.stream(side):
                host.copy_(stored, non_blocking=True)
                done.record(side)
            stored.record_stream(side)  # its memory is not reused before the copy has read it
        with self._lock:
            self._remember(host, done)
        self.counts["offloaded"] += 1
        return host

    def _remember(self, host: torch.Tensor, done):
        seq = next(self._counter)
        hid = id(host)

        def forget(_, seq=seq, hid=hid):
            with self._lock:
                self._live.pop(seq, None)
                if self._seq_of.get(hid) == seq:
                    del self._seq_of[hid]
                i = bisect.bisect_left(self._order, seq)
                if i < len(self._order) and self._order[i] == seq:
                    del self._order[i]

        self._live[seq] = (weakref.ref(host, forget), done)
        self._seq_of[hid] = seq
        self._order.append(seq)

    # ------------------------------------------------------------------ sparse step
    def fetch(self, residual: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``residual`` on ``device`` (a no-op when it is there already)."""
        if residual.device == device:
            return residual
        if device.type != "cuda" or not residual.is_pinned():
            return residual.to(device, non_blocking=True)
        current = torch.cuda.current_stream(device)
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None and pending[0]() is residual:
            _, out, event = pending
            current.wait_event(event)
            self.counts["prefetch_hits"] += 1
        else:
            del pending  # another layer's: dropped (its memory returns to the side stream's pool)
            out, event = self._copy_in(residual, device)
            current.wait_event(event)
        out.record_stream(current)  # allocated on the side stream, used on the compute stream
        self.counts["fetched"] += 1
        if self.prefetch:
            self._prefetch_after(residual, device)
        return out

    def _copy_in(self, host: torch.Tensor, device: torch.device):
        side = self._side(device)
        done = self._copied(host)
        with torch.cuda.stream(side):
            if done is not None:
                side.wait_event(done)  # its cache-step copy (same stream: ordered; explicit)
            out = host.to(device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(side)
        return out, event

    def _prefetch_after(self, host: torch.Tensor, device: torch.device):
        nxt = self.next_after(host)
        if nxt is None or nxt is host:
            return
        out, event = self._copy_in(nxt, device)
        with self._lock:
            self._pending = (weakref.ref(nxt), out, event)
        self.counts["prefetched"] += 1

    def next_after(self, host: torch.Tensor) -> torch.Tensor | None:
        """The live offloaded residual stored after ``host`` (wrapping round to the first): the
        one the next sparse-step call will most likely ask for, as calls follow cache-step order
        (layer by layer, CFG branch by branch). None if ``host`` is not an offloaded residual."""
        with self._lock:
            seq = self._seq_of.get(id(host))
            if seq is None or self._live.get(seq, (lambda: None,))[0]() is not host:
                return None
            i = bisect.bisect_right(self._order, seq)
            for s in itertools.chain(self._order[i:], self._order[:i]):
                t = self._live[s][0]() if s in self._live else None
                if t is not None:
                    return t
        return None

    def wait(self, host: torch.Tensor):
        """Block until ``host``'s copy from the device has landed (offload on CUDA; a no-op
        otherwise): before the host itself reads it (the adaptive schedule's head sample)."""
        done = self._copied(host)
        if done is not None:
            done.synchronize()

    def _copied(self, host: torch.Tensor):
        """The event of ``host``'s device-to-host copy (None: not an offloaded CUDA residual)."""
        with self._lock:
            seq = self._seq_of.get(id(host))
            return self._live[seq][1] if seq is not None and seq in self._live else None

    # ------------------------------------------------------------------ helpers
    def _side(self, device: torch.device) -> torch.cuda.Stream:
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        return stream

    def synchronize(self):
        """Wait for every copy in flight (before reading an offloaded residual on the host)."""
        for stream in self._streams.values():
            stream.synchronize()

    def clear(self):
        """Drop the prefetched copy (the stored residuals belong to their cache entries)."""
        with self._lock:
            self._pending = None
