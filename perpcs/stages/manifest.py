"""One run per output folder, and a record of what it was made from.

Every stage output folder holds ``run_manifest.json``, written before the first user and checked on every resume:

    stage      which stage wrote the folder
    settings   every setting that changes an output (training, composition, generation; not progress or logging)
    data       a digest of each user's data the stage reads (history, queries, profile text)
    inputs     digests of every input artifact (base model fingerprint, task LoRA, sharer adapters, gates)
    numerics   device type and dtype (fp32 vs bf16 give other numbers)
    recorded   the command line, working directory, library versions, device and CPU ISA (not compared)

A run whose manifest differs from the folder's in any compared field is refused (exit 2) with the fields named and
the two ways out: ``--overwrite`` (redo every user with this run's settings) or another ``--output_dir``. Nothing is
silently redone or reused. Each per-user output also records the digests it was made from (``made_from``), so
outputs copied between folders, or left by an older run of another shard, are checked one by one too.

While a run works on a folder it holds a lock there (``run.lock``; ``run.shard-I-of-N.lock`` for shard I of N):
a second run on the same users finds it and exits 2 naming the holder's pid and command. Shards of one sharded run
(same N) work side by side; they share one manifest, so their settings must be identical.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from perpcs.atomic import write_json_atomic
from perpcs.errors import fail
from perpcs.models.provenance import REDO, read_record

MANIFEST_FILE = "run_manifest.json"
MANIFEST_FORMAT = "perpcs-run/1"
COMPARED = ("stage", "settings", "data", "inputs", "numerics")
_LOCK_NAME = re.compile(r"^run(?:\.shard-(\d+)-of-(\d+))?\.lock$")


_COMMAND: list = []   # the script and its flags, as the script parsed them (set_command)


def set_command(script: str, argv: list) -> None:
    """Record the command a stage runs as (cli_flags.parse calls this): in a test or a notebook that calls a script's
    main(argv), sys.argv is the host's, not the stage's."""
    _COMMAND[:] = [str(script), *map(str, argv)]


def current_command() -> list:
    return list(_COMMAND) if _COMMAND else list(sys.argv)


def canonical_sha256(obj) -> str:
    """sha256 of an object's canonical JSON (sorted keys, no spaces): the same data gives the same digest."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def user_data_sha256(user: dict, profile_text: str | None = None, queries: bool = True) -> str:
    """What a stage reads of one user: the history items, the queries' ids and inputs (stages that predict; golds
    are not read), the profile text."""
    asked = [{"id": q.get("id"), "input": q.get("input")} for q in user.get("query", [])] if queries else None
    return canonical_sha256({"history": user.get("profile"), "queries": asked, "profile_text": profile_text})


def numerics(device_name: str, cpu_bf16: bool) -> dict:
    """The device type and dtype a stage computes in (resolved without loading a model)."""
    from perpcs.models.devices import resolve_device
    device_type = resolve_device(device_name).type
    if device_type == "cuda":
        dtype = "bfloat16"
    else:
        dtype = "float32 + bfloat16 autocast" if cpu_bf16 else "float32"
    return {"device_type": device_type, "dtype": dtype}


