"""The private folder of the shards' sockets (docs/scaling.md, "Shape").

Each shard binds its intake, events and domain-events endpoints as Unix
sockets (ZeroMQ ``ipc://``) in one folder that only the service's user may
enter (mode 0700, owned by that user, not a symbolic link): the front and
processes of that user (who can read the data folder anyway) reach them, no
other user of the host does. ``DATA/run`` normally; when its sockets' paths
would not fit a Unix socket address (107 bytes), a new folder from
``tempfile.mkdtemp`` (0700, in ``TMPDIR`` or /tmp), removed at stop; and so
when ``DATA``'s filesystem takes no Unix socket (SMB, vfat, some FUSE
mounts), found by binding one there at start.

The check holds until the shards bind (seconds later) and after, when one
restarts, only if no other user can swap the folder: so every folder above
it belongs to root or this user and no one else may write to it (unless it
is sticky, as /tmp is: then no one else may rename what is ours), and the
path is taken with its links resolved, once, at start.

A socket file left by a shard (killed with -9, or stopped: libzmq 4.3 does
not remove it when it closes) does not stop the next start: ZeroMQ removes
the file at that path before it binds, which a shard does only once it holds
its data folder's lock (no live shard's socket is ever taken over). Never
the abstract namespace (``ipc://@...``): it has no file permissions.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import zmq

from oms.config import ConfigError, check_utf8_path

logger = logging.getLogger("shards.supervisor")

PATH_MAX = int(getattr(zmq, "IPC_PATH_MAX_LEN", 0) or 107)  # sun_path, less its NUL
NAMES = ("intake", "events", "domain")


def socket_path(folder: Path, k: int, name: str) -> Path:
    """Shard K's socket ``name`` (intake, events or domain) in ``folder``."""
    return folder / f"{k}.{name}"


def fits(folder: Path, shards: int) -> bool:
    """Every shard's socket path in ``folder`` fits a Unix socket address."""
    longest = max(len(os.fsencode(socket_path(folder, shards - 1, n))) for n in NAMES)
    return longest <= PATH_MAX


def check_private(folder: Path) -> None:
    """``folder`` is a real folder (not a symbolic link), owned by this
    user, that nobody else may enter: or a ``ConfigError`` says what to do."""
    try:
        st = os.lstat(folder)
    except OSError as exc:
        raise ConfigError(f"the shards' socket folder {folder}: {exc}") from None
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(f"the shards' socket folder {folder} is a symbolic link: remove it "
                          "(the service makes the folder itself, mode 0700)")
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"the shards' socket folder {folder} is not a folder: remove it")
    if st.st_uid != os.geteuid():
        raise ConfigError(f"the shards' socket folder {folder} belongs to user id {st.st_uid}, "
                          f"not to this service's ({os.geteuid()}): remove it")
    if st.st_mode & 0o077:
        raise ConfigError(f"the shards' socket folder {folder} has mode "
                          f"{stat.S_IMODE(st.st_mode):04o}: other users could reach the "
                          f"shards; chmod 700 {folder} (or remove it)")


def check_above(folder: Path) -> None:
    """No other user may rename ``folder`` or any folder above it (a real
    path, without links): or a ``ConfigError`` says which and what to do."""
    for above in folder.parents:
        st = os.stat(above)
        why = ""
        if st.st_uid not in (0, os.geteuid()):
            why = f"{above} belongs to user id {st.st_uid}"
        elif st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            why = (f"{above} has mode {stat.S_IMODE(st.st_mode):04o}: other users may "
                   "write to it")
        if why:
            raise ConfigError(f"{why}, and so swap the shards' socket folder {folder} for "
                              "one of their own after it was checked: use a data folder "
                              "(and TMPDIR) under folders that only root or this service's "
                              f"user may change (or chmod go-w {above})")


@dataclass(frozen=True)
class RunDir:
    """Where the shards' sockets are; ``temporary``: made by ``mkdtemp``."""

    path: Path
    temporary: bool

    def remove(self) -> None:
        """At stop: a temporary folder goes (``DATA/run`` stays)."""
        if self.temporary:
            shutil.rmtree(self.path, ignore_errors=True)


def check_data(data: Path) -> Path:
    """``DATA`` (made if missing) and every folder above it: no other user
    may change them (``check_above``), whether the sockets go there or not
    (``front.json``, read again at each start of the front, lies there);
    its real path."""
    data.mkdir(parents=True, exist_ok=True)
    real = Path(os.path.realpath(data))
    check_utf8_path(str(real), "the data folder's real path")  # a link to b'/x\xff'
    check_above(real / "run")
    return real


def open_run_dir(data: Path, shards: int) -> RunDir:
    """``DATA/run``, made 0700 if missing and checked; a private temporary
    folder when ``DATA``'s path is too long for the sockets' addresses."""
    folder = check_data(data) / "run"
    if fits(folder, shards):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            pass  # checked below, as found (never chmod-ed or followed)
        except OSError as exc:
            raise ConfigError(f"the shards' socket folder {folder}: {exc}") from None
        check_private(folder)
        refused = takes_no_socket(folder)
        if not refused:
            return RunDir(folder, temporary=False)
        why = f"the data folder's filesystem takes no Unix socket ({refused})"
        fix = "use a shorter TMPDIR, or a data folder on a local filesystem"
    else:
        why = (f"the data folder's path is too long for the shards' sockets (at most "
               f"{PATH_MAX} bytes)")
        fix = "use a shorter --data path (or TMPDIR)"
    tmp = Path(os.path.realpath(tempfile.gettempdir()))
    if not fits(tmp / "oms-run-XXXXXXXX", shards):  # the length of mkdtemp's names
        raise ConfigError(f"{why}; in {tmp} their paths would be longer than {PATH_MAX} "
                          f"bytes as well: {fix}")
    check_above(tmp / "oms-run-XXXXXXXX")
    made = Path(tempfile.mkdtemp(prefix="oms-run-", dir=tmp))
    check_private(made)
    logger.warning("%s: they are in %s instead (mode 0700, removed at stop)", why, made)
    return RunDir(made, temporary=True)


def takes_no_socket(folder: Path) -> str:
    """Why a Unix socket cannot be bound in ``folder`` ("" if it can): a
    probe, bound and removed at once."""
    probe = folder / ".probe"  # no longer than "1.domain": it fits where they do
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            probe.unlink(missing_ok=True)  # one a supervisor killed with -9 left
            sock.bind(str(probe))
        except OSError as exc:
            return exc.strerror or str(exc)
    probe.unlink(missing_ok=True)
    return ""
