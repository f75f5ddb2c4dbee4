"""Open input files so that a hostile path cannot hang or crash a command.

A FIFO named ``model.safetensors`` blocks a plain ``open()`` until something
writes to it; ``/dev/zero`` or ``/dev/stdin`` are endless; a symlink loop
raises ``OSError`` 40. :func:`open_input_file` opens without blocking, then
refuses anything that is not a regular file, with one line naming the path.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

from modelkit.errors import BadFileError

# model file suffixes are declared once, in modelkit.io.suffixes (re-exported
# here for the readers, the writer, the library scan and recipe replay)
from modelkit.io.suffixes import MODEL_SUFFIXES as MODEL_SUFFIXES
from modelkit.io.suffixes import PICKLE_SUFFIXES as PICKLE_SUFFIXES
from modelkit.io.suffixes import SAFETENSORS_SUFFIXES as SAFETENSORS_SUFFIXES
from modelkit.textsafe import shown

_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
               | getattr(os, "O_BINARY", 0))
_ERRNO_PROBLEMS = {
    errno.ENOENT: "no such file",
    errno.ENOTDIR: "no such file (a part of the path is not a folder)",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ELOOP: "symbolic link loop (too many levels of symbolic links)",
    errno.ENAMETOOLONG: "file name too long",
    errno.EISDIR: "is a folder, not a model file",
    errno.ENXIO: "is a socket or a device without a reader, not a model file",
}


def _kind(mode: int) -> str | None:
    """What a non-regular file is, for the message; None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _problem(exc: OSError) -> str:
    known = _ERRNO_PROBLEMS.get(exc.errno or 0)
    return known or f"cannot open it ({exc.strerror or type(exc).__name__})"


def input_error(path: str | os.PathLike[str], problem: str, what: str | None = None
                ) -> BadFileError:
    """A one-line error about input ``path`` (escaped for the terminal)."""
    where = f"{what}: " if what else ""
    return BadFileError(f"{where}{shown(os.fspath(path), 300)}: {problem}")


def open_input_file(path: str | os.PathLike[str], what: str | None = None) -> BinaryIO:
    """Open ``path`` for binary reading; it must be a regular file.

    ``what`` (e.g. ``"inputs.a"``) prefixes the error message.

    Raises:
        BadFileError: missing, unreadable, a symlink loop, a folder, a FIFO,
            a device or a socket.
    """
    try:
        fd = os.open(path, _OPEN_FLAGS | _NONBLOCK)
    except OSError as exc:
        raise input_error(path, _problem(exc), what) from None
    try:
        kind = _kind(os.fstat(fd).st_mode)
        if kind is not None:
            raise input_error(path, f"is {kind}, not a model file", what)
        if _NONBLOCK:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_input_file(path: str | os.PathLike[str], what: str | None = None) -> Path:
    """Check that ``path`` is a readable regular file (see
    :func:`open_input_file`) and return it as a :class:`Path`."""
    with open_input_file(path, what):
        pass
    return Path(path)


__all__ = ["check_input_file", "input_error", "open_input_file"]
