"""CPU per KServe ModelInfer call in the server's own code, without gRPC: a low-noise check for hot-path changes.

    python -m bench.handler_cpu --model-repository /tmp/tiny [--calls 5000] [--batch 1] [--model NAME]

Builds the server's parts in this process as `python -m serving` does (its flags, serving.startup.make_plan, the
servicers, the model loaded and warmed), then awaits KServeServicer.ModelInfer on one event loop, one call at a
time, each on a freshly parsed request and in its own turn of the loop, and serialises each answer as gRPC would:
CPU time per call (all threads: a batch may run in the model's thread). One call at a time makes each batch a lone
client's, as at concurrency 1.
End-to-end figures through gRPC move by ±10-20% between identical runs on a shared machine; this one by a few
percent, so a change of the handler, the core or the batcher shows here first. Another tree's serving/ (an older
commit's, from git archive) is measured from that tree's directory: `cd TREE && PYTHONPATH=TREE:PROJECT python -m
bench.handler_cpu ...`. It measures no transport, so it says nothing about what gRPC or the client cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import numpy as np

from serving.connection_limits import ConnectionLimits
from serving import server
from serving._proto.inference import grpc_service_pb2 as pb
from serving.grpc.kserve import KServeServicer
from serving.options import get_args_parser
from serving.repository.format import IMAGE_DIMS, INPUT, INPUT_DATATYPE
from serving.startup import load_model, make_plan


class _Context:
    """The two things the servicer may ask of a gRPC context on the success path."""

    def add_done_callback(self, callback) -> None:
        pass

    def peer(self) -> str:
        return "in-process"


async def measure(repository: str, model: str | None, calls: int, batch: int) -> dict:
    args = get_args_parser().parse_args(["--model-repository", repository, "--backend", "onnx", "--device", "cpu",
                                         "--http-port", "-1", "--metrics-port", "-1"])
    plan = make_plan(args)
    app = server._build(args, plan, ConnectionLimits.from_args(args, announce=False))
    entry = next((e for e in plan.served if e.name == model), plan.served[0]) if model else plan.served[0]
    runner, _ = await asyncio.get_running_loop().run_in_executor(
        None, load_model, entry, plan.manifest, "cpu", 8, plan.batching[entry.name], app.stats[entry.name],
        args.intra_op_threads)
    app.runners[entry.name] = runner
    servicer = KServeServicer(app.core, plan.configs)
    images = np.random.default_rng(0).integers(0, 256, (batch, *IMAGE_DIMS), dtype=np.uint8)
    request = pb.ModelInferRequest(model_name=entry.name, raw_input_contents=[images.tobytes()])
    request.inputs.add(name=INPUT, datatype=INPUT_DATATYPE, shape=[batch, *IMAGE_DIMS])
    data = request.SerializeToString()
    context = _Context()
    try:
        for _ in range(min(200, calls)):
            (await servicer.ModelInfer(pb.ModelInferRequest.FromString(data), context)).SerializeToString()
            await asyncio.sleep(0)
        start = time.process_time()
        for _ in range(calls):
            (await servicer.ModelInfer(pb.ModelInferRequest.FromString(data), context)).SerializeToString()
            await asyncio.sleep(0)  # the next call in a later turn of the loop, as a lone client's would be
        seconds = time.process_time() - start
    finally:
        runner.close()
        app.decoder.close()
    return {"model": entry.name, "batch": batch, "calls": calls, "cpu_us_per_call": round(seconds / calls * 1e6, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.handler_cpu", description=__doc__.splitlines()[0])
    p.add_argument("--model-repository", required=True)
    p.add_argument("--model", help="repository name of the model (default: the first the server would load)")
    p.add_argument("--calls", type=int, default=5000)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args(argv)
    if args.calls < 1 or args.batch < 1:
        p.error("--calls and --batch must be >= 1")
    print(json.dumps(asyncio.run(measure(args.model_repository, args.model, args.calls, args.batch))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
