"""`python -m serving.probe`: the container health probe under its old name; the code is serving/client/probe.py."""

from serving.client.probe import run_cli

if __name__ == "__main__":
    run_cli()
