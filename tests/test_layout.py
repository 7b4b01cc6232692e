"""The layout of docs/architecture.md, checked on the source: who may import whom. Read with `ast`, so an import
inside a function counts as much as one at the top of a file."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ("app", "calibrate", "predict", "pretrain_mae", "site_check", "train_vit")
PACKAGES = ("cxr", "hf_data", "benchmarks")


def imported_names(source: str) -> set[str]:
    """Every absolute module name a file imports, at any depth (`from a.b import c` gives "a.b" and "a.b.c")."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def project_modules(root: Path) -> dict[str, Path]:
    """The modules of the packages and entry points in `root`, by dotted name."""
    modules = {name: root / f"{name}.py" for name in ENTRY_POINTS if (root / f"{name}.py").is_file()}
    for package in PACKAGES:
        for path in sorted((root / package).glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the project modules it imports (a package import counts as its `__init__`)."""
    modules = project_modules(root)
    return {
        name: {imported for imported in imported_names(path.read_text()) if imported in modules and imported != name}
        for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path that ends where it starts, or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once every path from it is explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for neighbour in sorted(graph.get(node, ())):
            if state.get(neighbour) == "open":
                return path[path.index(neighbour) :] + [neighbour]
            if neighbour not in state and (cycle := visit(neighbour)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def hf_data_imports(root: Path) -> dict[str, set[str]]:
    return {
        path.name: found
        for path in sorted((root / "cxr").glob("*.py"))
        if (found := {name for name in imported_names(path.read_text()) if name.split(".")[0] == "hf_data"})
    }


def test_the_shared_package_never_imports_the_data_layer():
    assert hf_data_imports(ROOT) == {}


def test_the_guards_see_an_import_inside_a_function():
    lazy = "def fit():\n    from hf_data.prepare import read_patient_id\n    import hf_data\n"
    assert imported_names(lazy) == {"hf_data", "hf_data.prepare", "hf_data.prepare.read_patient_id"}
    assert find_cycle({"cxr.a": {"cxr.b"}, "cxr.b": {"hf_data.c"}, "hf_data.c": {"cxr.a"}}) == [
        "cxr.a",
        "cxr.b",
        "hf_data.c",
        "cxr.a",
    ]
    assert find_cycle({"cxr.a": {"cxr.b"}, "cxr.b": set(), "hf_data.c": {"cxr.a"}}) is None


def test_no_import_cycle_between_modules_or_packages():
    graph = import_graph(ROOT)
    # the walk found the tree
    assert {"cxr.features", "cxr.reliability", "hf_data.loading", "train_vit", "calibrate"} <= set(graph)
    assert find_cycle(graph) is None
    packages = {}
    for module, imported in graph.items():
        packages.setdefault(module.split(".")[0], set()).update(name.split(".")[0] for name in imported)
    assert find_cycle({package: targets - {package} for package, targets in packages.items()}) is None


def test_no_test_file_imports_another_test_file():
    tests = ROOT / "tests"
    test_modules = {path.stem for path in tests.glob("test_*.py")} | {"conftest"}
    offenders = {
        path.name: found
        for path in sorted(tests.glob("test_*.py"))
        if (
            found := {
                name for name in imported_names(path.read_text()) if name.split(".")[0] in test_modules - {path.stem}
            }
        )
    }
    assert offenders == {}