def environment(device_name: str) -> dict:
    """What is recorded but not compared: a resume on another machine or after an upgrade is allowed, and said."""
    import peft
    import torch
    import transformers
    env = {"command": current_command(), "cwd": os.getcwd(), "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "device": device_name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()   # the CPU kernels' ISA (AVX2, AVX512, ...)
    except AttributeError:
        pass
    env["cpu"] = cpu_numerics()
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


# Environment variables that choose which CPU kernels run, so which float results a bf16 run gets (docs/reference.md,
# "Numbers across machines"): oneDNN's and MKL's instruction-set limits, aten's kernel ISA, MKL's reproducibility
# mode and the thread counts.
CPU_KERNEL_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS",
                  "MKL_CBWR", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile", "avx_vnni", "avx512f", "avx2")


def cpu_numerics() -> dict:
    """What decides a CPU run's float results beyond its dtype: the processor (model name and the flags that pick
    bf16 kernels: native AVX512-BF16 or AMX, else emulation), torch's threads and any kernel-limiting variables
    that were set. Recorded, not compared: a resume on another CPU is allowed and said."""
    import torch
    info = {"threads": torch.get_num_threads(),
            "env": {k: os.environ[k] for k in CPU_KERNEL_ENV if k in os.environ}}
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:   # not Linux: the platform's own name
        info["model"] = platform.processor() or platform.machine()
        return info
    fields = dict(line.split(":", 1) for line in text.splitlines()[:40] if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    info["model"] = fields.get("model name", platform.machine())
    flags = set(fields.get("flags", "").split())
    info["flags"] = [f for f in CPU_BF16_FLAGS if f in flags]
    return info


@dataclass(frozen=True)
class RunManifest:
    """What a stage's outputs in one folder are made from (see the module docstring)."""
    stage: str
    settings: dict
    data: dict
    inputs: dict
    numerics: dict
    recorded: dict = field(default_factory=dict, compare=False)

    @property
    def settings_sha256(self) -> str:
        return canonical_sha256(self.settings)

    def compared(self) -> dict:
        return {key: getattr(self, key) for key in COMPARED}

    def to_json(self) -> dict:
        return {"format": MANIFEST_FORMAT, **self.compared(), "recorded": self.recorded}


def read_manifest(path) -> dict | None:
    data = read_record(path, "what this folder's outputs were made from", REDO)
    if data is not None and data.get("format") != MANIFEST_FORMAT:
        fail(f"{path}: not a run manifest of this version (format {data.get('format')!r}); {REDO}")
    return data


def differences(had, wanted, prefix: str = "") -> list:
    """[(dotted field, old, new)] where two JSON values differ, down to the leaves."""
    if isinstance(had, dict) and isinstance(wanted, dict):
        out = []
        for key in sorted(set(had) | set(wanted), key=str):
            out += differences(had.get(key), wanted.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    return [] if had == wanted else [(prefix, had, wanted)]


def describe_differences(diffs: list, limit: int = 8) -> str:
    def short(value):
        text = "(none)" if value is None else json.dumps(value, ensure_ascii=False)
        if re.fullmatch(r'"[0-9a-f]{64}"', text):
            text = text[1:13] + "..."   # a digest: its start tells them apart
        return text if len(text) <= 60 else text[:57] + "..."
    shown = ", ".join(f"{name} {short(old)} -> {short(new)}" for name, old, new in diffs[:limit])
    return shown + (f" and {len(diffs) - limit} more" if len(diffs) > limit else "")


def check_or_write_manifest(out_root, manifest: RunManifest, overwrite: bool,
                            check_outputs: Callable | None = None) -> None:
    """Check this run against the folder's manifest, or write it; --overwrite replaces a different one.
    ``check_outputs()`` refuses per-user outputs made otherwise; it runs before anything is written, so a refused
    run leaves no record claiming the folder."""
    path = Path(out_root) / MANIFEST_FILE
    had = read_manifest(path)
    wanted = manifest.compared()
    if had is not None:
        diffs = differences({k: had.get(k) for k in COMPARED}, wanted)
        if not diffs:
            if check_outputs is not None and not overwrite:
                check_outputs()
            return
        if not overwrite:
            made = had.get("recorded", {}).get("command")
            fail(f"{path}: this folder holds the outputs of another run ({describe_differences(diffs)})"
                 + (f"; it was made by: {' '.join(made)}" if made else "")
                 + "; pass --overwrite to redo every user with this run's settings, or another --output_dir")
        print(f"--overwrite: {path} described another run ({describe_differences(diffs, 3)}); replaced")
    elif check_outputs is not None and not overwrite:   # outputs with no folder record: each is checked on its own
        check_outputs()
    write_json_atomic(path, manifest.to_json())
    again = read_manifest(path)   # a shard started at the same moment with other settings: one of us must stop
    if differences({k: again.get(k) for k in COMPARED}, wanted):
        fail(f"{path} was just written by another run with other settings "
             f"({describe_differences(differences({k: again.get(k) for k in COMPARED}, wanted))}); shards of one "
             f"run need identical settings")


# ------------------------------------------------------------------------------------------------------- locks

def lock_name(num_shards: int, shard_id: int) -> str:
    return "run.lock" if num_shards == 1 else f"run.shard-{shard_id}-of-{num_shards}.lock"


def _holder_file(lock_path: Path) -> Path:
    return lock_path.with_name(lock_path.name.removesuffix(".lock") + ".holder.json")


def _holder(lock_path: Path) -> str:
    try:
        info = json.loads(_holder_file(lock_path).read_text(encoding="utf-8"))
        return f"pid {info['pid']} on {info['host']} since {info['since']}: {' '.join(info['command'])}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that recorded no holder file"


def _is_held(lock_path: Path) -> bool:
    from filelock import FileLock, Timeout
    probe = FileLock(str(lock_path), timeout=0, is_singleton=False)
    try:
        probe.acquire()
    except Timeout:
        return True
    probe.release()
    return False


def _conflicts(mine: tuple, other: tuple) -> bool:
    """Shards of one sharded run (same N, other I) split the users; anything else overlaps."""
    (n, i), (n2, i2) = mine, other
    return not (n == n2 and n > 1 and i != i2)


@contextmanager
def folder_lock(out_root, num_shards: int = 1, shard_id: int = 0):
    """Hold this run's lock on ``out_root`` for the block; another run on the same users exits 2 naming the
    holder. The OS drops the lock when a process dies (kill -9 included), so a killed run never blocks a rerun."""
    from filelock import FileLock, Timeout
    root = Path(out_root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        fail(f"cannot create the output folder {root}: {err.strerror or err}")
    path = root / lock_name(num_shards, shard_id)
    lock = FileLock(str(path), timeout=0, is_singleton=False)
    try:
        lock.acquire()
    except Timeout:
        fail(f"{root} is in use by another run ({path} held by {_holder(path)}); wait for it to finish, or pass "
             f"another --output_dir")
    try:
        for other in sorted(root.glob("run*.lock")):
            m = _LOCK_NAME.match(other.name)
            if other == path or not m:
                continue
            theirs = (int(m.group(2)), int(m.group(1))) if m.group(1) else (1, 0)
            if _conflicts((num_shards, shard_id), theirs) and _is_held(other):
                fail(f"{root} is in use by another run ({other.name} held by {_holder(other)}); its users overlap "
                     f"this run's: wait for it to finish, or pass another --output_dir")
        holder = {"pid": os.getpid(), "host": platform.node(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "command": current_command()}
        write_json_atomic(_holder_file(path), holder)
        try:
            yield path
        finally:
            _holder_file(path).unlink(missing_ok=True)
    finally:
        lock.release()


@contextmanager
def open_run(out_root, manifest: RunManifest, num_shards: int, shard_id: int, overwrite: bool,
             check_outputs: Callable | None = None):
    """The start of every stage run on a folder: take the lock, check the manifest and the outputs there (all
    users', not only this shard's: they share the folder), then write the manifest."""
    with folder_lock(out_root, num_shards, shard_id) as lock:
        check_or_write_manifest(out_root, manifest, overwrite, check_outputs)
        yield lock
