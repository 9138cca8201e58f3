"""The package layout the README's Code map describes: layers import only downwards, and the library never sees
argparse (the scripts parse flags and build typed configs)."""
import ast
from pathlib import Path

PERPCS = Path(__file__).resolve().parents[1] / "perpcs"
# the README's order: a module may import from its own layer and the ones before it
LAYERS = ["core", "data", "models", "engine", "method", "stages", "evaluation", "experiments"]


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


# ---- only the experiments layer runs the top-level scripts ----------------------------------------------------------

RUNNING_IMPORTS = {"subprocess", "runpy"}                           # a process or a script run from the library
LOADING_CALLS = {"spec_from_file_location", "module_from_spec"}     # a script file imported as a module
# data/layout.py writes the stage-0 command into the message that asks for the profile file: printed, never run
PRINTED_ONLY = {("perpcs.data.layout", "data/gen_profile.py")}


def strings(tree):
    """(value, line) of every string constant but the docstrings (which may name anything)."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.value, node.lineno


def test_only_the_experiments_layer_names_or_runs_a_script():
    """A script path as a value (``"task_LoRA.py"``, ``f"{root}/OPPU.py"``), a subprocess or a script file imported
    as a module belongs to perpcs/experiments/ (whose scripts.py is the one table of them) or to ``python -m perpcs``;
    a sentence that mentions a script (a remedy in an error message) is not a command and may stay anywhere."""
    from perpcs.experiments.scripts import SCRIPTS
    names = set(SCRIPTS.values()) | {Path(path).name for path in SCRIPTS.values()}
    found = []
    for name, tree in library_modules():
        if layer(name) == "experiments":
            continue
        for target, line in imports(tree):
            if target.split(".")[0] in RUNNING_IMPORTS:
                found.append(f"{name}:{line} imports {target}")
        for node in ast.walk(tree):
            called = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
            if called in LOADING_CALLS:
                found.append(f"{name}:{node.lineno} uses {called}")
        for value, line in strings(tree):
            script = value.strip().lstrip("/")
            if script in names and (name, script) not in PRINTED_ONLY:
                found.append(f"{name}:{line} names the script {script}")
    assert found == []


def test_the_scripts_table_is_the_repositorys_scripts():
    from perpcs.experiments.scripts import SCRIPTS
    root = PERPCS.parent
    assert [path for path in SCRIPTS.values() if not (root / path).is_file()] == []
    on_disk = {str(p.relative_to(root)) for pattern in ("*.py", "data/*.py", "anchor_selection/*.py", "eval/*.py",
                                                        "scripts/*.py") for p in root.glob(pattern)}
    assert on_disk - set(SCRIPTS.values()) == {"cli_flags.py"}     # the scripts' flag code, not a script


def test_no_library_module_is_over_500_lines():
    """A module a newcomer reads in one sitting: data (word banks, templates) goes to perpcs/resources/."""
    long = [f"{p.relative_to(PERPCS)}: {n} lines" for p in sorted(PERPCS.rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500]
    assert long == []


def test_code_and_help_cite_the_shipped_method_page():
    """The method the code cites is docs/method.md, which the repository ships (sections numbered 1-10 as cited);
    a citation of a file users do not have ("SPEC 7") cannot be followed from --help or a docstring."""
    import re
    root = PERPCS.parent
    files = [*PERPCS.rglob("*.py"), *root.glob("*.py"), *root.glob("scripts/*"), *root.glob("data/*.py"),
             *root.glob("anchor_selection/*.py"), *root.glob("eval/*.py"), *root.glob("bench/*.py")]
    cited = [f"{p.relative_to(root)}:{i}" for p in files for i, line in
             enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if re.search(r"\bSPEC\b", line)]
    assert cited == []
    method = (root / "docs" / "method.md").read_text(encoding="utf-8")
    sections = {int(n) for n in re.findall(r"^## (\d+)\. ", method, flags=re.M)}
    cites = {int(n) for p in files for n in re.findall(r"docs/method\.md sections? (\d+)",
                                                        p.read_text(encoding="utf-8"))}
    assert cites and cites <= sections == set(range(1, 11))
