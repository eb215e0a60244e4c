"""Closed-loop load generator for the server (KServe ModelInfer or typed Classify), and a tiny model repository.

    python bench/loadgen.py run --address 127.0.0.1:50051 --api kserve --concurrency 64 --processes 2 \
        --duration 5 [--batch 1] [--check] [--client aio|tritonclient] [--token T] [--tls-ca CA.pem]
    python bench/loadgen.py run ... --requests 20000            # a fixed number instead of a time window
    python bench/loadgen.py tiny-repo OUT                       # a linear-model repository (see below)

`run`: N clients, each with one request in flight (perf_analyzer's concurrency mode), spread over P processes
(one Python process cannot saturate the server). With --duration the first --warmup seconds are not counted
and a request counts in the window it completes in. With --check every client first asks for each of its
images alone, then compares every answer under load with that (labels equal, values within 1e-4: a batch
may sum in another order). Prints one JSON object: requests, images, errors by status code, wrong answers,
seconds, requests/s, images/s and latency percentiles in ms. (--tolerance widens the check, e.g. for GPUs.)
--client aio (default) sends pre-serialised requests from grpc.aio coroutines, the cheapest Python client,
so the server gets most of the CPU; --client tritonclient uses tritonclient's InferenceServerClient.infer
in threads, as a typical user would (KServe only).

`tiny-repo`: bench.tiny_repo's model repository (one matmul with the exported graphs' interface), whose
serving measures per-request overhead.

Runs as a script (its own process: tritonclient's `inference.*` messages must not meet the server's).
`python -m bench.serve` drives it for the perf_analyzer-style sweep; the serving tests use it for load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

KSERVE_INFER = "/inference.GRPCInferenceService/ModelInfer"
TYPED_CLASSIFY = "/lsoftmax.v1.DigitService/Classify"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:  # run as a script: bench/ is on sys.path, the project root is not
    sys.path.insert(0, str(PROJECT_ROOT))

from bench.tiny_repo import tiny_repo  # noqa: E402
from serving.repository.format import (BY_KIND, IMAGE_DIMS, INPUT, INPUT_DATATYPE,  # noqa: E402
                                       OUTPUT_LOGITS)


# ------------------------------------------------------------------------------------------------ requests


def _images(seed: int, count: int, batch: int) -> list[np.ndarray]:
    """`count` distinct uint8 [batch, 1, 28, 28] inputs: a bright square on noise, like tests/support.py."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        x = rng.integers(0, 40, (batch, *IMAGE_DIMS)).astype(np.uint8)
        for i in range(batch):
            r, c = divmod(int(rng.integers(0, 10)), 4)
            x[i, 0, 2 + 7 * r:8 + 7 * r, 2 + 7 * c:8 + 7 * c] = 255
        out.append(x)
    return out


class KServe:
    method = KSERVE_INFER

    def __init__(self, model: str) -> None:
        from tritonclient.grpc import service_pb2

        self.pb = service_pb2
        self.model = model

    def request(self, images: np.ndarray) -> bytes:
        request = self.pb.ModelInferRequest(model_name=self.model)
        request.inputs.add(name=INPUT, datatype=INPUT_DATATYPE, shape=list(images.shape))
        request.raw_input_contents.append(images.tobytes())
        return request.SerializeToString()

    def answer(self, data: bytes) -> np.ndarray:
        response = self.pb.ModelInferResponse.FromString(data)
        index = [o.name for o in response.outputs].index(OUTPUT_LOGITS)
        shape = tuple(response.outputs[index].shape)
        return np.frombuffer(response.raw_output_contents[index], "<f4").reshape(shape)


class Typed:
    method = TYPED_CLASSIFY

    def __init__(self, model: str) -> None:
        from serving._proto.lsoftmax.v1 import digit_service_pb2

        self.pb = digit_service_pb2

    def request(self, images: np.ndarray) -> bytes:
        pixels = [self.pb.Image(pixels=x.tobytes()) for x in images]
        return self.pb.ClassifyRequest(images=pixels, return_logits=True).SerializeToString()

    def answer(self, data: bytes) -> np.ndarray:
        response = self.pb.ClassifyResponse.FromString(data)
        return np.array([r.logits for r in response.results], np.float32)


TOLERANCE = 1e-4  # --tolerance


