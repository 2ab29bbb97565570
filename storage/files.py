"""Files whose path a user gave (a ``--config`` file, a process definition,
a CURVE key, a data folder's manifest), read at start: regular files only.

``open()`` of a FIFO waits until a writer opens the other end, and the
main thread with it: the start never ends, and SIGTERM does not end it
either (its handler only sets a flag, and the interrupted ``open`` is
retried, PEP 475). So a FIFO, a socket or a device given where a file
belongs is refused with an ``OSError`` that says what it is, which every
caller already reports as a bad setting (``oms serve`` exits 2).

``read_text`` opens with ``O_NONBLOCK`` (no wait on a FIFO) and checks the
open descriptor with ``fstat``, so nothing can be swapped in between;
``check_regular`` is for a library that opens the file itself
(``zmq.auth.load_certificate``). ``write_atomically`` is how the project
writes such a file (the front's settings, the shards' manifest, the
console's users): never through whatever a stale ``.tmp`` path holds.
``open_lock`` opens a lock file (``oms.lock``, ``supervisor.lock``), which
is truncated and written: never through a link to another file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import IO

KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
         (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


class NotRegularFile(OSError):
    """A path given for a file names a FIFO, a folder, a socket or a device."""


def _refuse(mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in KINDS if test(mode)), "not a file")
        raise NotRegularFile(f"not a regular file: {kind}")


def check_regular(path: str | Path) -> None:
    """Raise ``NotRegularFile`` unless ``path`` is a regular file (after
    symbolic links); ``FileNotFoundError`` if there is nothing there."""
    _refuse(os.stat(path).st_mode)


def read_text(path: str | Path) -> str:
    """The whole of a regular file as UTF-8 text, as ``Path.read_text``
    reads it (universal newlines; ``UnicodeDecodeError`` if not UTF-8).
    Never waits for a FIFO's writer (``O_NONBLOCK``, then back to blocking:
    a regular file ignores it anyway)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        _refuse(os.fstat(fd).st_mode)
        os.set_blocking(fd, True)
        file = os.fdopen(fd, "r", encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise
    with file:
        return file.read()


def write_atomically(path: str | Path, text: str, mode: int | None = None) -> None:
    """Replace ``path`` with ``text`` (UTF-8) all at once: written to
    ``path.tmp``, synced, renamed over ``path``, the folder synced. Whatever
    lies at ``path.tmp`` (a crashed writer's leftover, a FIFO, a symbolic
    link someone put there) is removed first and the file is created anew
    (``O_EXCL | O_NOFOLLOW``): never a write that waits for a FIFO's reader,
    never one that follows a link elsewhere. ``mode``: the new file's,
    whatever the umask (a secret's 0600); without it, 0666 less the umask,
    as any file the service makes (its LMDB files next to it)."""
    file = Path(path)
    tmp = file.with_name(file.name + ".tmp")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o666 if mode is None else mode)
    try:
        if mode is not None:
            os.fchmod(fd, mode)  # whatever the umask
        with os.fdopen(fd, "w", encoding="utf-8", closefd=False) as out:
            out.write(text)
            out.flush()
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, file)
    folder = os.open(file.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def open_lock(path: str | Path) -> IO[str]:
    """``path`` opened to read and write (made if missing, 0666 less the
    umask), to hold an ``flock`` on and write its holder's pid in. Refused
    (``NotRegularFile``) if it is a symbolic link, a FIFO, a folder, a
    device, or a file with other names (a hard link): whoever may write to
    its folder must not make the service, often root, truncate the file
    such a link names (``/etc/passwd``)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegularFile(f"{path}: a symbolic link; remove it") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((name for test, name in KINDS if test(st.st_mode)), "not a file")
            raise NotRegularFile(f"{path}: not a regular file: {kind}; remove it")
        if st.st_nlink != 1:
            raise NotRegularFile(f"{path}: a file with {st.st_nlink} names (hard links); "
                                 "remove it")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "r+", encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise


class Held(Exception):
    """A lock another process holds; ``owner`` is the line it wrote in."""

    def __init__(self, owner: str) -> None:
        super().__init__(owner)
        self.owner = owner


def take_lock(path: str | Path, holder: str,
              wait: Callable[[str], None] | None = None) -> IO[str]:
    """``open_lock`` and an exclusive ``flock``; the holder's line (``pid N``
    and ``holder``) written in. If another process has it: ``Held`` naming
    that process, or, given ``wait``, ``wait`` is told its name and the lock
    waited for. The lock lasts until the returned file is closed."""
    handle = open_lock(path)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read(200).strip() or "another process"
        if wait is None:
            handle.close()
            raise Held(owner) from None
        wait(owner)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except BaseException:
            handle.close()
            raise
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}{f' ({holder})' if holder else ''}\n")
    handle.flush()
    return handle
