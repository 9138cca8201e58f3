"""The documentation stays true to the code: every library module is on the code map (docs/architecture.md), every
command in README.md's shell blocks still parses with its script's own parser (a dry parse: nothing runs), every
make target the README names exists, and every relative link in README.md and docs/*.md points to a file (and a
heading) that exists."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import shlex
from pathlib import Path

import pytest

from perpcs.errors import PerpcsError

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
PYTHONS = {"python", "python3", "$PY", ".venv/bin/python", "$(PY)"}
SEPARATORS = {"&&", "||", ";", "|"}


def shell_blocks(text: str) -> list:
    """The bodies of the ```bash / ```sh / ```shell blocks of a Markdown text."""
    return re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", text, re.S | re.M)


def shell_commands(block: str) -> list:
    """[(cwd relative to the repo, argv)] of every simple command in a block; `cd` moves the cwd of the commands
    after it on the same line, as the shell would."""
    commands = []
    for line in re.sub(r"\\\n", " ", block).splitlines():
        tokens = shlex.split(line, comments=True)
        cwd, argv = Path("."), []
        for token in tokens + [";"]:
            if token not in SEPARATORS:
                argv.append(token)
                continue
            while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):   # VAR=value prefixes
                argv.pop(0)
            if argv[:1] == ["cd"]:
                cwd = Path(os.path.normpath(cwd / argv[1])) if len(argv) > 1 else Path(".")
            elif argv:
                commands.append((cwd, argv))
            argv = []
    return commands


def readme_commands() -> list:
    return [c for block in shell_blocks(README.read_text(encoding="utf-8")) for c in shell_commands(block)]


class Parsed(Exception):
    """Raised by the patched parse_args once the flags are parsed: the script's main stops before any work."""


def load_script(path: Path):
    name = "readme_cmd_" + re.sub(r"\W", "_", str(path.relative_to(REPO)))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dry_parse(main, argv: list, monkeypatch) -> argparse.Namespace:
    """Run ``main(argv)`` up to its argument parser and no further; argparse errors (SystemExit) fail the test."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        try:
            main(argv)
        except Parsed as done:
            return done.args[0]
        except SystemExit as exc:
            pytest.fail(f"flags do not parse: {argv} (exit {exc.code})")
        except PerpcsError as exc:   # a value out of range, refused while parsing (perpcs/checks.py)
            pytest.fail(f"flags do not parse: {argv}: {exc}")
    pytest.fail(f"main({argv}) returned without parsing its flags")


def python_commands() -> list:
    out = []
    for cwd, argv in readme_commands():
        if argv[0] in PYTHONS and len(argv) > 1 and argv[1] != "-c":
            out.append((cwd, argv))
    return out


def test_the_readme_gives_the_two_commands_and_ci_runs_its_test_command():
    commands = [argv for _, argv in readme_commands()]
    assert ["make", "demo"] in commands and ["make", "test"] in commands
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^make test$", ci, re.M), ".ci/run must run the README's test command, make test"


def test_make_targets_named_in_the_readme_exist():
    targets = set(re.findall(r"^([A-Za-z0-9_.-]+):", (REPO / "Makefile").read_text(encoding="utf-8"), re.M))
    text = README.read_text(encoding="utf-8")
    named = {argv[1] for _, argv in readme_commands() if argv[0] == "make" and len(argv) > 1}
    named |= set(re.findall(r"`(?:[A-Z_]+=\S+ )*make ([a-z]+)`", text))
    assert named, "the README names no make target"
    assert named <= targets, f"make targets named in README.md but not in the Makefile: {sorted(named - targets)}"


@pytest.mark.parametrize("cwd,argv", python_commands(), ids=lambda v: " ".join(v)[:60] if isinstance(v, list)
                         else str(v))
def test_readme_command_parses(cwd, argv, monkeypatch):
    if argv[1] == "-m":
        assert argv[2] == "perpcs", f"unknown module in README command: {argv}"
        dry_parse(importlib.import_module("perpcs.__main__").main, argv[3:], monkeypatch)
        return
    script = (REPO / cwd / argv[1]).resolve()
    assert script.is_file(), f"README runs {argv[1]} from {cwd}, which does not exist"
    dry_parse(load_script(script).main, argv[2:], monkeypatch)


def test_the_readme_has_the_published_commands():
    scripts = {Path(argv[1]).name for _, argv in python_commands() if argv[1] != "-m"}
    assert {"task_LoRA.py", "history_anchor.py", "train_anchor_PEFT.py", "train_anchor_gate.py",
            "lora_composition.py", "OPPU.py", "eval_task.py"} <= scripts


def test_every_module_is_on_the_code_map():
    code_map = (DOCS / "architecture.md").read_text(encoding="utf-8")
    missing = []
    for path in sorted((REPO / "perpcs").rglob("*.py")):
        if path.name == "__init__.py":   # package markers (empty), described by their package's paragraph
            continue
        rel = path.relative_to(REPO / "perpcs").as_posix()
        if f"`{rel}`" not in code_map and f"`perpcs/{rel}`" not in code_map:
            missing.append(rel)
    assert not missing, f"modules not on the code map (docs/architecture.md): {missing}"


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(md: Path) -> set:
    seen, out = {}, set()
    text = re.sub(r"^```.*?^```", "", md.read_text(encoding="utf-8"), flags=re.S | re.M)
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def markdown_files() -> list:
    return [README, *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("md", markdown_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_point_to_existing_files(md):
    text = re.sub(r"^```.*?^```", "", md.read_text(encoding="utf-8"), flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):   # http:, https:, mailto:
            continue
        file, _, fragment = target.partition("#")
        path = (md.parent / file).resolve() if file else md
        if not path.exists():
            broken.append(target)
        elif fragment and path.suffix == ".md" and fragment not in anchors(path):
            broken.append(target)
    assert not broken, f"{md.relative_to(REPO)}: links to missing files or headings: {broken}"
