"""The package's layering: no import cycles between its modules, no private names imported across them."""
import ast
import functools
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "correctnet"


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.lru_cache(maxsize=None)  # parsed once: the cycle test asks for it in its inner loops
def _imports() -> dict[str, list[tuple[str, list[str], bool]]]:
    """module -> [(imported module, names, at module level)] for imports inside the package."""
    out = {}
    for path in PKG.rglob("*.py"):
        mod = _module(path)
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        top = set(map(id, tree.body))
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                found.append((target, [a.name for a in node.names], id(node) in top))
        out[mod] = found
    return out


def test_no_private_names_imported_across_modules():
    bad = [(mod, target, n) for mod, imps in _imports().items() for target, names, _ in imps for n in names
           if n.startswith("_") and n != "__version__"]
    assert not bad, bad


def test_no_import_cycles_between_modules():
    graph = {}
    for mod, imps in _imports().items():
        deps = set()
        for target, names, top in imps:
            if not top:
                continue
            # "from . import x" may import a submodule x
            deps |= {f"{target}.{n}" for n in names if f"{target}.{n}" in _imports()} or {target}
        graph[mod] = {d for d in deps if d in graph or d in _imports()} - {mod}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in graph.get(m, ()):
            if d == "correctnet" or m == "correctnet":
                continue  # the package's __init__ re-exports everything; modules never import it
            if state.get(d) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(stack + [m, d])}")
            if not state.get(d):
                visit(d, stack + [m])
        state[m] = 2

    for m in graph:
        if not state.get(m):
            visit(m, [])


GROUND = {"correctnet.errors", "correctnet.io", "correctnet.tensors"}


def test_the_ground_floor_imports_nothing_above_it():
    # utilities (errors, atomic writes, batches and eval mode) sit below everything: any module may use them
    for mod in GROUND:
        above = {target for target, _, _ in _imports()[mod]} - GROUND
        assert not above, f"{mod} imports {sorted(above)}"


def test_helpers_come_from_the_ground_floor_not_from_evaluation():
    # evaluate/ is Monte-Carlo evaluation, not a utility hub: modules below it in the data flow do not import it
    for mod in ("correctnet.lipschitz", "correctnet.io", "correctnet.tensors", "correctnet.checkpoint",
                "correctnet.resume", "correctnet.plots"):
        assert "correctnet.evaluate" not in {t for t, _, _ in _imports()[mod]}, mod
