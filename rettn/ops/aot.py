"""Ahead-of-time compiles of rettn's Triton kernel for GPUs this machine does not have.

Each configuration is built by the dispatcher itself (:func:`rettn.ops._triton.prepare` on meta
tensors, with the GPU's compute capability given), specialised by the JIT's own binder (ints
equal to 1 become constants, ints divisible by 16 and 16-byte aligned pointers get
``tt.divisibility``), compiled with ``triton.compile`` for that target and inspected: registers,
stack and local memory (``cuobjdump --dump-resource-usage`` from the triton wheel), shared memory,
wgmma (Hopper), 16-byte ``cp.async`` loads and the number of K/V buffers (pipelining).

No GPU is needed, but a process whose triton was imported without ``TRITON_INTERPRET=1`` (the
interpreter replaces triton's own language library): ``tests/test_aot.py``, which runs under the
interpreter, compiles its representative subset through :func:`compile_in_subprocess`;
``scripts/aot_compile.py`` compiles the whole matrix (docs/kernels.md holds its table).
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from rettn.errors import InputError
from rettn.ops import _tiles as tiles
from rettn.ops import _triton as triton_sparse
from rettn.ops import _triton_cache as triton_cache
from rettn.ops.layout import BlockSparseLayout

ARCHS = {"sm_80": (8, 0), "sm_86": (8, 6), "sm_89": (8, 9), "sm_90": (9, 0)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Case:
    """One configuration the dispatcher can choose."""

    arch: str  # a key of ARCHS
    dtype: str  # a key of DTYPES
    head_dim: int
    kind: str  # "dense" | "sparse" | "step" (engine sparse step) | "rescaled" | "cache" | "checked" | "fused"
    block: int = 128  # layout block (sparse kinds)
    lse: bool = False  # dense / sparse: return the lse
    seq: int = 4096
    heads: int = 16
    broadcast: bool = False  # a (1, 1) layout broadcast over batch and heads (static patterns)
    align: int | None = None  # override the row-alignment hint (an experiment; None: the dispatcher's)

    @property
    def name(self) -> str:
        parts = [self.arch, self.dtype, f"d{self.head_dim}", self.kind]
        if self.kind != "dense":
            parts.append(f"b{self.block}")
        if self.lse:
            parts.append("lse")
        if self.seq % 16:
            parts.append(f"s{self.seq}")
        if self.broadcast:
            parts.append("bcast")
        if self.align is not None:
            parts.append(f"align{self.align}")
        return "-".join(parts)


@dataclass
class Result:
    case: Case
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    registers: int
    stack: int
    local: int
    shared: int
    smem_limit: int
    smem_estimate: int
    wgmma: int
    cp_async_16: int
    kv_buffers: int
    narrow_loads: int  # ld.global of 2 bytes or less (unvectorised 16-bit loads)
    compile_s: float
    loop_spills: int = 0  # local-memory loads/stores (STL/LDL) inside a loop of the SASS (the key loop)

    def __post_init__(self):
        if isinstance(self.case, dict):
            self.case = Case(**self.case)

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.local > 0

    def row(self) -> dict:
        d = asdict(self)
        d["case"] = self.case.name
        return d


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def build_launch(case: Case) -> triton_sparse.Launch:
    """The launch the dispatcher makes for ``case`` (meta tensors: nothing is allocated)."""
    dt = DTYPES[case.dtype]
    b, h, s, d = 2, case.heads, case.seq, case.head_dim
    meta = torch.device("meta")
    # (B, S, H, D) buffers seen as (B, H, S, D): what the diffusers processors pass
    q, k, v = (torch.empty(b, s, h, d, dtype=dt, device=meta).transpose(1, 2) for _ in range(3))
    cap = ARCHS[case.arch]
    scale = d ** -0.5
    layout = None
    if case.kind != "dense":
        nq = triton.cdiv(s, case.block)
        lb, lh = (1, 1) if case.broadcast else (b, h)
        n = torch.empty(lb, lh, nq, dtype=torch.int32, device=meta)
        idx = torch.empty(lb, lh, nq, max(1, nq // 8), dtype=torch.int32, device=meta)
        layout = BlockSparseLayout(n, idx, case.block, case.block, s, s, validate=False)
    launch = _build(case, q, k, v, layout, scale, cap)
    if case.align is not None:
        launch.constexprs["ALIGN"] = case.align
    return launch


def _build(case, q, k, v, layout, scale, cap):
    dt = DTYPES[case.dtype]
    rho = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    res = torch.empty_like(q)
    prep = functools.partial(triton_sparse.prepare, q, k, v, layout, scale, capability=cap)
    if case.kind in ("dense", "sparse"):
        return prep(mode="plain", return_lse=case.lse)
    if case.kind == "step":  # the engine's sparse step: rho + R, ramp, clamp, finite flag
        return prep(mode="step", rho=rho, residual=res, ramp=0.04, clamp=True, check=True)
    if case.kind == "rescaled":  # sparse_attention_rescaled: rho + R only
        return prep(mode="step", rho=rho, residual=res)
    if case.kind == "checked":  # plain sparse step of the baselines, with the finite flag
        return prep(mode="step", check=True)
    if case.kind == "cache":
        return prep(mode="cache", residual=res, lse_dense=rho, out_dtype=dt, write_rho=True, check=True)
    if case.kind == "fused":  # the one-pass cache step (rettn.ops._triton_cache), as the engine calls it
        return triton_cache.prepare(q, k, v, layout, scale, use_rho=True, residual_dtype=dt, check=True,
                                    capability=cap)
    raise InputError(f"unknown kind {case.kind!r}")


def _specialise(fn: JITFunction, launch: triton_sparse.Launch, target: GPUTarget):
    """The JIT's own binder and packing: what ``fn[grid](...)`` would compile on ``target``."""
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.constexprs, num_warps=launch.config.num_warps, num_stages=launch.config.num_stages)
    if launch.config.max_registers is not None:
        kwargs["maxnreg"] = launch.config.max_registers
    bound, specialization, options = binder(*launch.args, **kwargs)
    return fn._pack_args(backend, kwargs, bound, specialization, options)


