"""Writing files into an output folder without following links planted there.

Run folders are shared and resumed, so a name in one (stats.jsonl, summary.json, a plot) may
already be a symbolic link to a file elsewhere. Two ways to write, by what the file needs:
- ``replace_in``: the whole file is written to a new temporary file in the folder (mkstemp:
  created exclusively, never through a link) and renamed over the name; a link there is
  replaced, its target never touched;
- ``open_in``: the file is opened in place (appending a log) with O_NOFOLLOW; a link, or a file
  with a second hard link, is refused with an OSError naming the path.
Names are single path components: one holding a separator, ``.`` or ``..`` is a ValueError, so
no name can lead out of the folder.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Callable
from typing import IO, Any

FILE_MODE = 0o644  # an ordinary output file; mkstemp makes it private

_FLAGS = {
    "r": os.O_RDONLY,
    "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
}


def path_in(folder: str, name: str) -> str:
    """``folder/name``; ValueError unless ``name`` is one plain path component."""
    separators = [s for s in (os.sep, os.altsep, "\0") if s]
    if not name or name in (".", "..") or any(s in name for s in separators):
        raise ValueError(f"file name {name!r}: expected a single file name in {folder!r}")
    return os.path.join(folder, name)


def _link_error(path: str, what: str) -> OSError:
    return OSError(
        errno.ELOOP, f"{path} is {what}: refusing to write through it (delete it, or choose another --out)"
    )


def refuse_link(folder: str, name: str) -> None:
    """OSError naming ``folder/name`` if it is a symbolic link (for folders a library writes into)."""
    path = path_in(folder, name)
    if os.path.islink(path):
        raise _link_error(path, "a symbolic link")


def open_in(folder: str, name: str, mode: str = "a", encoding: str | None = "utf-8") -> IO[Any]:
    """``folder/name`` opened with ``mode`` ("r", "w" or "a", "b" for binary) without following
    a link; OSError naming the path if it is a link, not a regular file, or has other hard links."""
    path = path_in(folder, name)
    flags = _FLAGS[mode.replace("b", "")] | os.O_NOFOLLOW | os.O_CLOEXEC
    # O_NONBLOCK: a FIFO planted at the name fails to open instead of blocking; cleared below.
    try:
        fd = os.open(path, flags | os.O_NONBLOCK, 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise _link_error(path, "a symbolic link") from error
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file: refusing to use it")
        if mode.replace("b", "") != "r" and info.st_nlink > 1:
            raise _link_error(path, "a hard link to another file")
        os.set_blocking(fd, True)
        if "b" in mode:
            return os.fdopen(fd, mode)
        return os.fdopen(fd, mode, encoding=encoding)
    except BaseException:
        os.close(fd)
        raise


def replace_in(folder: str, name: str, write: Callable[[IO[Any]], object], binary: bool = False) -> str:
    """Writes ``folder/name`` by calling ``write(file)`` on a new temporary file in ``folder``
    and renaming it over the name (replacing a link there, not following it); on an error the
    temporary file is removed and the old file stays. Returns the path."""
    path = path_in(folder, name)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, FILE_MODE)  # on the descriptor: the temporary's name could be swapped
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path
