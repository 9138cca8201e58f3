"""Model folders: what a usable HF model directory holds, the cache converted models go
to, and publishing a conversion once (a lock, temp dirs renamed into place).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from perpcs.atomic import current_umask
from perpcs.errors import fail

EXPECTED_FORMATS = (
    "expected one of: 'smollm2' (the bundled SmolLM2-135M-Instruct); "
    "a Hugging Face model directory (config.json and *.safetensors or pytorch_model*.bin); "
    "a Meta download directory (params.json, consolidated.00.pth [.01.pth ...], and tokenizer.model "
    "in it or in its parent directory)"
)


def cache_root() -> Path:
    return Path(os.environ.get("PERPCS_CACHE") or Path.home() / ".cache" / "perpcs").expanduser()


def _listing(path: Path, limit: int = 8) -> str:
    names = sorted(p.name for p in path.iterdir())
    if not names:
        return "nothing"
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _checked_hf_dir(path: Path) -> Path:
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        fail(f"{config_file}: malformed config.json ({err}); {EXPECTED_FORMATS}")
    if not isinstance(config, dict) or "model_type" not in config:
        fail(f"{config_file}: config.json has no 'model_type' field; {EXPECTED_FORMATS}")
    if not (list(path.glob("*.safetensors")) or list(path.glob("pytorch_model*.bin"))):
        fail(f"{path}: config.json found but no weights (*.safetensors or pytorch_model*.bin); "
             f"{EXPECTED_FORMATS}")
    return path


def _has_hf_files(path: Path) -> bool:
    return (path / "config.json").is_file() and bool(list(path.glob("*.safetensors")))


def _publish_dir(tmp_dir: Path, target: Path) -> Path:
    """Move a finished temp directory into place; if another process got there first, keep theirs."""
    # mkdtemp makes the directory private (0700); a model cache should be shared as the user's umask says,
    # like any file the user writes (a group-shared cache needs 0o775, a private one 0o700).
    umask = current_umask()
    dir_mode, file_mode = 0o777 & ~umask, 0o666 & ~umask
    os.chmod(tmp_dir, dir_mode)
    for entry in tmp_dir.iterdir():
        os.chmod(entry, dir_mode if entry.is_dir() else file_mode)
    try:
        os.rename(tmp_dir, target)
    except OSError:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if not _has_hf_files(target):
            raise
    return target


@contextlib.contextmanager
def _conversion_lock(target: Path):
    """Hold an exclusive lock on ``<target>.lock`` while converting into ``target``.

    Every torchrun process loads the base model; without the lock each would convert (and write) the same
    checkpoint at once. ``filelock`` takes an flock on the file and leaves the file in place (deleting it could
    let a late process lock a new file while another still holds the old one); on a filesystem without flock
    it falls back to a marker file.
    """
    from filelock import FileLock

    lock_file = target.with_name(target.name + ".lock")
    lock = FileLock(lock_file)
    try:
        lock.acquire()
    except OSError as err:
        fail(f"{lock_file}: cannot create the conversion lock ({err}); the directory must be writable")
    try:
        yield
    finally:
        lock.release()


def _remove_stale_temps(target: Path) -> None:
    """Temp dirs of conversions into ``target`` are made only under its lock: one found by the lock's holder
    belongs to a process killed mid-conversion (up to 13 GB for a 7B), never to a running one."""
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _refuse_leftover(target: Path) -> None:
    """Stop before converting into a target that holds something else than a finished conversion (a crash
    mid-copy, a file put there by hand): the final rename would fail only after the whole conversion."""
    if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
        return  # the rename replaces an empty directory
    if os.path.lexists(target):
        held = f"it holds {_listing(target)}" if target.is_dir() else "it is not a directory"
        fail(f"{target} exists but is not a finished conversion ({held}); delete {target} and run again")
