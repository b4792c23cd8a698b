"""Imports only go down the layers: every pcompile module's imports (read from its source with
ast: top-level and inside functions, so a lazy import cannot dodge the rule) name its own
layer or a lower one. The search layer imports no torch (numpy and plan data only), and no
pass imports another pass (shared logic lives in the layers below)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# lowest first; a module may import its own layer and the ones before it
LAYERS = [
    ("data", ("pcompile.errors", "pcompile.plan", "pcompile.cluster", "pcompile.mesh", "pcompile.models",
              "pcompile.launch")),
    ("search", ("pcompile.search",)),
    ("options", ("pcompile.options",)),
    ("ir", ("pcompile.ir",)),
    # pcompile.checkpoint is user-facing but needs only the IR's names and the mesh: the backends load
    # pcompile checkpoints through it
    ("runtime", ("pcompile.runtime", "pcompile.checkpoint")),
    ("sharding", ("pcompile.sharding",)),
    ("cost", ("pcompile.cost",)),
    ("passes", ("pcompile.passes",)),
    ("backends", ("pcompile.backends",)),
    ("api", ("pcompile.api", "pcompile.report", "pcompile.trainer", "pcompile.cli",
             "pcompile.demo", "pcompile.__main__", "pcompile")),
]
PASS_HELPERS = {"pcompile.passes.export", "pcompile.passes.search_runs", "pcompile.passes.invariants"}
NO_TORCH = ("pcompile.search",)


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest matching prefix."""
    best, length = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
                best, length = index, len(prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] in ("passes", "backends"):
        parts = ["pcompile"] + parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def sources() -> dict[str, str]:
    files = [p for folder in ("pcompile", "passes", "backends") for p in (ROOT / folder).rglob("*.py")]
    return {module_name(p): p.read_text() for p in files}


def imported(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import statement, anywhere in the source."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module != "pcompile":  # `from pcompile import checkpoint` imports the submodule
                out.append((node.lineno, node.module))
            # `from pcompile import x` / `from pcompile.runtime import ops` import submodules too
            out += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names
                    if node.module.startswith("pcompile")]
    return out


def _known(name: str, modules: set[str]) -> str | None:
    """The pcompile module `name` refers to (a module, or the module holding an imported name)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def violations(tree: dict[str, str]) -> list[str]:
    modules = set(tree)
    found = []
    for module, source in sorted(tree.items()):
        here = layer_of(module)
        for line, name in imported(source):
            if module.startswith(NO_TORCH) and (name == "torch" or name.startswith("torch.")):
                found.append(f"{module}:{line} imports {name}: the search layer is numpy and plan data only")
            target = _known(name, modules) if name.startswith("pcompile") else None
            if target is None or target == module:
                continue
            if layer_of(target) > here:
                found.append(f"{module}:{line} imports {target} ({LAYERS[layer_of(target)][0]}), a layer above "
                             f"its own ({LAYERS[here][0]})")
            if (module.startswith("pcompile.passes.") and target.startswith("pcompile.passes.")
                    and target not in PASS_HELPERS and module not in PASS_HELPERS):
                found.append(f"{module}:{line} imports the pass {target}: shared logic belongs below the passes")
    return sorted(set(found))


def test_the_tree_imports_only_downwards():
    assert violations(sources()) == []


def test_an_upward_import_is_named():
    tree = sources()
    tree["pcompile.ir.bad"] = "def f():\n    from pcompile.passes.search import search\n"
    tree["pcompile.search.torchy"] = "import torch.fx\n"
    tree["pcompile.passes.shapes"] += "\nfrom pcompile.passes import flops\n"
    found = violations(tree)
    assert found == sorted([
        "pcompile.ir.bad:2 imports pcompile.passes.search (passes), a layer above its own (ir)",
        "pcompile.passes.shapes:" + str(tree["pcompile.passes.shapes"].count("\n")) +
        " imports the pass pcompile.passes.flops: shared logic belongs below the passes",
        "pcompile.search.torchy:1 imports torch.fx: the search layer is numpy and plan data only",
    ])
