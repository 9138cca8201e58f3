"""The package layout the README's Code map describes: layers import only downwards, and the library never sees
argparse (the scripts parse flags and build typed configs)."""
import ast
from pathlib import Path

PERPCS = Path(__file__).resolve().parents[1] / "perpcs"
# the README's order: a module may import from its own layer and the ones before it
LAYERS = ["core", "data", "models", "engine", "method", "stages", "evaluation"]


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in LAYERS else "core"


def library_modules():
    for path in sorted(PERPCS.rglob("*.py")):
        name = ".".join(path.relative_to(PERPCS.parent).with_suffix("").parts)
        if name != "perpcs.__main__":   # the `python -m perpcs` command is a script
            yield name, ast.parse(path.read_text(encoding="utf-8"))


def imports(tree):
    for node in ast.walk(tree):   # lazy imports inside functions count too
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno


def test_layers_import_only_downwards():
    upward = []
    for name, tree in library_modules():
        for target, line in imports(tree):
            if target.startswith("perpcs.") and LAYERS.index(layer(target)) > LAYERS.index(layer(name)):
                upward.append(f"{name}:{line} imports {target}")
    assert upward == []
    assert {layer(name) for name, _ in library_modules()} == set(LAYERS)   # every layer has modules


def test_the_library_never_parses_flags():
    parsing = [f"{name}:{line}" for name, tree in library_modules() for target, line in imports(tree)
               if target == "argparse"]
    assert parsing == []