def _same(got: np.ndarray, want: np.ndarray) -> bool:
    """Values within TOLERANCE, and the same label wherever the answer alone is not a near-tie."""
    if got.shape != want.shape or not np.allclose(got, want, atol=TOLERANCE, rtol=TOLERANCE):
        return False
    top2 = np.sort(want, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 10 * TOLERANCE
    return bool((got.argmax(1) == want.argmax(1))[clear].all())


def _metadata(args) -> tuple | None:
    return (("authorization", f"Bearer {args.token}"),) if args.token else None


def _credentials(args):
    import grpc

    if not args.tls_ca:
        return None
    read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
    return grpc.ssl_channel_credentials(read(args.tls_ca), read(args.tls_key), read(args.tls_cert))


def _channel_options(args) -> list:
    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    if args.tls_server_name:
        options.append(("grpc.ssl_target_name_override", args.tls_server_name))
    return options


# ---------------------------------------------------------------------------------------------- one process


class Tally:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}
        self.error_details: dict[str, str] = {}
        self.wrong = 0
        self.requests = 0
        self.seconds = 0.0

    def error(self, code: str, details: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1
        self.error_details.setdefault(code, details)


async def _aio_worker(args, api, call, inputs, expected, quota, window, tally: Tally) -> None:
    import grpc

    rng = np.random.default_rng(hash((os.getpid(), id(quota))) % 2**32)
    metadata = _metadata(args)
    loop = asyncio.get_running_loop()
    while True:
        if quota is not None:
            if quota[0] <= 0:
                return
            quota[0] -= 1
        elif loop.time() >= window[1]:
            return
        k = int(rng.integers(len(inputs)))
        start = time.perf_counter()
        try:
            data = await call(inputs[k], timeout=args.timeout, metadata=metadata)
        except grpc.aio.AioRpcError as err:
            if quota is not None or window[0] <= loop.time() < window[1]:
                tally.error(err.code().name, err.details() or "")
            if args.stop_on_unavailable and err.code() == grpc.StatusCode.UNAVAILABLE:
                return
            continue
        end = time.perf_counter()
        if quota is not None or window[0] <= loop.time() < window[1]:
            tally.requests += 1
            tally.latencies.append((end - start) * 1e3)
            if expected is not None and not _same(api.answer(data), expected[k]):
                tally.wrong += 1


async def _aio_process(args, api, raw_inputs, count: int) -> Tally:
    import grpc

    inputs = [api.request(x) for x in raw_inputs]
    credentials = _credentials(args)
    options = _channel_options(args)
    channel = (grpc.aio.secure_channel(args.address, credentials, options=options) if credentials
               else grpc.aio.insecure_channel(args.address, options=options))
    call = channel.unary_unary(api.method)  # bytes in, bytes out: no client-side (de)serialisation per call
    tally = Tally()
    async with channel:
        expected = None
        if args.check:
            expected = [api.answer(await call(x, timeout=args.timeout, metadata=_metadata(args))) for x in inputs]
        loop = asyncio.get_running_loop()
        if args.requests:
            quota, window = [count], None
        else:
            start = loop.time() + max(0.0, args.start_at - time.time())
            quota, window = None, (start + args.warmup, start + args.warmup + args.duration)
            await asyncio.sleep(max(0.0, args.start_at - time.time()))
        began = time.perf_counter()
        await asyncio.gather(*(_aio_worker(args, api, call, inputs, expected, quota, window, tally)
                               for _ in range(args.concurrency_here)))
        tally.seconds = time.perf_counter() - began if args.requests else args.duration
    return tally


def _tritonclient_process(args, raw_inputs, count: int) -> Tally:
    """tritonclient's synchronous client, one per thread, as a user of the library would load a server."""
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    tally = Tally()
    lock = threading.Lock()
    quota = [count]
    headers = {"authorization": f"Bearer {args.token}"} if args.token else None
    ssl = dict(ssl=True, root_certificates=args.tls_ca, private_key=args.tls_key,
               certificate_chain=args.tls_cert) if args.tls_ca else {}
    window = None if args.requests else (args.start_at + args.warmup, args.start_at + args.warmup + args.duration)

    def worker(seed: int) -> None:
        client = tc.InferenceServerClient(args.address, **ssl)
        rng = np.random.default_rng(seed)
        tensors = []
        for x in raw_inputs:
            tensor = tc.InferInput(INPUT, list(x.shape), INPUT_DATATYPE)
            tensor.set_data_from_numpy(x)
            tensors.append(tensor)
        expected = [client.infer(args.model, [t], headers=headers).as_numpy(OUTPUT_LOGITS) for t in tensors] \
            if args.check else None
        if window:
            time.sleep(max(0.0, args.start_at - time.time()))
        while True:
            with lock:
                if window is None:
                    if quota[0] <= 0:
                        break
                    quota[0] -= 1
            now = time.time()
            if window is not None and now >= window[1]:
                break
            k = int(rng.integers(len(tensors)))
            start = time.perf_counter()
            try:
                result = client.infer(args.model, [tensors[k]], headers=headers, client_timeout=args.timeout)
            except InferenceServerException as err:
                with lock:
                    if window is None or window[0] <= time.time() < window[1]:
                        tally.error(str(err.status()).replace("StatusCode.", ""), err.message() or "")
                continue
            end = time.perf_counter()
            if window is None or window[0] <= time.time() < window[1]:
                wrong = expected is not None and not _same(result.as_numpy(OUTPUT_LOGITS), expected[k])
                with lock:
                    tally.requests += 1
                    tally.latencies.append((end - start) * 1e3)
                    tally.wrong += wrong
        client.close()

    began = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(1000 * args.worker + i,)) for i in range(args.concurrency_here)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tally.seconds = time.perf_counter() - began if args.requests else args.duration
    return tally


