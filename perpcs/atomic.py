"""Writes that a killed run or a full disk never leaves half done: files and directories are written
beside their target and renamed into place, and a write that fails names the path.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from perpcs.errors import fail


def _staging_dir(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    os.chmod(staging, 0o777 & ~current_umask())   # mkdtemp makes 0700; published dirs follow the umask
    return staging


def follow_umask(root: Path) -> None:
    """Give everything below ``root`` the modes a plain write would have: some writers (safetensors' save_file,
    so peft's save_pretrained) make their files 0600 whatever the umask, and published outputs must be readable
    as the user's umask says (0644 files, 0755 dirs under umask 022)."""
    umask = current_umask()
    dir_mode, file_mode = 0o777 & ~umask, 0o666 & ~umask
    for path in sorted(Path(root).rglob("*")):
        if not path.is_symlink():
            os.chmod(path, dir_mode if path.is_dir() else file_mode)


def publish_dir(staging: Path, target: Path) -> None:
    """Publish a finished staging dir as ``target``.

    A new target is one rename. An existing target (e.g. the task LoRA dir, which also holds predictions and
    logs) keeps its other files; the staged files replace theirs one by one. A directory counts as a complete
    adapter only while both the weights and the config are there, so the old config goes first and the new
    one comes last: a failure in between leaves an incomplete adapter (redone by the next run), never new
    weights under the old config.
    """
    if not target.exists():
        staging.rename(target)
        return
    if (staging / "adapter_config.json").exists():
        (target / "adapter_config.json").unlink(missing_ok=True)
    for f in sorted(staging.iterdir(), key=lambda p: p.name == "adapter_config.json"):
        os.replace(f, target / f.name)
    staging.rmdir()


def write_dir_atomic(target, write, half_done=None) -> Path:
    """Call ``write(staging_dir)`` and publish the directory as ``target``; on any error nothing is published.

    Errors of the disk (full, read-only) become a clear message; outputs written earlier are left intact.
    ``half_done(target)``: whether a failure left an existing target partly replaced (it is then said so).
    """
    target = Path(target)
    try:
        staging = _staging_dir(target)
    except OSError as err:
        fail(f"cannot write into {target.parent}: {err.strerror or err}")
    existed = target.exists()
    try:
        write(staging)
        follow_umask(staging)
        publish_dir(staging, target)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        half_replaced = existed and half_done is not None and half_done(target)
        kept = (f"{target} is incomplete now and will be redone by the next run" if half_replaced
                else "earlier outputs are intact")
        fail(f"could not save {target}: {err.strerror or err}; {kept}")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def write_json_atomic(path, obj, indent: int | None = 1) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it, so a reader never sees half a file."""
    write_bytes_atomic(path, (json.dumps(obj, indent=indent, ensure_ascii=False) + "\n").encode("utf-8"))


def write_bytes_atomic(path, data: bytes) -> None:
    """A full disk or a read-only directory is a clear error naming the path; the old file stays intact."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        fail(f"cannot write {path}: {err.strerror or err}")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())   # mkstemp makes 0600; published files follow the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError):
            fail(f"could not write {path}: {err.strerror or err}; an earlier version of it is intact")
        raise


def remove_orphaned_staging(root_dirs, target_names) -> int:
    """Remove the staging that a killed write left beside its target: ``.<name>.XXXX.tmp`` dirs and files, in
    ``root_dirs`` (not below them), for the given target names only (e.g. user_7, user_7.json). Sharded runs
    share folders: a process names only its own users' targets, so it never removes a staging being written by
    another. Returns how many were removed."""
    names = sorted(set(target_names))
    if not names:
        return 0
    # the name, then mkdtemp/mkstemp's random part (no dots), then .tmp: user_1 never matches user_12's staging
    pattern = re.compile(r"\.(%s)\.[^.]+\.tmp" % "|".join(re.escape(n) for n in names))
    removed = 0
    for root in root_dirs:
        root = Path(root)
        if not root.is_dir():
            continue
        for path in root.iterdir():
            if not pattern.fullmatch(path.name):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed += not path.exists()
    return removed


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
