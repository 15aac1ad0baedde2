"""Result files written whole or not at all.

A trace, a table or a plot is first written next to its destination and then moved over it,
so that a full disk, a crash or Ctrl-C never leaves a half-written file in place of one a user
already had (the move is atomic within a filesystem)."""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file in ``path``'s directory, then move it to ``path``
    with the permissions a plain ``open(path, "w")`` would give.  A missing directory or a
    refused write raises ``OSError`` naming ``path`` before anything there changes."""
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(target))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(target)) from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
