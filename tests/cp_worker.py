"""Run by tests/test_parallel.py under ``torch.distributed.run --nproc_per_node 2`` (gloo, CPU).

    python -m torch.distributed.run --nproc_per_node 2 tests/cp_worker.py OUT

On a tiny Wan transformer, in turn: ``dense`` (Ulysses without rettn), ``ulysses``
(enable_parallelism, then apply_rettention), ``ulysses-after`` (the other order), ``ring``
(ring_degree=2: rettn must refuse). Rank 0 writes what it saw to OUT (torch.save).
"""

import sys
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_models import tiny_inputs, tiny_transformer  # noqa: E402

import rettn  # noqa: E402

CONFIG = dict(keep=0.25, block_size=32, min_seq_len=0, warmup=1, refresh_interval=3, dense_final=0, num_inference_steps=6)
TIMESTEPS = (900, 750, 600, 450, 300, 150)


def run_steps(model, batch=2):
    kw = tiny_inputs("wan", model, batch=batch)
    outs = []
    with torch.no_grad():
        for t in TIMESTEPS:
            outs.append(model(**{**kw, "timestep": torch.full_like(kw["timestep"], t)})[0])
    return outs


def enable_cp(model, **degrees):
    from diffusers import ContextParallelConfig

    # diffusers picks the rank's device as rank % torch.accelerator.device_count(), which is 0
    # on a CPU-only machine; one "device" (the CPU) is what it needs here
    with mock.patch("torch.accelerator.device_count", return_value=max(1, torch.accelerator.device_count())):
        model.enable_parallelism(config=ContextParallelConfig(**degrees))


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    result = {"world": dist.get_world_size()}
    for mode in ("dense", "ulysses", "ulysses-after", "ring"):
        model = tiny_transformer("wan", 0, qk_gain=8.0)
        if mode == "ring":
            enable_cp(model, ring_degree=2)
            try:
                rettn.apply_rettention(model, **CONFIG)
            except NotImplementedError as e:
                result["ring"] = str(e)
            continue
        handle = rettn.apply_rettention(model, **CONFIG) if mode == "ulysses-after" else None
        enable_cp(model, ulysses_degree=2)
        if mode == "ulysses":
            handle = rettn.apply_rettention(model, **CONFIG)
        result[mode] = {"outs": run_steps(model)}
        if handle is not None:
            stats = handle.stats()
            result[mode].update(kinds=stats.kinds(), density=stats.mean_density())
    if dist.get_rank() == 0:
        torch.save(result, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
