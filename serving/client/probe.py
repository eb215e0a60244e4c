"""Health probe for containers: exit 0 when the server's grpc.health.v1 says SERVING, else 1 (2: bad flags).

    python -m serving.client.probe [--address 127.0.0.1:50051] [--service ""] [--timeout 3]
    python -m serving.client.probe --tls-ca ca.pem [--tls-cert c.pem --tls-key c.key] [--tls-server-name NAME]

`python -m serving.probe` runs the same (a shim kept for existing health checks and scripts).

For Docker HEALTHCHECK and exec-style probes (Kubernetes can also use its built-in `grpc:` probe).
Health checks need no auth token; against a TLS server give the CA (and a client certificate when the server
requires one). Prints the status (or the error) on one line. Imports only grpc (not numpy, nor the client
library): cheap to run every few seconds.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.client.security import add_client_args, check_client_args, client_channel, client_kwargs

__all__ = ["get_args_parser", "main", "parse_args", "run_cli"]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.client.probe", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--address", default="127.0.0.1:50051", help="HOST:PORT of the server")
    p.add_argument("--service", default="", help='health service name ("" = the whole server)')
    p.add_argument("--timeout", type=float, default=3.0, help="seconds before giving up")
    add_client_args(p, token=False)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line → arguments; usage errors exit 2 (argparse's convention)."""
    parser = get_args_parser()
    return check_client_args(parser, parser.parse_args(argv))


def main(args: argparse.Namespace) -> int:
    try:
        channel = client_channel(args.address, **client_kwargs(args))
    except ValueError as exc:
        print(f"{args.address}: {exc}")
        return 1
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as err:
            print(f"{args.address}: {err.code().name}: {err.details()}")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def run_cli(argv: list[str] | None = None) -> None:
    """`python -m serving.client.probe` (and `python -m serving.probe`): exit 0 SERVING, 1 not, 2 usage."""
    sys.exit(main(parse_args(argv)))


if __name__ == "__main__":
    run_cli()
