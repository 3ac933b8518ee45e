"""Atomic file writes (a temp file in the same directory, then os.replace), JSON without NaN, and the
checks that an output path can be written before any work starts.

Kept free of pandas: the worker writes its result with it and should start fast.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def atomic_write(path: Path, write: Any) -> None:
    """Write through a temp file in the same directory, then os.replace: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; results are for other users and artifact collectors too, so the
        # file gets what a plain open() would give it: 0666 less the umask.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", newline="") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class OutputPathError(ValueError):
    """An output path that cannot be written (a file, under a file, read-only, full); the message names the fix."""


# A full disk (ENOSPC) or a full quota (EDQUOT): the run stops cleanly and can be resumed once space is freed.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
DISK_FULL_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure; free space, then retry or --resume


def is_disk_full(err: BaseException) -> bool:
    """True for an OSError that says the disk or the quota is full."""
    return isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS


def _size(n_bytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.0f} {unit}" if unit == "bytes" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return ""  # unreachable


def check_output_dir(path: str | Path, flag: str, need_bytes: int = 0) -> Path:
    """`path` as a folder this process can write, or create, with `need_bytes` free on its disk.

    Creates nothing: a missing folder is judged by the nearest folder above it that exists, which must
    take a new entry. `flag` names where the path came from in the message ("--out"). Raises
    OutputPathError for an empty path, a file, a path under a file, a folder that cannot be written
    (read-only mount, /proc, permissions) and too little free space.
    """
    text = str(path)
    if not text.strip():
        raise OutputPathError(f"{flag} is empty; give a folder, e.g. {flag.split(maxsplit=1)[0]} results")
    folder = Path(text).expanduser()
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        if existing == folder.absolute():
            raise OutputPathError(f"{flag} {text!r} is a file, not a folder; give a folder (it is created when missing)")
        raise OutputPathError(f"{flag} {text!r}: {existing} is a file, so no folder can be made under it; "
                              "give a path inside a folder")  # fmt: skip
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".hgbench-write-check-"):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        what = "is not a folder this process can write" if existing == folder.absolute() else f"cannot be made in {existing}"
        raise OutputPathError(f"{flag} {text!r} {what} ({reason}); give a writable folder") from None
    free = shutil.disk_usage(existing).free
    if need_bytes and free < need_bytes:
        raise OutputPathError(f"{flag} {text!r}: only {_size(free)} free on its disk, and this needs about "
                              f"{_size(need_bytes)}; free some space or give a folder on another disk")  # fmt: skip
    return folder


def check_output_file(path: str | Path, flag: str) -> Path:
    """`path` as a file that can be written: not empty, not a folder, in an existing folder this process can write."""
    text, example = str(path), f"compare.{flag.lstrip('-')}"
    if not text.strip():
        raise OutputPathError(f"{flag} is empty; give a file name, e.g. {flag} {example}")
    target = Path(text).expanduser()
    if target.is_dir():
        raise OutputPathError(f"{flag} {text!r} is a folder; give a file name, e.g. {flag} {Path(text) / example}")
    parent = target.absolute().parent
    if parent.exists() and not parent.is_dir():
        raise OutputPathError(f"{flag} {text!r}: {parent} is a file, not a folder; give a path in a folder")
    if not parent.is_dir():
        raise OutputPathError(f"{flag} {text!r}: its folder {parent} does not exist; create it or give a path in an existing folder")
    try:
        with tempfile.TemporaryFile(dir=parent, prefix=".hgbench-write-check-"):
            pass
    except OSError as err:
        raise OutputPathError(f"{flag} {text!r}: its folder {parent} cannot be written ({err.strerror}); "
                              "give a path in a writable folder") from None  # fmt: skip
    return target


def _umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _json_default(value: object) -> object:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def _finite(value: object) -> object:
    """NaN/inf become null: JSON has no NaN."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Pretty JSON, atomically; NaN and inf written as null."""
    text = json.dumps(_finite(dict(data)), indent=2, default=_json_default, sort_keys=False)
    atomic_write(Path(path), lambda handle: handle.write(text + "\n"))


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from disk."""
    return json.loads(Path(path).read_text())
