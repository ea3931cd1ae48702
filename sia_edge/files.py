"""Writing files so that a reader never sees half of one, and naming files by their content.

Every output that takes a while (GGUF exports, training checkpoints, eval summaries, caches) is
written beside its destination and renamed into place: an interrupted writer leaves the last
good file, or none, never part of one.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_output", "check_writable", "commit_output", "file_sha256"]


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file's bytes, read in blocks (model files are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_output(path: str | os.PathLike[str]) -> Path:
    """A temporary path beside ``path``; rename it over ``path`` with ``commit_output`` when done."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".partial", dir=p.parent)
    except OSError as exc:  # name the file the user asked for, not our temporary one
        raise OSError(exc.errno, f"cannot write {p}: {exc.strerror or exc} (check that the folder "
                                 f"{p.parent} exists and is writable)") from None
    os.close(fd)
    # mkstemp makes the file private (0600); a model file gets the usual umask-based mode.
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    return Path(tmp)


def check_writable(path: str | os.PathLike[str]) -> None:
    """Fail now, naming ``path``, if it could not be written later (before minutes of work)."""
    atomic_output(path).unlink()


def commit_output(tmp: Path, path: str | os.PathLike[str]) -> None:
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half
