"""The package's shape (docs/architecture.md): four floors whose imports run downward only, no
import circle between modules, no private name used across modules, no module much over 400
lines, one error hierarchy, and ``python -m rettn``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import rettn
from rettn import errors

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "rettn"
# the floor of each top-level part of the package; a module may import only its own floor or lower
FLOORS = {"errors": 0, "_version": 0, "ops": 1, "core": 2, "diffusers": 3, "tiny": 3, "tools": 4}
MAX_LINES = 450  # "no module over ~400 lines"


def _modules():
    """{dotted name: path} of every rettn module (the embedded model's weights are not code)."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path):
    """(imported rettn module, imported names) for every import in the file, top-level or not."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    typing_only = {id(n) for top in ast.walk(tree) if isinstance(top, ast.If)
                   and getattr(top.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(top)}
    for node in ast.walk(tree):
        if id(node) in typing_only:  # annotations only: not an import at run time
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("rettn"):
                    yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("rettn"):
                continue
            names = [a.name for a in node.names]
            # `from rettn.ops import selection` imports a module: count it as one
            subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in MODULES]
            if subs:
                for sub in subs:
                    yield sub, []
                rest = [n for n in names if f"{mod}.{n}" not in MODULES]
                if rest:
                    yield mod, rest
            else:
                yield mod, names


def _floor(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the package itself (rettn/__init__.py re-exports every floor)
    return FLOORS.get(parts[1])


def test_every_module_belongs_to_a_floor():
    for name in MODULES:
        if name not in ("rettn", "rettn.__main__"):
            assert _floor(name) is not None, f"{name} is on no floor (add it to docs/architecture.md)"


def test_imports_run_downward_only():
    bad = []
    for name, path in MODULES.items():
        here = _floor(name)
        if here is None:
            continue
        for mod, _ in _imports(name, path):
            there = _floor(mod)
            if mod == "rettn" or (there is not None and there > here):
                bad.append(f"{name} (floor {here}) imports {mod} (floor {there})")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("floor", ["rettn.ops", "rettn.core", "rettn.diffusers"])
def test_importing_a_floor_loads_nothing_above_it(floor):
    """The same rule, at run time: importing a floor pulls in no module of a higher floor."""
    above = [p for p, f in FLOORS.items() if f > FLOORS[floor.split(".")[1]]]
    code = (f"import sys, {floor}\n"
            f"above = {above!r}\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'rettn' and len(m.split('.')) > 1 "
            "and m.split('.')[1] in above))")
    # a fresh interpreter: `import rettn.ops` runs rettn/__init__.py first, which imports every
    # floor; the check is what the floor's own modules import
    code = "import sys, types\n" \
           f"pkg = types.ModuleType('rettn'); pkg.__path__ = [{str(PKG)!r}]; sys.modules['rettn'] = pkg\n" + code
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", f"importing {floor} loaded {out.stdout.strip()}"


def test_no_import_circle_between_modules():
    graph = {name: {m for m, _ in _imports(name, path) if m in MODULES and m != name and m != "rettn"}
             for name, path in MODULES.items()}
    # a package's __init__ re-exporting its own modules is not a circle of code
    for name in graph:
        graph[name] = {m for m in graph[name] if not (m == name.rpartition(".")[0])}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_no_private_name_crosses_a_module():
    bad = []
    for name, path in MODULES.items():
        for mod, names in _imports(name, path):
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    bad.append(f"{name} imports {mod}.{n}")
    assert not bad, "\n".join(bad)


def test_no_module_is_much_over_400_lines():
    long = {name: n for name, path in MODULES.items()
            if ".tiny" not in name and (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_one_error_hierarchy():
    classes = [getattr(errors, n) for n in errors.__all__]
    assert errors.RettnError in classes
    for cls in classes:
        assert issubclass(cls, errors.RettnError)
        if cls is not errors.RettnError:  # each is also the builtin users already catch
            assert any(b.__module__ == "builtins" and b is not Exception for b in cls.__mro__[1:]), cls
    assert issubclass(errors.ConfigError, ValueError)
    assert issubclass(errors.MemoryBudgetError, MemoryError)
    assert issubclass(errors.NumericalError, FloatingPointError)
    with pytest.raises(errors.ConfigError):
        rettn.RettnConfig(keep=2.0)


def test_public_names_are_kept():
    for name in rettn.__all__:
        assert hasattr(rettn, name), name
    for name in ("apply_rettention", "describe", "RettnConfig", "RettnHandle", "BlockSparseLayout",
                 "block_sparse_attention", "attention_with_lse", "sparse_attention_rescaled", "backend_choices",
                 "selection", "BACKENDS"):
        assert name in rettn.__all__, name


def test_python_dash_m_rettn():
    out = subprocess.run([sys.executable, "-m", "rettn", "--help"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for command in ("generate", "eval", "profile"):
        assert command in out.stdout


def test_every_package_is_in_pyproject():
    """An editable install finds every folder; a wheel only the packages pyproject lists."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "rettn").rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)
