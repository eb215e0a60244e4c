"""Server side of transport security and bearer-token authentication.

Server (python -m serving):
    --tls-cert server.pem --tls-key server.key         TLS; plaintext clients cannot connect
    --tls-client-ca ca.pem                             mutual TLS: clients must present a certificate it signed
    --auth-token-file token.txt (or --auth-token T, or env LSOFTMAX_AUTH_TOKEN)
        every call must carry `authorization: Bearer <token>` metadata, else UNAUTHENTICATED; the token is
        compared in constant time (hmac.compare_digest). grpc.health.v1.Health stays open, so load balancers
        and `python -m serving.probe` need no token.
The client side (channels, call metadata, the client's and the probe's flags) is serving.client.security;
TOKEN_ENV, the environment variable both sides read the token from, is defined here.

A token sent without TLS crosses the network in clear text: the server logs a warning when it is bound to a
non-loopback address without TLS.
"""

from __future__ import annotations

import hmac
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from serving.core.errors import StartupError, UsageError

__all__ = ["TokenAuth", "TlsConfig", "PUBLIC_METHOD_PREFIXES", "TOKEN_ENV", "read_token"]

TOKEN_ENV = "LSOFTMAX_AUTH_TOKEN"
# Open without a token: health checks (probes, load balancers) must work before anyone has credentials.
PUBLIC_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


def _read(path: str | os.PathLike, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise StartupError(f"cannot read the {what} {path} ({exc.strerror or exc})") from None
    return data


def _pem(path: str | os.PathLike, what: str) -> bytes:
    data = _read(path, what)
    if b"-----BEGIN " not in data:
        raise StartupError(f"{path}: the {what} is not PEM (no '-----BEGIN' line)")
    return data


@dataclass(frozen=True)
class TlsConfig:
    """The server's TLS files (PEM). client_ca set → clients must present a certificate signed by it."""
    cert: str
    key: str
    client_ca: str | None = None

    @classmethod
    def from_args(cls, cert: str | None, key: str | None, client_ca: str | None) -> "TlsConfig | None":
        if not cert and not key:
            if client_ca:
                raise UsageError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
            return None
        if not (cert and key):
            raise UsageError("--tls-cert and --tls-key go together")
        return cls(cert, key, client_ca)

    def ssl_context(self) -> ssl.SSLContext:
        """The same files as an ssl context (HTTP transport, metrics endpoint); client certificates required under
        mutual TLS. Call server_credentials() first for its clear errors."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        if self.client_ca:
            context.load_verify_locations(cafile=self.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def server_credentials(self) -> grpc.ServerCredentials:
        """Read and check the files (a certificate chain and its own private key, a CA) → gRPC credentials."""
        chain, key = _pem(self.cert, "TLS certificate"), _pem(self.key, "TLS private key")
        root = _pem(self.client_ca, "client CA certificate") if self.client_ca else None
        check = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # gRPC would only say "cannot bind"; ssl says why
        try:
            check.load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, ValueError) as exc:
            raise StartupError(f"--tls-cert {self.cert} / --tls-key {self.key}: not a certificate chain and its "
                               f"private key ({exc})") from None
        if self.client_ca:
            try:
                check.load_verify_locations(self.client_ca)
            except (ssl.SSLError, ValueError) as exc:
                raise StartupError(f"--tls-client-ca {self.client_ca}: not a CA certificate ({exc})") from None
        return grpc.ssl_server_credentials([(key, chain)], root_certificates=root, require_client_auth=root is not None)


def read_token(token: str | None, token_file: str | None, environ=os.environ) -> str | None:
    """--auth-token / --auth-token-file / $LSOFTMAX_AUTH_TOKEN (first one set) → the token, or None (no auth)."""
    if token and token_file:
        raise UsageError("give --auth-token or --auth-token-file, not both")
    if token_file:
        token = _read(token_file, "token file").decode("utf-8", "replace").strip()
        if not token:
            raise StartupError(f"{token_file}: the token file is empty")
    elif token is None:
        token = environ.get(TOKEN_ENV) or None
    if token is not None and (not token.strip() or any(c.isspace() for c in token.strip())):
        raise StartupError("the auth token must be non-empty and contain no whitespace")
    return token.strip() if token else None


class TokenAuth:
    """Checks `authorization: Bearer <token>` call metadata in constant time."""

    def __init__(self, token: str) -> None:
        self._token = token.encode("utf-8")

    @staticmethod
    def public(method: str) -> bool:
        return method.startswith(PUBLIC_METHOD_PREFIXES)

    def check_header(self, authorization: str | None) -> bool:
        """An HTTP `Authorization` header (None when absent): `Bearer <token>`, compared in constant time."""
        return authorization is not None and self.check([("authorization", authorization)])

    def check(self, metadata) -> bool:
        """metadata: the call's invocation metadata, a sequence of (key, value) pairs (keys lowercase)."""
        for key, value in metadata or ():
            if key == "authorization":
                if isinstance(value, bytes):
                    value = value.decode("latin-1")
                scheme, _, credential = value.strip().partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(credential.strip().encode("utf-8"),
                                                                          self._token)
        return False
