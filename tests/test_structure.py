"""The package's shape, read from the source with `ast` (nothing is imported): the modules import each other
without a cycle, counting imports inside functions too; models.py stays the bottom that tasks, convert,
features and bench build on; in the data layer the batch paths import no source; and no module attaches a
config to a model from outside.
"""

import ast
from pathlib import Path

import mae_torch

SRC = Path(mae_torch.__file__).parent
BOTTOM_MAY_IMPORT = {"config", "errors", "hub", "ops", "vit", "mae", "resize", "runtime"}  # what models.py may import


def module_name(path: Path, src: Path = SRC) -> str:
    """ "tasks" for tasks.py, "data" for data/__init__.py, "data.memory" for data/memory.py, "__init__" for the
    package's own __init__.py."""
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def modules(src: Path = SRC) -> dict[str, ast.Module]:
    """Every module of the package (subpackages included) by its name, parsed."""
    return {module_name(p, src): ast.parse(p.read_text(), str(p)) for p in sorted(src.rglob("*.py"))}


def package_of(name: str, names: set[str]) -> list[str]:
    """The package a module's relative imports start from, as parts: [] for the top level."""
    parts = [] if name == "__init__" else name.split(".")
    return parts if name in names and any(n.startswith(name + ".") for n in names) else parts[:-1]


def imported(tree: ast.Module, names: set[str], name: str = "") -> set[str]:
    """The package's modules that module `name` (`tree`) imports anywhere (module level, functions,
    branches): `from .x import`, `from ..x import`, `from . import x`, `from mae_torch.x import`,
    `import mae_torch.x`; a name from a package itself is an import of that package ("__init__" at the top)."""
    out = set()

    def add(parts: list[str], imported_names: list[str]) -> None:
        base = ".".join(parts)
        for n in imported_names:  # from P import n: the submodule P.n, else a name of P
            sub = f"{base}.{n}" if base else n
            out.add(sub if sub in names else base or "__init__")

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                start = package_of(name, names)
                if node.level - 1 > len(start):
                    raise AssertionError(f"line {node.lineno}: imports beyond the package")
                parts = start[: len(start) - (node.level - 1)]
            elif (node.module or "").split(".")[0] == "mae_torch":
                parts = []
            else:
                continue  # another package's
            module = [p for p in (node.module or "").split(".") if p]
            add(parts + module[1:] if not node.level else parts + module, [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "mae_torch":
                    out.add(".".join(parts[1:]) or "__init__")
    return out


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    trees = modules(src)
    return {name: (imported(tree, set(trees), name) & set(trees)) - {name} for name, tree in trees.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def cfg_assigned(tree: ast.Module) -> list[int]:
    """Lines of `x.cfg = ...` (or `x.cfg += ...`, `x.cfg: T = ...`, `setattr(x, "cfg", ...)`) outside
    `__init__` methods: a config attached to an object from outside its constructor."""
    inits = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "__init__"]
    inside_init = {id(n) for f in inits for n in ast.walk(f)}
    lines = []
    for node in ast.walk(tree):
        if id(node) in inside_init:
            continue
        if isinstance(node, ast.Assign):
            targets = [t for target in node.targets for t in ast.walk(target)]
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = list(ast.walk(node.target))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
            key = node.args[1] if len(node.args) > 1 else None
            targets = [ast.Attribute(ast.Name("x"), "cfg", ast.Store())] if getattr(key, "value", None) == "cfg" else []
        else:
            continue
        if any(isinstance(t, ast.Attribute) and t.attr == "cfg" and isinstance(t.ctx, ast.Store) for t in targets):
            lines.append(node.lineno)
    return lines


def test_the_graph_sees_function_level_imports():
    tree = ast.parse("def f():\n    from .b import x\n    from . import c, y\n    import mae_torch.d\n")
    assert imported(tree, {"b", "c", "d"}) == {"b", "c", "d", "__init__"}
    inside = ast.parse("from ..config import x\nfrom .memory import y\nfrom . import folder\nfrom .. import z\n")
    names = {"config", "data", "data.memory", "data.folder", "data.path"}
    assert imported(inside, names, "data.path") == {"config", "data.memory", "data.folder", "__init__"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_modules_import_each_other_without_a_cycle():
    graph = import_graph()
    assert {"tasks", "convert", "features"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_models_is_the_bottom_of_the_weights_modules():
    graph = import_graph()
    assert graph["models"] <= BOTTOM_MAY_IMPORT, f"models.py imports {sorted(graph['models'] - BOTTOM_MAY_IMPORT)}"
    for name in ("tasks", "convert", "features", "bench"):
        assert "models" in graph[name], f"{name}.py should build its models through models.py"
    assert "tasks" not in graph["convert"] | graph["features"]


def test_the_data_layers_batch_paths_import_no_source():
    graph = import_graph()
    sources = {"data.cifar", "data.folder"}
    assert sources <= set(graph) and {"data.path", "data.memory", "data.stream", "data.splits"} <= set(graph)
    for path in ("data.path", "data.memory", "data.stream", "data.splits", "data.items"):
        assert not graph[path] & sources, f"{path} imports {sorted(graph[path] & sources)}"
    for source in sources:
        assert not graph[source] & {"data.path", "data.memory", "data.stream"}, f"{source} imports a batch path"
    assert "data.path" in graph["engine"]  # the engine enters the data layer through the one batch object


def test_no_module_attaches_a_config_to_a_model_from_outside():
    own = ast.parse("class A:\n    def __init__(self, c):\n        self.cfg = c\n")
    assert cfg_assigned(own) == []  # a constructor setting its own config is fine
    outside = ast.parse("def f(model, m):\n    model.cfg = m\n    a, model.cfg = 1, m\n    setattr(model, 'cfg', m)\n")
    assert cfg_assigned(outside) == [2, 3, 4]
    found = [f"{name}.py:{line}" for name, tree in modules().items() for line in cfg_assigned(tree)]
    assert found == [], f"a config attached to a model from outside its constructor: {found}"