_RESOURCE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_CP16 = re.compile(r"cp\.async\.cg\.shared\.global \[[^\]]*\], \[[^\]]*\], 0x10")
_MEMDESC = re.compile(r"memdesc<(\d+)x(\d+)x(\d+)x(?:bf16|f16|f32)")
_NARROW = re.compile(r"ld\.global(?:\.[a-z]+)*\.(?:b16|b8|u16|u8)\b")


_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_BRA = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)")


def loop_spills(sass: str) -> int:
    """STL/LDL instructions inside a loop: between a backward branch's target and the branch."""
    instrs = [(int(a, 16), text) for a, text in _SASS.findall(sass)]
    loops = []
    for addr, text in instrs:
        m = _BRA.search(text)
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    return sum(1 for addr, text in instrs if re.search(r"\b(STL|LDL)\b", text)
               and any(lo <= addr <= hi for lo, hi in loops))


def inspect(kernel, case: Case, launch, seconds: float) -> Result:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True,
                              check=True).stdout
    m = _RESOURCE.search(usage)
    if m is None:
        raise RuntimeError(f"cuobjdump gave no resource usage for {case.name}:\n{usage}")
    reg, stack, _, local = (int(x) for x in m.groups())
    ptx, ttgir = kernel.asm["ptx"], kernel.asm["ttgir"]
    bufs = max([int(x[0]) for x in _MEMDESC.findall(ttgir)] or [1])
    cfg = launch.config
    cap = ARCHS[case.arch]
    bd = tiles.block_d_for(case.head_dim)
    return Result(
        case=case, block_m=cfg.block_m, block_n=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        registers=reg, stack=stack, local=local, shared=int(kernel.metadata.shared),
        smem_limit=tiles.smem_limit(cap),
        smem_estimate=tiles.smem_estimate(cfg, bd, DTYPES[case.dtype].itemsize, cap),
        wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)), cp_async_16=len(_CP16.findall(ptx)),
        kv_buffers=bufs, narrow_loads=len(_NARROW.findall(ptx)), compile_s=seconds,
        loop_spills=loop_spills(sass),
    )


