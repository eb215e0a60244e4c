"""Client side of transport security and bearer tokens, for the library, the CLI and the probe.

    client_channel(address, tls_ca=..., tls_cert=..., tls_key=...) → a TLS channel (tls_ca: the CA that signed
    the server's certificate; tls=True alone: the system roots; cert/key for mutual TLS), else plaintext;
    the token travels as call metadata (bearer_metadata). add_client_args / client_kwargs give command lines
    --tls, --tls-ca, --tls-cert, --tls-key, --tls-server-name, --token, --token-file (env LSOFTMAX_AUTH_TOKEN),
    check_client_args rejects contradictory ones as usage errors (exit 2).

The server side (TLS files, checking tokens) is serving.security; the token's environment variable, TOKEN_ENV,
is defined there and read by both.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import grpc

from serving.security import TOKEN_ENV

__all__ = ["TOKEN_ENV", "channel_credentials", "client_channel", "bearer_metadata", "add_client_args",
           "check_client_args", "client_kwargs"]


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries `token` (empty without one)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def channel_credentials(ca: str | None = None, cert: str | None = None, key: str | None = None) -> grpc.ChannelCredentials:
    """TLS credentials for a client channel: ca verifies the server (None: system roots); cert+key for mTLS."""
    if bool(cert) != bool(key):
        raise ValueError("a client certificate needs its key (--tls-cert and --tls-key go together)")

    def read(path, what):
        try:
            return Path(path).read_bytes() if path else None
        except OSError as exc:
            raise ValueError(f"cannot read the {what} {path} ({exc.strerror or exc})") from None

    return grpc.ssl_channel_credentials(read(ca, "CA certificate"), read(key, "client key"),
                                        read(cert, "client certificate"))


def client_channel(address: str, *, tls: bool = False, tls_ca: str | None = None, tls_cert: str | None = None,
                   tls_key: str | None = None, tls_server_name: str | None = None, options=()) -> grpc.Channel:
    """A plaintext channel, or a TLS one when tls is set or any tls_* file is given. Calls are spread over every
    address the target resolves to (round_robin: `dns:///name:port` of a headless Service, or
    `ipv4:10.0.0.1:50051,10.0.0.2:50051`); gRPC's default, pick_first, would send them all to one replica."""
    options = [("grpc.lb_policy_name", "round_robin"), *options]
    if tls_server_name:
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    if tls or tls_ca or tls_cert or tls_key:
        return grpc.secure_channel(address, channel_credentials(tls_ca, tls_cert, tls_key), options=options)
    return grpc.insecure_channel(address, options=options)


def add_client_args(p: argparse.ArgumentParser, token: bool = True) -> None:
    """TLS (and token) options of the client CLI and the probe."""
    p.add_argument("--tls", action="store_true", help="use TLS, verifying the server against the system's CAs")
    p.add_argument("--tls-ca", default=None, help="PEM CA that signed the server's certificate (implies --tls)")
    p.add_argument("--tls-cert", default=None, help="PEM client certificate, for servers that require one (mTLS)")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--tls-server-name", default=None,
                   help="name to check the server's certificate against (default: the host dialled)")
    if token:
        group = p.add_mutually_exclusive_group()
        group.add_argument("--token", default=None,
                           help=f"bearer token for servers started with one (default: env {TOKEN_ENV})")
        group.add_argument("--token-file", default=None, help="file holding the bearer token")


def check_client_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Usage errors argparse cannot see on its own (exit 2 through parser.error); returns args."""
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    return args


def client_kwargs(args: argparse.Namespace, environ=os.environ) -> dict:
    """client_channel(...) keyword arguments, plus `token`, from add_client_args' options; ValueError on an
    unreadable token file."""
    kwargs = dict(tls=args.tls, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                  tls_server_name=args.tls_server_name)
    if hasattr(args, "token"):
        token = args.token
        if args.token_file:
            try:
                token = Path(args.token_file).read_text().strip()
            except OSError as exc:
                raise ValueError(f"cannot read the token file {args.token_file} ({exc.strerror or exc})") from None
        elif token is None:
            token = environ.get(TOKEN_ENV) or None
        kwargs["token"] = token
    return kwargs