def _worker_main(args) -> int:
    global TOLERANCE
    TOLERANCE = args.tolerance
    raw_inputs = _images(seed=100 + args.worker, count=args.distinct, batch=args.batch)
    count = args.requests_here
    if args.client == "tritonclient":
        tally = _tritonclient_process(args, raw_inputs, count)
    else:
        api = KServe(args.model) if args.api == "kserve" else Typed(args.model)
        tally = asyncio.run(_aio_process(args, api, raw_inputs, count))
    print(json.dumps({"requests": tally.requests, "errors": tally.errors, "error_details": tally.error_details,
                      "wrong": tally.wrong, "seconds": tally.seconds, "latencies": tally.latencies}))
    return 0


# --------------------------------------------------------------------------------------------------- parent


def run(args) -> dict:
    """Spawn the worker processes, wait for them, merge their tallies."""
    start_at = time.time() + args.startup
    procs = []
    for w in range(args.processes):
        here = args.concurrency // args.processes + (w < args.concurrency % args.processes)
        requests_here = (args.requests // args.processes + (w < args.requests % args.processes)) if args.requests else 0
        if here == 0:
            continue
        cmd = [sys.executable, __file__, "run", *sys.argv_rest, "--worker", str(w), "--concurrency-here", str(here),
               "--requests-here", str(requests_here), "--start-at", repr(start_at)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
    parts = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"load worker failed ({proc.returncode})")
        parts.append(json.loads(out.strip().splitlines()[-1]))
    latencies = np.array([x for p in parts for x in p["latencies"]]) if parts else np.zeros(0)
    errors: dict[str, int] = {}
    details: dict[str, str] = {}
    for p in parts:
        for code, n in p["errors"].items():
            errors[code] = errors.get(code, 0) + n
        details.update(p["error_details"])
    requests = sum(p["requests"] for p in parts)
    seconds = max(p["seconds"] for p in parts) if parts else 0.0
    pct = lambda q: round(float(np.percentile(latencies, q)), 3) if len(latencies) else None  # noqa: E731
    return {"api": args.api, "client": args.client, "concurrency": args.concurrency, "processes": args.processes,
            "batch": args.batch, "requests": requests, "images": requests * args.batch, "errors": errors,
            "error_details": details, "wrong": sum(p["wrong"] for p in parts), "seconds": round(seconds, 3),
            "requests_per_s": round(requests / seconds, 1) if seconds else None,
            "images_per_s": round(requests * args.batch / seconds, 1) if seconds else None,
            "p50_ms": pct(50), "p90_ms": pct(90), "p95_ms": pct(95), "p99_ms": pct(99)}



def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python bench/loadgen.py", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("tiny-repo", help="write a linear-model repository")
    p.add_argument("out", type=Path)
    p.add_argument("--max-batch-size", type=int, default=256)
    p = sub.add_parser("run", help="closed-loop load", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--address", required=True)
    p.add_argument("--api", choices=("kserve", "typed"), default="kserve")
    p.add_argument("--client", choices=("aio", "tritonclient"), default="aio")
    p.add_argument("--model", default=BY_KIND["onnx"].directory)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--batch", type=int, default=1, help="images per request")
    p.add_argument("--distinct", type=int, default=16, help="distinct inputs per process")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before the window")
    p.add_argument("--requests", type=int, default=0, help="send exactly this many (instead of a time window)")
    p.add_argument("--startup", type=float, default=2.0, help="seconds the workers get to start")
    p.add_argument("--check", action="store_true", help="compare every answer with the answer alone")
    p.add_argument("--tolerance", type=float, default=1e-4, help="--check: atol and rtol of the logits")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--stop-on-unavailable", action="store_true",
                   help="a client stops at its first UNAVAILABLE (the server is going away)")
    p.add_argument("--token", default=os.environ.get("LSOFTMAX_TOKEN"))
    p.add_argument("--tls-ca", default=None)
    p.add_argument("--tls-cert", default=None)
    p.add_argument("--tls-key", default=None)
    p.add_argument("--tls-server-name", default=None)
    p.add_argument("--worker", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--concurrency-here", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--requests-here", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str]) -> int:
    args = get_args_parser().parse_args(argv)
    if args.command == "tiny-repo":
        print(tiny_repo(args.out, args.max_batch_size))
        return 0
    if args.worker >= 0:
        return _worker_main(args)
    sys.argv_rest = argv[1:]
    print(json.dumps(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
