"""CURVE on the channel-facing sockets, with a ZAP authenticator.

Only the public keys in the clients folder get in. Each key's *file name*
is its identity: ``web.key`` is the channel whose ``source_system`` is
``web``; ``operator`` or ``operator-<name>`` is an operator
(``is_operator_name``); a domain system's
key is named after the system (``warehouse.key``), or ``domains`` for a
process that speaks for several. The authenticator reports
that name as the connection's ``User-Id``, which the intake, the publisher
and the domain-events endpoint read from every message. ``reload()`` (on
SIGHUP) reads the folder again without a restart.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.base import Authenticator
from zmq.auth.thread import AuthenticationThread, ThreadAuthenticator
from zmq.utils import z85

from actors import supervision
from storage import files

logger = logging.getLogger(__name__)

DOMAINS = "domains"
"""The key name of one process that speaks for every configured domain system."""

OPERATOR = "operator"


def is_operator_name(name: object) -> bool:
    """Whether a CURVE key name is an operator's: exactly ``operator``, or
    ``operator-`` followed by at least one character (``operator-ann``,
    ``operator-console``). Any other name is a channel or a domain system:
    ``operatorbank`` or ``operators-portal`` is the channel of that
    ``source_system``, never an operator."""
    return isinstance(name, str) and (
        name == OPERATOR or (name.startswith(OPERATOR + "-") and len(name) > len(OPERATOR) + 1))


class SecurityError(RuntimeError):
    """Security is asked for but cannot be set up safely."""


def _key_file(path: Path, what: str) -> None:
    """Refuse a key path that is missing or not a regular file: a FIFO would
    block the start (and SIGTERM) until something writes to it."""
    try:
        files.check_regular(path)
    except FileNotFoundError:
        raise SecurityError(f"{path}: no such {what}") from None
    except OSError as exc:
        raise SecurityError(f"{path}: not a {what}: {exc}") from None


def _certificate(path: Path) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:  # unreadable, empty, not a key: say which
        raise SecurityError(f"{path}: not a key: {exc}") from None


def read_keypair(secret_file: str | Path) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file that only its owner may read."""
    path = Path(secret_file)
    _key_file(path, "secret key file")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise SecurityError(f"{path} is readable by others (mode {mode:o}); chmod 600 it")
    public, secret = _certificate(path)
    if not secret:
        raise SecurityError(f"{path} holds no secret key")
    return public, secret


def read_public(file: str | Path) -> bytes:
    path = Path(file)
    _key_file(path, "public key file")
    return _certificate(path)[0]


def load_clients(folder: str | Path) -> dict[bytes, str]:
    """Public key (Z85) -> name, for every ``*.key`` in the folder; one
    public key under two names is refused (``SecurityError``)."""
    path = Path(folder)
    if not path.is_dir():
        raise SecurityError(f"{path}: not a folder of client keys")
    keys: dict[bytes, str] = {}
    for file in sorted(f for f in path.glob("*.key") if not f.name.startswith(".")):
        try:  # a FIFO would block the reload (and SIGTERM) forever
            files.check_regular(file)
            public, _ = zmq.auth.load_certificate(str(file))
        except (OSError, ValueError) as exc:  # a FIFO, empty, half copied, not a key: say which
            raise SecurityError(f"{file}: not a client key: {exc}") from None
        if public in keys:  # which name would it be? The sort order must not decide
            raise SecurityError(f"{file} and {keys[public]}.key hold the same public key: "
                                "one key is one identity")
        keys[public] = file.stem
    if not keys:
        raise SecurityError(f"{path} holds no client keys (*.key): nobody could connect")
    return keys


class SupervisedAuthThread(AuthenticationThread):
    """pyzmq's ZAP thread, under the failure rule: if it ends while the
    service runs, the process exits 70 (``actors.supervision``). A dead ZAP
    thread would leave every new CURVE handshake waiting forever."""

    def run(self) -> None:
        supervision.guarded("authenticator", super().run)()


