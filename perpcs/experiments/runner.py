"""The one step runner of the experiments: a top-level script loaded in-process (to check a command line with the
script's own parser before anything runs) or run as its own process (a stage frees its model and memory when it
ends, and a failing stage cannot take the experiment down with it).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import shlex
import subprocess
from functools import lru_cache
from pathlib import Path

from perpcs.errors import fail


@lru_cache(maxsize=None)
def load_script(path: Path):
    """Import a top-level script as a module (its parse_args / main are then callable in-process)."""
    spec = importlib.util.spec_from_file_location(f"_perpcs_script_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_flags(script: Path, args: list) -> None:
    """Parse ``args`` with the script's own parser; a flag it does not know is an error before any run."""
    module = load_script(Path(script).resolve())
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            module.parse_args([str(a) for a in args])
    except SystemExit as err:
        if err.code:
            lines = captured.getvalue().strip().splitlines()
            reason = lines[-1].split("error: ", 1)[-1] if lines else f"exit code {err.code}"
            fail(f"{script} rejects the flags {shlex.join(map(str, args))}: {reason}")


def run_command(argv: list, cwd=None, env: dict | None = None, log: Path | None = None) -> int:
    """Run ``argv`` (interpreter, script, flags) as its own process; its output goes to ``log`` when given (else to
    this process's). Returns the exit code."""
    argv = [str(a) for a in argv]
    if log is None:
        return subprocess.run(argv, cwd=cwd, env=env).returncode
    with open(log, "w") as fh:
        return subprocess.run(argv, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
