"""Files: atomic writes (write to a temporary file in the same folder, then rename over the target)
and reads that open regular files only (a FIFO or device would block or never end)."""

from __future__ import annotations

import json
import os
import re
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from .errors import ConfigError, InputError

_TMP_SUFFIX = ".tmp"
# what atomic_write's temporary files look like: ".<target name>.<8 characters of mkstemp>.tmp"
_TMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}" + re.escape(_TMP_SUFFIX))


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it to ``path``.

    An interrupted or failing write leaves the previous file (if any) untouched and no temporary
    file behind. The new file gets the usual permissions (0666 masked by the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the name's first 100 characters: a temporary file's name must fit where the target's does
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:100]}.", suffix=_TMP_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, default=str)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))


def ensure_writable_dir(path: str | Path, what: str) -> Path:
    """Create the folder ``path`` if needed and prove that files can be written in it (a probe file is
    created and removed), so that a run fails before its work rather than when it saves the results.

    ``what`` names the folder in the error, e.g. ``"output folder (--out)"``. Raises ``ConfigError``
    for an existing file, a folder that cannot be created (parent is a file, read-only or virtual file
    system such as /proc) or one without write permission.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is an existing file, not a folder; choose a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".bcosvit-write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"cannot write to {what} {path} ({reason}); choose a folder you can write to") from exc
    return path


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files ``atomic_write`` left in ``folder`` when a process was killed
    mid-write (only names of its pattern; nothing else is touched). Returns the removed paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if _TMP_NAME.fullmatch(p.name) and p.is_file() and not p.is_symlink()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def open_regular_file(path: str | Path, what: str = "file", directory_hint: str | None = None) -> BinaryIO:
    """``path`` opened for binary reading if it is a regular file (checked on the open file, so a
    FIFO never blocks); ``InputError`` saying what it is otherwise. ``what`` names what was
    expected ("image file", "checkpoint"); ``directory_hint`` is added when ``path`` is a folder."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO without a writer must not block
    except FileNotFoundError:
        raise InputError(f"{path} does not exist") from None
    except OSError as exc:
        try:  # sockets cannot be opened at all: say what the path is
            problem = _not_a_regular_file(path, path.stat().st_mode, what, directory_hint)
        except OSError:
            problem = None
        raise InputError(problem or f"cannot read {path}: {exc.strerror}") from exc
    problem = _not_a_regular_file(path, os.fstat(fd).st_mode, what, directory_hint)
    if problem:
        os.close(fd)
        raise InputError(problem)
    return os.fdopen(fd, "rb")


def _not_a_regular_file(path: Path, mode: int, what: str, directory_hint: str | None) -> str | None:
    """Why ``path`` with ``st_mode`` ``mode`` cannot be read as a ``what``; None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return f"{path} is a directory; {directory_hint or f'pass a {what}, not a folder'}"
    if stat.S_ISFIFO(mode):
        kind = "a named pipe (FIFO)"
    elif stat.S_ISSOCK(mode):
        kind = "a socket"
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        kind = "a device"
    else:
        kind = "not a regular file"
    article = "an" if what[:1] in "aeiou" else "a"
    return f"{path} is {kind}, not {article} {what}; pass a regular file"
