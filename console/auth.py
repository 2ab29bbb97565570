"""Operator logins: a credentials file of salted scrypt hashes.

One user a line, ``name:role:scrypt$N$r$p$salt_hex$hash_hex``; ``#`` starts
a comment. ``role`` is ``operator`` (may act on orders) or ``viewer`` (may
only look). The file must be readable by its owner only, like the CURVE
secret keys. ``oms console passwd FILE NAME`` adds or replaces a user.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from storage import files

ROLES = ("operator", "viewer")
NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")
N, R, P = 2**14, 8, 1  # scrypt cost: ~60 ms and 16 MiB per check here (measured)
MAX_PASSWORD = 1024


class CredentialsError(ValueError):
    """The credentials file cannot be used."""


@dataclass(frozen=True)
class User:
    name: str
    role: str
    hashed: str

    @property
    def may_act(self) -> bool:
        return self.role == "operator"


def hash_password(password: str, salt: bytes | None = None, n: int = N, r: int = R,
                  p: int = P) -> str:
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    return f"scrypt${n}${r}${p}${salt.hex()}${digest.hex()}"


def check_password(password: str, hashed: str) -> bool:
    try:
        kind, n, r, p, salt, digest = hashed.split("$")
        if kind != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt),
                             n=int(n), r=int(r), p=int(p), dklen=len(bytes.fromhex(digest)))
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(got.hex(), digest)


_DUMMY = hash_password("not a password", salt=b"\0" * 16)


def load_users(file: str | Path) -> dict[str, User]:
    path = Path(file)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        text = files.read_text(path)  # a FIFO: refused, not waited on
    except OSError as exc:
        raise CredentialsError(f"{path}: {exc.strerror or exc}") from None
    if mode & 0o077:
        raise CredentialsError(f"{path} is readable by others (mode {mode:o}); chmod 600 it")
    users = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition(":")
        role, _, hashed = rest.partition(":")
        if not NAME.fullmatch(name) or role not in ROLES or not hashed.startswith("scrypt$"):
            raise CredentialsError(f"{path}:{number}: expected name:role:scrypt$... "
                                   f"(role operator or viewer)")
        users[name] = User(name, role, hashed)
    return users


def authenticate(users: dict[str, User], name: str, password: str) -> User | None:
    """The user if the password is right; the same work is done either way."""
    user = users.get(name)
    ok = check_password(password, user.hashed if user else _DUMMY)
    return user if ok and user is not None else None


def set_user(file: str | Path, name: str, role: str, password: str,
             waiting: Callable[[str], None] = lambda _: None) -> None:
    """Add or replace one user; the file is written 0600. Another update in
    progress (another process) is waited for: ``waiting`` is told whom."""
    if not NAME.fullmatch(name):
        raise CredentialsError("a name is 1 to 64 letters, digits or . _ @ -")
    if role not in ROLES:
        raise CredentialsError(f"role must be one of {', '.join(ROLES)}")
    if not 8 <= len(password) <= MAX_PASSWORD:
        raise CredentialsError(f"a password is 8 to {MAX_PASSWORD} characters")
    path = Path(file)
    line = f"{name}:{role}:{hash_password(password)}"  # the slow part, before the lock
    with update_lock(path, waiting):  # two runs at once: each reads the other's line
        lines = files.read_text(path).splitlines() if path.exists() else [
            "# oms console users: name:role:scrypt hash (oms console passwd FILE NAME)"]
        lines = [ln for ln in lines if ln.partition(":")[0].strip() != name]
        lines.append(line)
        files.write_atomically(path, "\n".join(lines) + "\n", mode=0o600)


@contextmanager
def update_lock(path: Path, waiting: Callable[[str], None]) -> Iterator[None]:
    """An ``flock`` on ``PATH.lock`` (never followed if a link,
    ``files.take_lock``), held while the file is read, changed and written:
    updates from other processes wait their turn (``waiting`` told first)."""
    lock = path.with_name(path.name + ".lock")
    with files.take_lock(lock, "oms console passwd",
                         wait=lambda holder: waiting(f"{lock} ({holder})")):
        yield