@functools.lru_cache(maxsize=None)
def compile_case(case: Case) -> Result:
    """Compile ``case`` for its architecture and inspect it (cached for the process)."""
    return compile_launch(case, build_launch(case))


def compile_launch(case: Case, launch: triton_sparse.Launch) -> Result:
    """Compile ``launch`` (built for ``case``, possibly altered) and inspect it."""
    if not isinstance(tl.standard.max, JITFunction):
        raise RuntimeError(
            "triton was imported with TRITON_INTERPRET=1, so its language library is the interpreter's and "
            "cannot be compiled: compile in a process without it (rettn.ops.aot.compile_in_subprocess)")
    fn = triton_sparse.attn_fwd if launch.kernel is None else launch.kernel
    target = GPUTarget("cuda", ARCHS[case.arch][0] * 10 + ARCHS[case.arch][1], 32)
    options, signature, constexprs, attrs = _specialise(fn, launch, target)
    start = time.perf_counter()
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    return inspect(kernel, case, launch, time.perf_counter() - start)


def compile_in_subprocess(cases, timeout: float = 1800) -> list[Result]:
    """Compile ``cases`` in a fresh Python without TRITON_INTERPRET (what the CPU test tier, which
    runs the interpreter, uses). One process for all of them."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    payload = json.dumps([asdict(c) for c in cases])
    proc = subprocess.run([sys.executable, "-m", "rettn.ops.aot"], input=payload, capture_output=True,
                          text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"ahead-of-time compile failed:\n{proc.stderr[-4000:]}")
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    return [Result(case=Case(**row.pop("case")), **row) for row in rows]


def _main() -> int:
    """stdin: a JSON list of Case fields; stdout (last line): a JSON list of Result fields."""
    cases = [Case(**c) for c in json.loads(sys.stdin.read())]
    rows = []
    for case in cases:
        r = compile_case(case)
        rows.append(dict(asdict(r), case=asdict(case)))
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(_main())


def problems(r: Result) -> list[str]:
    """What is wrong with a compiled 16-bit configuration (empty when it is fine). Spills are a
    problem in every kind but the one-pass cache step (``fused``), whose register cap (two
    programs per SM) may leave a few outside its key loops: there, only spills inside a loop are."""
    out = []
    if r.spills and (r.case.kind != "fused" or r.loop_spills):
        out.append(f"spills (stack {r.stack} B, local {r.local} B, {r.loop_spills} in a loop)")
    if r.shared > r.smem_limit:
        out.append(f"shared memory {r.shared} B over the {r.case.arch} limit {r.smem_limit} B")
    if r.case.arch == "sm_90" and r.wgmma == 0:
        out.append("no wgmma on sm_90")
    if r.case.dtype != "fp32":
        if r.cp_async_16 == 0:
            out.append("no 16-byte cp.async (K/V loads not vectorised)")
        if r.kv_buffers < 2:
            out.append(f"K/V not pipelined ({r.kv_buffers} buffer)")
        if r.narrow_loads:
            out.append(f"{r.narrow_loads} unvectorised 2-byte global loads")
    return out


def full_matrix(archs=("sm_80", "sm_86", "sm_90"), dtypes=("bf16", "fp16"), head_dims=(64, 72, 96, 128, 256)):
    """Every configuration the dispatcher can choose for these archs, dtypes and head dims."""
    cases = []
    for arch in archs:
        for dt in dtypes:
            for d in head_dims:
                for lse in (False, True):
                    cases.append(Case(arch, dt, d, "dense", lse=lse))
                for block in (64, 128):
                    for lse in (False, True):
                        cases.append(Case(arch, dt, d, "sparse", block, lse=lse))
                    for kind in ("step", "rescaled", "checked", "cache", "fused"):
                        cases.append(Case(arch, dt, d, kind, block))
                if d in (64, 72):  # broadcast layouts (window patterns) and a sequence tail
                    cases.append(Case(arch, dt, d, "step", 128, broadcast=True))
                    cases.append(Case(arch, dt, d, "step", 128, seq=4097))
    return cases
