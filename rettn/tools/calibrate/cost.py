"""Cost models: what a dense, a cache and a sparse step cost, relative to a dense step.

- :func:`measured_costs`: timed on the device at hand, through the pipeline being calibrated (its
  real attention shape): short generations whose schedule alternates cache and sparse steps,
  one per keep, each step timed by the profiler's step clock (CUDA events).
- :func:`flops_costs`: counted for a named architecture (``configs/archs``, the profiler's specs)
  at its full generation shape: the transformer is built on the meta device and its forward is
  counted by ``torch.utils.flop_counter``; self-attention FLOPs scale with the counted density of
  the keep at that shape (text rows and columns dense). A CPU user can plan a GPU run with it.

A layer kept dense at sparse steps costs its share of a dense step (``dense_fraction``).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch

from rettn.errors import UsageError


@dataclass
class CostModel:
    """Step costs relative to a dense step: ``cache[keep]`` and ``sparse[keep]``."""

    source: str
    cache: dict = field(default_factory=dict)
    sparse: dict = field(default_factory=dict)
    attention_share: float | None = None  # self-attention's share of a dense step, when known
    seconds_dense: float | None = None  # measured: one dense step

    def run(self, counts: dict, keep: float, dense_fraction: float = 0.0) -> float:
        """Cost of a generation with ``counts`` = {"dense": n, "cache": n, "sparse": n} steps,
        in dense steps."""
        c, s = self.cache[keep], self.sparse[keep]
        c = c + dense_fraction * (1.0 - c)  # a dense layer runs only its dense pass
        s = s + dense_fraction * (1.0 - s)
        return counts.get("dense", 0) + counts.get("cache", 0) * c + counts.get("sparse", 0) * s

    def speedup(self, counts: dict, keep: float, dense_fraction: float = 0.0) -> float:
        return sum(counts.values()) / self.run(counts, keep, dense_fraction)

    def as_dict(self) -> dict:
        return {"source": self.source, "cache": {str(k): v for k, v in self.cache.items()},
                "sparse": {str(k): v for k, v in self.sparse.items()},
                "attention_share": self.attention_share, "seconds_dense": self.seconds_dense}


def measured_costs(pipe, base, keeps, call_kwargs: dict, seed: int = 0, steps: int = 7, progress=None) -> CostModel:
    """Time dense, cache and sparse steps on this device with the profiler's step clock
    (:func:`rettn.tools.profile.runners.timed_run`): one short generation per keep with warm-up 1
    and a cache step every 2 steps (D C S C S ...), and one all-dense generation. The first step
    of each run is dropped (compilation, caches)."""
    from rettn.tools.profile.runners import PipelineRunner, timed_run

    device = next(pipe.transformer.parameters()).device
    runner = PipelineRunner(pipe, call_kwargs)
    dense, cache, sparse = [], {}, {}
    for keep in (None, *keeps):
        config = base.replace(warmup="100%") if keep is None else \
            base.replace(keep=keep, warmup=1, refresh_interval=2, dense_final=0)
        run = timed_run(runner, steps, device, config, seed=seed)
        times = {"dense": [], "cache": [], "sparse": []}
        for s in run.steps[1:]:
            times[s.kind].append(s.seconds)
        if keep is None:
            dense = times["dense"]
        else:
            cache[keep], sparse[keep] = statistics.median(times["cache"]), statistics.median(times["sparse"])
        if progress is not None:
            progress.update(1)
    d = statistics.median(dense)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return CostModel(f"measured on {name} ({device.type})", {k: v / d for k, v in cache.items()},
                     {k: v / d for k, v in sparse.items()}, None, d)


class _AttentionShapes(torch.overrides.TorchFunctionMode):
    """Records (q shape, k shape) of each SDPA call inside the ``with`` block (nothing else)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.calls.append((tuple(args[0].shape), tuple(args[1].shape)))
        return func(*args, **(kwargs or {}))


def _count(spec, layers: int):
    from torch.utils.flop_counter import FlopCounterMode

    from rettn.tools.profile import archs, dummy_inputs

    model = archs.build_transformer(spec, layers=layers, device="meta", dtype=torch.bfloat16)
    grid = spec.token_grid()
    kwargs = dummy_inputs.forward_inputs(spec.family, model, batch=spec.shape.batch, grid=grid,
                                         text_len=spec.shape.text_len, device="meta")
    shapes = _AttentionShapes()
    with torch.no_grad(), FlopCounterMode(display=False) as counter, shapes:
        model(**kwargs)
    self_flops = sum(4 * q[0] * q[1] * q[2] * k[2] * q[3] for q, k in shapes.calls if q[2] == k[2])
    seq = max((q[2] for q, k in shapes.calls if q[2] == k[2]), default=0)
    return counter.get_total_flops(), self_flops, seq


def flops_costs(target: str, keeps, block_size: int) -> CostModel:
    """Step costs from FLOPs of the architecture ``target`` at its default generation shape."""
    from rettn.diffusers.families import FAMILIES
    from rettn.ops import selection
    from rettn.tools.profile import archs

    if target not in archs.arch_names():
        raise UsageError(f"unknown --target {target!r}; known architectures: {archs.arch_names()}")
    spec = archs.load_arch(target)
    total1, att1, seq = _count(spec, 1)
    total2, att2, _ = _count(spec, 2)
    layers = int(spec.config[spec.layer_keys[0]])
    per_layer, att = total2 - total1, att2 - att1
    base = total1 - per_layer
    dense = base + layers * per_layer
    text = spec.shape.text_len
    where = FAMILIES[spec.family].text
    spans = [(0, text)] if where == "first" else [(seq - text, seq)] if where == "last" else []
    cache, sparse = {}, {}
    for keep in keeps:
        density = float(selection.window(seq, keep, block_size, dense_spans=spans).density_tensor())
        sparse[keep] = (base + layers * (per_layer - att + att * density)) / dense
        cache[keep] = (dense + layers * att * density) / dense
    return CostModel(f"FLOPs of {target} ({seq} tokens, {layers} layers, block {block_size})", cache, sparse,
                     layers * att / dense)
