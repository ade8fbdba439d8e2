"""Sequence parallelism: diffusers' context parallelism (Ulysses) with rettn, two CPU processes
over gloo, against one process with the same seed."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rettn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cp_worker  # noqa: E402
from tiny_models import tiny_transformer  # noqa: E402

pytest.importorskip("diffusers.models.attention_dispatch")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp") / "result.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(HERE / "cp_worker.py"), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def one_process():
    model = tiny_transformer("wan", 0, qk_gain=8.0)
    dense = cp_worker.run_steps(model)
    handle = rettn.apply_rettention(model, **cp_worker.CONFIG)
    sparse = cp_worker.run_steps(model)
    return {"dense": dense, "sparse": sparse, "kinds": handle.stats().kinds(),
            "density": handle.stats().mean_density()}


def _max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def test_ulysses_dense_matches_one_process(two_process_run, one_process):
    assert two_process_run["world"] == 2
    assert _max_diff(two_process_run["dense"]["outs"], one_process["dense"]) < 1e-5


@pytest.mark.parametrize("order", ["ulysses", "ulysses-after"])
def test_ulysses_rettn_matches_one_process(two_process_run, one_process, order):
    """Same outputs as one process, whether rettn or the parallel config came first."""
    run = two_process_run[order]
    assert run["kinds"] == one_process["kinds"] == ["dense", "cache", "sparse", "sparse", "cache", "sparse"]
    assert run["density"] == pytest.approx(one_process["density"])
    assert run["density"] < 0.5
    assert _max_diff(run["outs"], one_process["sparse"]) < 1e-5
    # and rettn really ran sparse under context parallelism (not silently dense)
    assert _max_diff(run["outs"][2:4], one_process["dense"][2:4]) > 1e-3


def test_ring_attention_is_refused(two_process_run):
    msg = two_process_run["ring"]
    assert "ring attention" in msg and "ulysses_degree" in msg


def test_ring_refused_at_call_time_too():
    """enable_parallelism(ring) after apply_rettention: the first call raises, no wrong result."""
    from rettn.diffusers.parallel import context_parallel as _context_parallel

    class CP:
        _world_size, ring_degree, ulysses_degree = 2, 2, 1

    class PC:
        context_parallel_config = CP()

    with pytest.raises(NotImplementedError, match="ring attention"):
        _context_parallel(PC())
    CP.ring_degree, CP.ulysses_degree = 1, 2
    assert _context_parallel(PC()) is not None
    CP._world_size = 1
    assert _context_parallel(PC()) is None
