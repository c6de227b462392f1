"""Atomic file writes: write to a temporary file in the same folder, then rename over the target."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ConfigError

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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
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
