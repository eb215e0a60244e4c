"""`python -m serving --model-repository REPO ...`: run the gRPC server (see serving/server.py for the flags)."""

import sys

from serving.server import get_args_parser, main

sys.exit(main(get_args_parser().parse_args()))
