"""`python -m serving.client {classify,embed,evaluate,info} ...`: the client's command line (serving/client/cli.py)."""

from serving.client.cli import run_cli

if __name__ == "__main__":
    run_cli()