class NamedAuthenticator(ThreadAuthenticator):
    """Reports a client's key file name as its User-Id; its thread is supervised."""

    names: dict[bytes, str]

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.names.get(z85.encode(client_public_key), "unknown")

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        """One ZAP request; an error in it is survived and answered 500 (the
        client's handshake fails, never hangs), the thread goes on."""
        try:
            await super().handle_zap_message(msg)
        except Exception:  # noqa: BLE001 - the failure rule: the handshake fails, the thread goes on
            supervision.survived(supervision.current(), "authenticator")
            if len(msg) >= 2:
                self._send_zap_reply(msg[1], b"500", b"internal error")

    def start(self) -> None:
        """``ThreadAuthenticator.start`` with the supervised thread."""
        Authenticator.start(self)
        self.pipe = self.context.socket(zmq.PAIR, socket_class=zmq.Socket)
        self.pipe.linger = 1
        self.pipe.bind(self.pipe_endpoint)
        thread_pipe = self.context.socket(zmq.PAIR, socket_class=zmq.Socket)
        thread_pipe.linger = 1
        thread_pipe.connect(self.pipe_endpoint)
        self.thread = SupervisedAuthThread(authenticator=self, pipe=thread_pipe)
        self.thread.start()
        if not self.thread.started.wait(timeout=10):
            raise RuntimeError("Authenticator thread failed to start")

    def stop(self) -> None:
        """``ThreadAuthenticator.stop``, which waits forever to tell a thread
        that already ended (nobody reads its pipe) to end."""
        if self.pipe and not self.is_alive():
            self.pipe.close(linger=0)
            self.pipe, self.thread = None, None  # type: ignore[assignment]
        super().stop()


class ChannelSecurity:
    """The server keypair, the allowed clients, and the running authenticator."""

    def __init__(self, ctx: zmq.Context, server_key: str, clients: str) -> None:
        self.public, self.secret = read_keypair(server_key)
        self.clients_dir = clients
        names = load_clients(clients)
        self.auth = NamedAuthenticator(ctx)
        self.auth.names = names
        try:
            self.auth.start()
            self.allow(names)
        except Exception as exc:
            raise SecurityError(f"the ZAP authenticator cannot run: {exc}") from exc
        if not self.auth.is_alive():
            raise SecurityError("the ZAP authenticator is not running")
        logger.info("CURVE on: %d client keys allowed", len(names))

    def server_options(self) -> dict[str, Any]:
        """Socket options for a CURVE server socket."""
        return {"CURVE_SERVER": 1, "CURVE_SECRETKEY": self.secret,
                "CURVE_PUBLICKEY": self.public}

    def reload(self) -> int:
        """Read the clients folder again (SIGHUP); returns how many keys."""
        names = load_clients(self.clients_dir)
        self.allow(names)
        logger.info("client keys reloaded: %d allowed", len(names))
        return len(names)

    def allow(self, names: dict[bytes, str]) -> None:
        """The keys just read and checked are the ones in force: not pyzmq's
        ``configure_curve``, which reads the folder a second time (hidden
        files skipped, a failure only logged, the folder maybe changed)."""
        self.auth.names = names
        self.auth.allow_any = False
        self.auth.certs["*"] = dict.fromkeys(names, True)  # one assignment: atomic for ZAP

    def alive(self) -> bool:
        """The ZAP thread runs (readiness: see ``Service.dead_components``)."""
        return self.auth.is_alive()

    def stop(self) -> None:
        self.auth.stop()


def client_options(own_secret_file: str, server_public_file: str) -> dict[str, Any]:
    """Socket options for a CURVE client with its own keypair."""
    public, secret = read_keypair(own_secret_file)
    return {"CURVE_SERVERKEY": read_public(server_public_file), "CURVE_PUBLICKEY": public,
            "CURVE_SECRETKEY": secret}


def generate(folder: str | Path, names: list[str]) -> list[Path]:
    """Write NAME.key (public) and NAME.key_secret (mode 0600) for each name."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        public, secret = zmq.auth.create_certificates(str(out), name)
        os.chmod(secret, 0o600)
        written += [Path(public), Path(secret)]
    return written
