"""Optional CURVE security: key files, authorised-client directories, and the ZAP authenticator.

With CURVE on, traffic is encrypted and only clients whose public key sits in the authorised directory
complete the handshake; others never get a reply (ZeroMQ drops them during the security handshake).
Key files are ZeroMQ's standard certificate format (zmq.auth), so other ZeroMQ bindings can read them.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from policy_runtime.errors import UserError

AUTHORIZED_DIR = "authorized_clients"


@dataclass(frozen=True)
class CurveServerKeys:
    secret_file: Path  # the server's *.key_secret
    clients_dir: Path  # directory of authorised clients' public *.key files


@dataclass(frozen=True)
class CurveClientKeys:
    secret_file: Path         # this client's *.key_secret
    server_public_file: Path  # the server's public *.key


def load_keypair(path: Path, need_secret: bool) -> tuple[bytes, bytes | None]:
    """(public, secret) from a zmq certificate file; a bad file is a one-line UserError."""
    if not zmq.has("curve"):
        raise UserError("this libzmq build has no CURVE support")
    if not Path(path).is_file():
        raise UserError(f"key file {path} does not exist")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (ValueError, OSError, IndexError, UnicodeDecodeError) as e:
        raise UserError(f"key file {path} is not a ZeroMQ certificate ({e})") from None
    if not public or len(public) != 40:
        raise UserError(f"key file {path} has no valid public key")
    if need_secret and (not secret or len(secret) != 40):
        raise UserError(f"key file {path} has no secret key (pass the *.key_secret file)")
    for which, key in (("public", public), ("secret", secret if need_secret else None)):
        if key is not None and not _is_z85(key):
            raise UserError(f"key file {path}: the {which} key has characters outside ZeroMQ's Z85 alphabet")
    return public, secret


def _is_z85(key: bytes) -> bool:
    """libzmq rejects a non-Z85 key only when it is set on a socket, after the authenticator thread started."""
    try:
        z85.decode(key)
    except (KeyError, ValueError, TypeError):
        return False
    return True


def check_clients_dir(path: Path) -> int:
    """Validate every *.key in the authorised directory; return how many there are."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"authorised clients directory {path} does not exist")
    keys = sorted(path.glob("*.key"))
    for k in keys:
        load_keypair(k, need_secret=False)
    if not keys:
        raise UserError(f"authorised clients directory {path} holds no *.key files: nobody could connect")
    return len(keys)


def secure_server(ctx: zmq.Context, sock: zmq.Socket, keys: CurveServerKeys) -> ThreadAuthenticator:
    """Make `sock` a CURVE server that only accepts the authorised keys; call before bind()."""
    public, secret = load_keypair(keys.secret_file, need_secret=True)
    check_clients_dir(keys.clients_dir)
    try:  # set the keys before the authenticator thread exists, so a refused key cannot leave it running
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True
    except zmq.ZMQError as e:
        raise UserError(f"key file {keys.secret_file}: libzmq refuses the key ({e})") from None
    auth = ThreadAuthenticator(ctx)
    auth.start()
    try:
        auth.configure_curve(domain="*", location=str(keys.clients_dir))
    except BaseException:
        auth.stop()
        raise
    return auth


def secure_client(sock: zmq.Socket, keys: CurveClientKeys) -> None:
    """Configure a client socket for CURVE; call before connect()."""
    public, secret = load_keypair(keys.secret_file, need_secret=True)
    server_public, _ = load_keypair(keys.server_public_file, need_secret=False)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = server_public


def generate_keys(out: Path, clients: list[str], force: bool = False) -> list[Path]:
    """out/server.key(+_secret), out/<client>.key(+_secret), out/authorized_clients/<client>.key."""
    if not zmq.has("curve"):
        raise UserError("this libzmq build has no CURVE support")
    out = Path(out)
    names = ["server", *clients]
    if len(set(names)) != len(names) or any(not n or Path(n).name != n for n in names):
        raise UserError(f"client names must be distinct plain names other than 'server', got {clients}")
    existing = [out / f"{n}.key_secret" for n in names if (out / f"{n}.key_secret").exists()]
    if existing and not force:
        raise UserError(f"{existing[0]} already exists; pass --force to overwrite keys")
    try:
        (out / AUTHORIZED_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out}: {e.strerror}") from None
    written = []
    for n in names:
        for suffix in (".key", ".key_secret"):
            (out / f"{n}{suffix}").unlink(missing_ok=True)
        public, secret = zmq.auth.create_certificates(str(out), n)
        os.chmod(secret, 0o600)
        written += [Path(public), Path(secret)]
        if n != "server":
            shutil.copy(public, out / AUTHORIZED_DIR / f"{n}.key")
            written.append(out / AUTHORIZED_DIR / f"{n}.key")
    return written
