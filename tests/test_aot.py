"""The Triton kernel compiled ahead of time for sm_80, sm_86 and sm_90 (no GPU needed).

A representative subset of what the dispatcher chooses is compiled with the pinned triton and
inspected (rettn.ops.aot): no spills, shared memory within each architecture's limit, wgmma
on sm_90, 16-byte cp.async K/V loads with at least two buffers, no 2-byte global loads. The
whole matrix (scripts/aot_compile.py, table in docs/kernels.md) is checked here through the
shared-memory estimate the dispatcher uses, which the compiled subset holds to.
"""

import pytest
import torch

from rettn.ops import aot
from rettn.ops import _tiles as ts

SUBSET = [
    aot.Case("sm_90", "bf16", 64, "sparse", 128, lse=True),
    aot.Case("sm_80", "fp16", 64, "dense", lse=True),
    aot.Case("sm_90", "bf16", 72, "step", 128),
    aot.Case("sm_80", "bf16", 72, "step", 128),
    aot.Case("sm_90", "fp16", 72, "cache", 64),
    aot.Case("sm_86", "bf16", 72, "sparse", 128, lse=True),
    aot.Case("sm_86", "bf16", 128, "step", 128),
    aot.Case("sm_90", "bf16", 128, "cache", 128),
    aot.Case("sm_80", "bf16", 256, "step", 128),
    aot.Case("sm_86", "fp16", 256, "cache", 128),
    aot.Case("sm_90", "bf16", 256, "sparse", 64),
    aot.Case("sm_80", "bf16", 72, "checked", 128, seq=4097, broadcast=True),
    aot.Case("sm_90", "bf16", 64, "fused", 128),  # the one-pass cache step (held to 128 registers)
    aot.Case("sm_80", "bf16", 128, "fused", 128),
    aot.Case("sm_90", "fp16", 128, "fused", 128, seq=4097),
]


HINTLESS = aot.Case("sm_90", "bf16", 72, "sparse", 128, align=1)


@pytest.fixture(scope="module")
def compiled():
    """Every case of this file compiled once, in one process without the interpreter."""
    results = aot.compile_in_subprocess(SUBSET + [HINTLESS])
    return {r.case: r for r in results}


@pytest.mark.parametrize("case", SUBSET, ids=lambda c: c.name)
def test_compiles_without_spills_within_shared_memory(case, compiled):
    r = compiled[case]
    assert aot.problems(r) == [], (case.name, aot.problems(r))
    if case.kind == "fused":  # capped at two programs per SM: a few spills allowed, none in a loop
        assert r.loop_spills == 0 and r.local == 0 and r.stack <= 64 and r.shared <= r.smem_limit
    else:
        assert r.local == 0 and r.stack == 0 and r.shared <= r.smem_limit
    assert 0 < r.registers <= 255
    assert r.shared <= r.smem_estimate  # the dispatcher's estimate never under-counts
    if case.arch == "sm_90":
        assert r.wgmma > 0 and r.kv_buffers == r.num_stages == 3
    else:
        assert r.wgmma == 0 and r.kv_buffers == r.num_stages - 1 >= 2


def test_one_pass_cache_step_keeps_two_programs_per_sm_on_hopper(compiled):
    """The fused cache step at head dim 64 on sm_90 is held to 128 registers (.maxnreg): two 8-warp
    programs per SM, as the plain kernel (its own choice: ~140). What spills (24 B, triton 3.7.1)
    lies between and after the key loops, none inside one."""
    r = compiled[aot.Case("sm_90", "bf16", 64, "fused", 128)]
    assert r.registers <= 128 and r.loop_spills == 0 and r.num_warps == 8 and 2 * r.shared <= r.smem_limit


def test_loop_spills_are_found_inside_loops_only():
    sass = """
        /*0100*/                   STL [R1], R12 ;
        /*0110*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0120*/                   LDL R3, [R1+0x4] ;
        /*0130*/               @P3 BRA 0x110 ;
        /*0140*/                   LDL R106, [R1] ;
        /*0150*/                   BRA 0x150;
    """
    assert aot.loop_spills(sass) == 1  # the LDL at 0x120 (the trap loop at 0x150 holds none)


def test_head_dim_72_loads_are_vectorised_and_pipelined(compiled):
    """PixArt's head dim: a constexpr head dim and the row alignment hint (72 elements = 144
    bytes, a multiple of 16) give 16-byte cp.async and 3 stages; before, 2-byte scalar loads."""
    r = compiled[aot.Case("sm_90", "bf16", 72, "step", 128)]
    assert r.cp_async_16 > 0 and r.narrow_loads == 0 and r.kv_buffers == 3 and not r.spills
    assert ts.row_alignment(torch.empty(2, 16, 4096, 72).transpose(1, 2)) == 8


def test_the_hint_is_what_vectorises_head_dim_72(compiled):
    """Without the alignment hint (ALIGN=1) the same kernel falls back to 2-byte loads: the check
    above can fail."""
    r = compiled[HINTLESS]
    assert r.narrow_loads > 0 and r.cp_async_16 == 0 and aot.problems(r)


@pytest.mark.parametrize("arch", ["sm_80", "sm_86", "sm_89", "sm_90"])
def test_every_dispatched_configuration_fits_shared_memory(arch):
    cases = aot.full_matrix(archs=(arch,), dtypes=("bf16", "fp16", "fp32"))
    assert len(cases) > 100
    for case in cases:
        launch = aot.build_launch(case)
        cfg = launch.config
        elem = aot.DTYPES[case.dtype].itemsize
        est = ts.smem_estimate(cfg, ts.block_d_for(case.head_dim), elem, aot.ARCHS[arch])
        assert est <= ts.smem_limit(aot.ARCHS[arch]), (case.name, cfg, est)
        assert cfg.block_n >= 16 and cfg.block_m >= 16  # the GPU's tl.dot needs >= 16
        if case.kind != "dense":
            assert case.block % cfg.block_m == 0 and case.block % cfg.block_n == 0


def test_tiles_depend_on_the_architecture():
    big = ts.tile_config((8, 0), 256, torch.bfloat16, 128, 128)
    small = ts.tile_config((8, 6), 256, torch.bfloat16, 128, 128)
    hopper = ts.tile_config((9, 0), 256, torch.bfloat16, 128, 128)
    assert (hopper.block_m, hopper.block_n) == (64, 64) and (big.block_m, big.block_n) == (64, 32)
    assert (small.block_m, small.block_n) == (32, 32)
    assert ts.smem_limit((8, 6)) == ts.smem_limit((8, 9)) == 101376
