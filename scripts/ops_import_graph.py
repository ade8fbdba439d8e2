"""The import graph of rettn/ops (ast: in-function imports count too): prints who imports whom,
and exits 1 on a cycle or on an underscore name imported from another rettn module.

    python scripts/ops_import_graph.py [rettn/ops]
"""
import ast, pathlib, sys
root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "rettn/ops")
mods = {f"rettn.ops.{p.stem}" if p.stem != "__init__" else "rettn.ops": p for p in root.glob("*.py")}
edges = {m: set() for m in mods}
priv = []
for m, p in mods.items():
    for node in ast.walk(ast.parse(p.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            targets = [node.module]
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in mods:
                    targets.append(full)
                elif a.name.startswith("_") and node.module.startswith("rettn"):
                    priv.append(f"{m}: from {node.module} import {a.name}")
        for t in targets:
            if t in mods and t != m:
                edges[m].add(t)
# package __init__ is imported by every submodule implicitly; ignore edges into it
for m in edges:
    edges[m].discard("rettn.ops")
short = lambda n: n.replace("rettn.ops.", "").replace("rettn.ops", "__init__")
for m in sorted(edges):
    print(f"{short(m):12s} -> {', '.join(sorted(map(short, edges[m]))) or '-'}")
state, stack, cycles = {}, [], []
def dfs(n):
    state[n] = 1; stack.append(n)
    for t in sorted(edges[n]):
        if state.get(t) == 1:
            cycles.append(stack[stack.index(t):] + [t])
        elif t not in state:
            dfs(t)
    stack.pop(); state[n] = 2
for m in sorted(edges):
    if m not in state:
        dfs(m)
print("cycles:", [" -> ".join(map(short, c)) for c in cycles] or "none")
print("private names imported across modules:", priv or "none")
sys.exit(1 if cycles or priv else 0)
