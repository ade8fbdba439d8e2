"""The GPU tier's expectations against the dispatcher's rules, on CPU.

``tests/test_gpu.py`` runs only on CUDA (its CPU rehearsal runs the Triton interpreter, where the
CUDA-only rules do not apply), so a rule change in the dispatcher that strands one of its tests
showed only on the GPU. Here every (backend, dtype, head dim, block) row of ``test_gpu.CALLS`` is
put to the dispatcher's own rule functions with fake CUDA tensors (``FakeTensorMode``: a CUDA
device, no GPU, no memory): a row that must run resolves without error, a row that must be refused
raises InputError with the message the GPU test matches, and ``backend=None`` resolves to
``"auto"`` with real candidates (never the Triton kernel where the rules keep it out). The table
itself is checked against test_gpu.py's source: every test has a row set, and the backend names a
test's body uses are the ones its rows declare.
"""

import ast
import inspect

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import test_gpu
from rettn.errors import InputError
from rettn.ops import _candidates as candidates
from rettn.ops import _dispatch as dispatch
from rettn.ops.layout import BlockSparseLayout

ROWS = [(test, *row) for test, rows in test_gpu.CALLS.items() for row in rows]
BACKEND_NAMES = {"triton", "torch", "flex", "auto"}
SEQ = 1776  # the GPU tier's sequence (a tail block at 128)


@pytest.fixture(autouse=True)
def _fresh_reason_cache(monkeypatch):
    # the dispatcher caches Triton verdicts by (device type, dtype, ...): keep fake-CUDA verdicts out
    monkeypatch.setattr(dispatch, "_triton_reasons", {})


def fake_cuda(dtype, head_dim, b=2, h=4, s=SEQ):
    with FakeTensorMode():
        return torch.empty(b, h, s, head_dim, dtype=dtype, device="cuda")


def meta_layout(block, s=SEQ):
    """A layout of the right block sizes (meta index tensors: the rules read only the shape facts)."""
    if block is None:
        return None
    nq = -(-s // block)
    meta = torch.device("meta")
    n = torch.empty(1, 1, nq, dtype=torch.int32, device=meta)
    idx = torch.empty(1, 1, nq, max(1, nq // 8), dtype=torch.int32, device=meta)
    return BlockSparseLayout(n, idx, block, block, s, s, validate=False)


def _id(row):
    test, backend, dtype, d, block, expect = row
    return f"{test}-{backend}-{str(dtype).replace('torch.', '')}-{d}-{block}-{expect}"


def test_fake_tensors_look_like_cuda():
    q = fake_cuda(torch.bfloat16, 64)
    assert q.device.type == "cuda" and q.dtype == torch.bfloat16 and q.shape[-1] == 64


@pytest.mark.parametrize("row", ROWS, ids=[_id(r) for r in ROWS])
def test_gpu_tier_row_agrees_with_the_rules(row):
    test, backend, dtype, head_dim, block, expect = row
    assert expect in (test_gpu.RUNS, test_gpu.REFUSED)
    q = fake_cuda(dtype, head_dim)
    layout = meta_layout(block)
    if expect == test_gpu.REFUSED:
        with pytest.raises(InputError, match=test_gpu.FP32_REFUSAL):
            dispatch.resolve_backend(backend, q, layout)
        return
    resolved = dispatch.resolve_backend(backend, q, layout)
    if backend is None:
        assert resolved == "auto"  # chosen at run time, inside the op
        op = "dense+lse" if layout is None else "sparse+lse"
        names, skipped = candidates.default_candidates(op, q, layout, False, layout is None)
        assert names, skipped
        choice = candidates.default_choice(op, q, names)  # what runs where nothing is measured
        assert choice != "auto" and choice.split(":")[0] in ("triton", "flex", "torch", "sdpa")
        if candidates.triton_reason(q, layout) is not None:  # the rules keep Triton out: so does auto
            assert not any(n.startswith("triton") for n in names) and choice != "triton", names
    else:
        assert resolved == backend


def test_float32_triton_on_cuda_is_refused_and_auto_avoids_triton():
    """The rule the GPU tier's float32 rows stand on, directly."""
    q = fake_cuda(torch.float32, 64)
    layout = meta_layout(128)
    with pytest.raises(InputError, match=test_gpu.FP32_REFUSAL):
        dispatch.resolve_backend("triton", q, layout)
    names, skipped = candidates.default_candidates("sparse+lse", q, layout, False, False)
    assert "triton" in skipped and not any(n.startswith("triton") for n in names)
    assert set(names) <= {"flex", "torch"} and "torch" in names


def _test_functions():
    tree = ast.parse(inspect.getsource(test_gpu))
    return {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_gpu_test_declares_its_calls():
    assert set(_test_functions()) == set(test_gpu.CALLS)


def _literal_backends(fn) -> set:
    """Backend names a test passes as literals: ``backend="..."`` keywords and the backend argument
    of test_safety's ``check_*`` helpers."""
    used = set()
    for node in ast.walk(fn):
        if not isinstance(node, ast.Call):
            continue
        args = [kw.value for kw in node.keywords if kw.arg == "backend"]
        if isinstance(node.func, ast.Name) and node.func.id.startswith("check_"):
            args += node.args[:1]
        used |= {a.value for a in args if isinstance(a, ast.Constant) and a.value in BACKEND_NAMES}
    return used


@pytest.mark.parametrize("name", sorted(test_gpu.CALLS))
def test_declared_backends_match_the_test_body(name):
    """Every backend a test's body names is declared in its rows; a declared backend the body does
    not name comes from the table (the test reads its rows)."""
    fn = _test_functions()[name]
    used = _literal_backends(fn)
    declared = {b for b, *_ in test_gpu.CALLS[name] if b is not None}
    assert used <= declared, (name, used, declared)
    if used != declared:
        reads_table = any(isinstance(n, ast.Name) and n.id == "CALLS" for n in ast.walk(fn))
        assert reads_table, (name, used, declared)


@pytest.mark.parametrize("name", sorted(test_gpu.CALLS))
def test_parametrized_tests_take_their_rows(name):
    """A test parametrized over backend/dtype/head dim takes exactly its CALLS rows."""
    fn = getattr(test_gpu, name)
    for mark in getattr(fn, "pytestmark", []):
        if mark.name == "parametrize" and mark.args[0] == "backend,dtype,head_dim,block,expect":
            assert [tuple(r) for r in mark.args[1]] == test_gpu.CALLS[name]
