"""Publishing a file whole or not at all: exclusive temporary file, fsync, rename.

Dumps and baselines are both written this way, so a crash, a full disk or a link planted
next to the target never leaves a half-written file under the final name, and never writes
through someone else's file.
"""
from __future__ import annotations

import os
import tempfile
from typing import BinaryIO, Callable


def fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable (best effort: some platforms cannot open directories)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: "str | os.PathLike", write: Callable[[BinaryIO], None], mode: int = 0o644) -> int:
    """Call ``write(sink)`` on a new temporary file beside ``path``, fsync it, rename it over
    ``path``. Returns the size in bytes. On any error the temporary file is removed."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    # mkstemp: O_CREAT | O_EXCL with a random name, mode 0600; it never opens an existing file or
    # follows a planted link. Same directory as the target, so the rename is atomic.
    fd, tmp = tempfile.mkstemp(prefix=".moewatch-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as sink:
            write(sink)
            sink.flush()
            os.fsync(sink.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)  # replaces a link at ``path`` itself, never its target
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(directory)
    return os.path.getsize(path)
