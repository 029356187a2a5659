"""The floors of ARCHITECTURE.md, checked on the source: every import of a package module (at
module level or inside a function) goes to a floor below its own, or sideways within its floor,
and no chain of imports between modules comes back to where it started."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# floor of each top-level part of the package; the package's own __init__ (its exports) sits just
# under the command line, which nothing imports
FLOORS = {"files": 0, "kernels": 1, "_C": 1, "ops": 2, "nn": 3, "data": 4, "eval": 4, "train": 5,
          "__init__": 5.5, "cli": 6, "__main__": 6, "__version__": 0}


def _modules():
    out = {}
    for path in sorted((ROOT / "sdclr_fast").rglob("*.py")):
        if path.relative_to(ROOT / "sdclr_fast").parts[0] == "kernels":  # a clone's link to kernels/
            continue
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out[name] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        stem = path.stem
        out["sdclr_fast.kernels" + ("" if stem == "__init__" else f".{stem}")] = path
    return out


def _imports(name, path, known):
    """The package modules ``name`` imports (absolute and relative, at any depth of the file)."""
    is_pkg = path.name == "__init__.py"
    parts = name.split(".")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = parts if is_pkg else parts[:-1]
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            if t.startswith("sdclr_fast"):
                while t and t not in known:  # a name imported from a module: the module itself
                    t = t.rpartition(".")[0]
                if t and t != name:
                    found.add(t)
    return found


def _floor(name):
    parts = name.split(".")
    return FLOORS["__init__"] if len(parts) == 1 else FLOORS[parts[1]]


def _graph():
    mods = _modules()
    return {n: _imports(n, p, mods) for n, p in mods.items()}


def test_every_import_goes_down_or_sideways():
    upward = sorted(f"{a} ({_floor(a)}) imports {b} ({_floor(b)})" for a, deps in _graph().items()
                    for b in deps if _floor(b) > _floor(a) and b != "sdclr_fast")
    assert upward == []


def test_nothing_below_the_command_line_imports_it():
    assert sorted(a for a, deps in _graph().items() if "sdclr_fast.cli" in deps and a != "sdclr_fast.__main__") == []


def test_no_import_cycle_between_modules():
    graph = _graph()
    # a package's __init__ re-exporting its own modules is not a cycle of the design
    graph = {a: {b for b in deps if not (b == a.rpartition(".")[0] or a.startswith(b + "."))}
             for a, deps in graph.items()}
    state, cycles = {}, []

    def visit(n, stack):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                cycles.append(" -> ".join(stack[stack.index(m):] + [m]))
            elif m not in state:
                visit(m, stack)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [])
    assert cycles == []


def test_the_graph_is_read():
    """The checks above see the real imports (a broken parser would pass them vacuously)."""
    graph = _graph()
    assert "sdclr_fast.ops.masked_conv" in graph["sdclr_fast.nn.masked_conv"]
    assert "sdclr_fast.train.config" in graph["sdclr_fast.cli"]
    assert "sdclr_fast.ops._op" in graph["sdclr_fast.ops.nt_xent"]
    assert "sdclr_fast.kernels._common" in graph["sdclr_fast.kernels.nt_xent"]
