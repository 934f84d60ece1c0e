"""The code layout's rules, checked on the source: imports point one way between packages, no import cycle
between modules, no `_private` name imported from another package, function-level imports only of heavy or
optional libraries (or in cli.py, whose commands import their package lazily to keep `--help` fast), and no
test module importing another test module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("base", "data", "extract", "decoder", "beam", "evaluation")
ALLOWED = {  # package -> the packages of ours it may import; base is the bottom layer every package may use
    "base": {"base"},
    "data": {"base", "data"},
    "extract": {"base", "data", "extract"},
    "beam": {"base", "beam"},
    "evaluation": {"base", "data", "evaluation"},
    "decoder": {"base", "data", "extract", "beam", "evaluation", "decoder"},
}
LAZY_OK = {"tensorflow", "keras", "pycocoevalcap", "h5py", "pyarrow", "ray"}  # heavy or optional: may be
# imported inside functions (h5py: 0.4 s, only base.outputs' store check needs it before cli's --help-fast
# start; pyarrow, ray: the `shards` / `ray` extras)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path):
    """(module imported, names, line, top_level) of every import of a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno, id(node) in top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [a.name for a in node.names], node.lineno, id(node) in top


def _ours(module: str) -> str | None:
    root = module.split(".")[0]
    return root if root in PACKAGES else None


def _files() -> list[Path]:
    return [*_modules().values(), REPO / "cli.py", *(REPO / "bench").glob("*.py"),
            *(REPO / "tests").glob("*.py")]


def test_packages_import_one_way():
    bad = [f"{path.relative_to(REPO)}:{line} imports {module}"
           for name, path in _modules().items() for module, _, line, _ in _imports(path)
           if _ours(module) and _ours(module) not in ALLOWED[name.split(".")[0]]]
    assert not bad, "\n".join(bad)


def test_no_private_name_imported_from_another_package():
    bad = []
    for path in _files():
        here = path.relative_to(REPO).parts[0]
        for module, names, line, _ in _imports(path):
            private = [n for n in names if n.startswith("_")]
            if private and _ours(module) and _ours(module) != here:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {private} from {module}")
    assert not bad, "\n".join(bad)


def test_no_import_cycle_between_modules():
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for module, names, _, _ in _imports(path):
            for target in [module, *(f"{module}.{n}" for n in names)]:
                if target in modules and target != name:
                    graph[name].add(target)
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("package", PACKAGES)
def test_function_level_imports_are_only_heavy_or_optional_libraries(package):
    bad = [f"{path.relative_to(REPO)}:{line} imports {module} inside a function"
           for name, path in _modules().items() if name.split(".")[0] == package
           for module, _, line, top in _imports(path)
           if not top and module.split(".")[0] not in LAZY_OK and module != "__future__"]
    assert not bad, "\n".join(bad)


def test_test_modules_import_no_other_test_module():
    """Shared test code lives in helper modules of tests/ (helpers, beam_reference, gpu_scenarios, ...), never
    in a test_*.py file or conftest.py that another test module imports."""
    local = {path.stem for path in (REPO / "tests").glob("*.py")}
    bad = [f"{path.relative_to(REPO)}:{line} imports {module}"
           for path in (REPO / "tests").glob("*.py") for module, _, line, _ in _imports(path)
           if module.split(".")[0] in local and module.split(".")[0].startswith(("test_", "conftest"))]
    assert not bad, "\n".join(bad)
