"""`python -m serving --model-repository REPO ...`: run the gRPC server (see serving/server.py for the flags)."""

from serving.server import run_cli

run_cli()
