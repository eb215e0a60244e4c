"""Server CPU time per request over each transport and API, one server, interleaved rounds.

    python -m bench.transport_cpu --model-repository REPO [--requests 2000] [--threads 8] [--rounds 3]

Paths measured, each batch-1 (one 28x28 image): gRPC typed Classify (raw pixels), gRPC KServe ModelInfer (raw
contents), HTTP KServe infer with the binary tensor extension, HTTP KServe infer as JSON, HTTP typed classify as
JSON (base64 pixels), HTTP typed classify with a raw PNG body. Per round each path sends --requests requests from
--threads client threads (keep-alive connections / one channel), the order rotating between rounds; the figure is
the server process's utime+stime over the run divided by the requests (the client's CPU never enters it).
Prints medians over rounds and each path's ratio to gRPC typed.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import statistics
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from bench.server_process import ServerProcess
from serving._proto.lsoftmax.v1 import digit_service_pb2 as pb
from serving._proto.lsoftmax.v1 import digit_service_pb2_grpc as pb_grpc

MODEL = "lsoftmax_mnist_onnx"
TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def _digit() -> np.ndarray:
    image = np.zeros((28, 28), np.uint8)
    image[6:22, 12:16] = 255
    return image


def _grpc_typed(address: str):
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.DigitServiceStub(channel)
    request = pb.ClassifyRequest(images=[pb.Image(pixels=_digit().tobytes())])
    return lambda: stub.Classify(request, timeout=30)


def _grpc_kserve(address: str):
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    channel = grpc.insecure_channel(address)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    request = service_pb2.ModelInferRequest(model_name=MODEL, raw_input_contents=[_digit().tobytes()],
                                            inputs=[service_pb2.ModelInferRequest.InferInputTensor(
                                                name="image", datatype="UINT8", shape=[1, 1, 28, 28])])
    return lambda: stub.ModelInfer(request, timeout=30)


class _Http:
    """One keep-alive connection per client thread."""

    def __init__(self, port: int, path: str, body: bytes, headers: dict) -> None:
        self.port, self.path, self.body, self.headers = port, path, body, headers
        self.local = threading.local()

    def __call__(self) -> None:
        connection = getattr(self.local, "connection", None)
        if connection is None:
            connection = self.local.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        connection.request("POST", self.path, body=self.body, headers=self.headers)
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"{self.path}: HTTP {response.status}")


def _paths(grpc_address: str, http_port: int) -> dict:
    pixels = _digit().tobytes()
    header = json.dumps({"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "UINT8",
                                     "parameters": {"binary_data_size": 784}}],
                         "parameters": {"binary_data_output": True}}).encode()
    png = io.BytesIO()
    Image.fromarray(_digit()).save(png, "PNG")
    infer = f"/v2/models/{MODEL}/infer"
    return {
        "grpc typed (raw pixels)": _grpc_typed(grpc_address),
        "grpc kserve (raw contents)": _grpc_kserve(grpc_address),
        "http kserve (binary)": _Http(http_port, infer, header + pixels, {"Inference-Header-Content-Length":
                                                                          str(len(header))}),
        "http kserve (json)": _Http(http_port, infer, json.dumps(
            {"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "UINT8",
                         "data": list(pixels)}]}).encode(), {"Content-Type": "application/json"}),
        "http typed (json)": _Http(http_port, "/v1/classify", json.dumps(
            {"images": [{"pixels": base64.b64encode(pixels).decode()}]}).encode(),
            {"Content-Type": "application/json"}),
        "http typed (png body)": _Http(http_port, "/v1/classify", png.getvalue(), {"Content-Type": "image/png"}),
    }


def _run(call, requests: int, threads: int) -> None:
    per_thread = requests // threads
    errors: list[BaseException] = []

    def work():
        try:
            for _ in range(per_thread):
                call()
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.transport_cpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-repository", required=True)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    results: dict[str, list[float]] = {}
    with ServerProcess(Path(args.model_repository).resolve(), "--backend", "onnx", "--device", "cpu",
                       log_level="info").start() as server:
        paths = _paths(server.address, server.wait_for("listening")["http_port"])
        names = list(paths)
        for name in names:  # warm every path (connections, first-call costs)
            _run(paths[name], 200, args.threads)
        for round_index in range(args.rounds):
            order = names[round_index % len(names):] + names[:round_index % len(names)]
            for name in order:
                before = _cpu_seconds(server.proc.pid)
                _run(paths[name], args.requests, args.threads)
                used = _cpu_seconds(server.proc.pid) - before
                results.setdefault(name, []).append(used / (args.requests // args.threads * args.threads) * 1e6)
                print(json.dumps({"round": round_index, "path": name, "server_cpu_us": round(results[name][-1], 1)}),
                      file=sys.stderr, flush=True)
    base = statistics.median(results[names[0]])
    print(f"server CPU per batch-1 request, median of {args.rounds} rounds × {args.requests} requests, "
          f"{args.threads} client threads")
    print("| path | server CPU per request | vs gRPC typed |\n|---|---|---|")
    for name in names:
        value = statistics.median(results[name])
        print(f"| {name} | {value:.0f} µs | {value / base:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
