"""The gRPC server: `python -m serving --model-repository REPO [--backend onnx|torchscript] [--port 50051] ...`

Models: --model NAME or --backend onnx|torchscript serves that one model; without either, every model of
the repository is loaded (KServe answers for each) and the typed lsoftmax.v1 API serves the ONNX one.
Lifecycle (grpc.aio, one asyncio event loop):
1. read manifest.json and each model's config.pbtxt, choose the models, verify their sha256, read the TLS
   files and the auth token (any defect exits 1 before anything binds);
2. bind host:port (--port 0 picks a free port; the `listening` log line says which) and the Prometheus
   endpoint on host:--metrics-port, and start answering: health is NOT_SERVING and inference calls answer
   UNAVAILABLE while
3. each backend loads and warms up in a worker thread; then health turns SERVING and `ready` is logged;
4. SIGTERM/SIGINT: health NOT_SERVING; drain: new calls get UNAVAILABLE "shutting down" (retryable; gRPC's
   own shutdown would cancel calls still waiting to be picked up) while the calls in flight (queued ones
   included) finish; the HTTP port stops accepting at once (a new connection is refused, so a client knows nothing
   was sent, and another --workers process or replica takes it) while its open connections get their answers,
   each with `Connection: close`; once none is in flight and no call came or was answered for DRAIN_QUIET_S (at most half the grace
   period), stop the gRPC server with the rest of --grace-seconds, release the models, exit 0. A second
   signal cuts all of it short.
Services: lsoftmax.v1.DigitService, inference.GRPCInferenceService (KServe v2), grpc.health.v1.Health
("" and both service names), server reflection.
Per request: no thread hop of its own. Calls are handled on the event loop; each model's requests are
coalesced by serving.backends.batching into backend calls in one worker thread per model (--max-batch-size,
--max-queue-delay-us, --max-queue-size, --no-dynamic-batching); encoded images are decoded in a small pool.
Security (serving.security): --tls-cert/--tls-key [--tls-client-ca] and --auth-token-file; metrics
(serving.metrics): Triton's names at http://HOST:METRICS_PORT/metrics.
--workers N (N > 1): this process becomes the parent of N such servers on the same ports (serving.workers); each
worker runs serve() with its WorkerLink: SO_REUSEPORT, metrics on a private socket, and the models loaded before
it listens (step 3 before step 2), so a restarted worker takes no connection it cannot answer yet.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving._proto.inference import grpc_service_pb2_grpc as kserve_grpc
from serving._proto.lsoftmax.v1 import digit_service_pb2_grpc as pb_grpc
from serving.images.lanes import Decoder
from serving.core.errors import StartupError, UsageError
from serving.grpc.health import SERVING, HealthServicer
from serving.images.decoding import configure_pillow
from serving.grpc.interceptors import BoundaryInterceptor, Drain
from serving.grpc.kserve import SERVICE_NAME as KSERVE_SERVICE_NAME
from serving.grpc.kserve import KServeServicer
from serving.logs import LoopFaults, configure_logging, log_event
from serving.malloc import fix_mmap_threshold, trim_when_grown
from serving.metrics import ModelStats
from serving.metrics_endpoint import MetricsServer
from serving.backends.runner import ModelRunner
from serving.options import get_args_parser
from serving.startup import Plan, load_model, make_plan
from serving.security import TlsConfig, TokenAuth
from serving.core.inference import InferenceCore
from serving.http.app import HttpOptions, HttpServer
from serving.http.bodies import BodyLimits
from serving.connection_limits import ConnectionLimits
from serving.grpc.typed import SERVICE_NAME, DigitServicer
from serving.worker_link import WorkerLink
from serving.workers import supervise

__all__ = ["get_args_parser", "main", "serve"]

logger = logging.getLogger("serving")


# After the last arrival or answer: long enough for a client that just got its answer to send its next call (and
# be told UNAVAILABLE "shutting down") even on a busy machine; a call that reached gRPC after stop() began would
# be CANCELLED instead. 0.1 s lost calls under 64 clients on a loaded 2-core machine.
DRAIN_QUIET_S = 0.5


def _bind(server: grpc.aio.Server, host: str, port: int, tls: TlsConfig | None) -> str:
    """Bind host:port (IPv6 literals bracketed), with TLS when configured; returns the bound address."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    try:
        if tls is None:
            bound = server.add_insecure_port(f"{host}:{port}")
        else:
            bound = server.add_secure_port(f"{host}:{port}", tls.server_credentials())
    except RuntimeError as exc:
        raise StartupError(f"cannot bind {host}:{port} ({exc})") from None
    return f"{host}:{bound}"


def _loopback(host: str) -> bool:
    return host.strip("[]") in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


class _Shutdown:
    """SIGTERM/SIGINT → `event`; a second signal sets `forced`: draining ends at once and the server stops
    with no grace. grpc.aio's Server.stop() is called from one place only (serve's shutdown path):
    a second, concurrent stop() from a signal callback crashed the process (SIGSEGV in grpc)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.event = asyncio.Event()
        self.forced = asyncio.Event()
        self._count = 0
        self._loop = loop
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)

    def _on_signal(self, signum: int) -> None:
        self._count += 1
        log_event(logger, logging.INFO, "signal", signal=signal.Signals(signum).name, count=self._count)
        self.event.set()
        if self._count > 1:
            self.forced.set()

    def order(self, forced: bool, reason: str) -> None:
        """The parent of --workers says drain (or stop at once); idempotent, so a signal that reached the worker
        too (sent to the whole process group) counts once."""
        log_event(logger, logging.INFO, "parent_order", order="stop" if forced else "drain", reason=reason)
        self.event.set()
        if forced:
            self.forced.set()

    def close(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._loop.remove_signal_handler(signum)


@dataclass
class _App:
    """The server's parts, built before it listens; serve() runs them."""
    server: grpc.aio.Server
    health: HealthServicer
    drain: Drain
    decoder: Decoder
    stats: dict
    runners: dict  # filled as each model is loaded and warm; read by both APIs
    core: InferenceCore
    http: HttpServer | None = None
    address: str = ""
    metrics: MetricsServer | None = None
    worker: WorkerLink | None = None  # one of --workers N: its link to the parent


def _announce(app: _App, event: str, **fields) -> None:
    """A lifecycle event the parent of --workers speaks for the whole server (listening, ready, stopped): a worker
    logs it as worker_EVENT and tells the parent."""
    if app.worker is None:
        log_event(logger, logging.INFO, event, **fields)
        return
    log_event(logger, logging.INFO, f"worker_{event}", **fields)
    app.worker.send(event, fields=fields)


def _build(args: argparse.Namespace, plan: Plan, connections: ConnectionLimits,
           worker: WorkerLink | None = None) -> _App:
    """Step 2: the gRPC server with its interceptor and services (not yet bound)."""
    stats = {e.name: ModelStats(e.name, e.version) for e in plan.served}  # servicers charge calls to these
    drain = Drain()
    server = grpc.aio.server(
        interceptors=[BoundaryInterceptor(TokenAuth(plan.token) if plan.token else None, drain)],
        options=[("grpc.max_receive_message_length", args.max_message_bytes),
                 ("grpc.max_send_message_length", -1),
                 # a busy port is an error, not a silently shared one; a worker shares its parent's
                 ("grpc.so_reuseport", 1 if worker else 0), *connections.grpc_options],
        maximum_concurrent_rpcs=args.max_concurrent_rpcs,
    )
    decoder = Decoder(args.decode_threads, args.max_decode_queue, args.max_image_pixels, args.max_request_pixels,
                      args.max_decode_memory_mb << 20)
    runners: dict[str, ModelRunner] = {}
    health = HealthServicer([SERVICE_NAME, KSERVE_SERVICE_NAME])
    core = InferenceCore(runners, plan.typed_model.name, plan.served, plan.manifest, plan.limits, decoder)
    http = None
    if args.http_port >= 0:
        http = HttpServer(core, drain, TokenAuth(plan.token) if plan.token else None,
                          HttpOptions(bodies=BodyLimits.derive(args.max_images_per_request, args.max_message_bytes,
                                                               args.http_body_timeout),
                                      connections=connections.http, max_concurrent=args.max_concurrent_rpcs,
                                      cors_origins=tuple(args.http_cors_origin)), plan.configs)
    pb_grpc.add_DigitServiceServicer_to_server(DigitServicer(core), server)
    kserve_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(core, plan.configs), server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, KSERVE_SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    return _App(server=server, health=health, drain=drain, decoder=decoder, stats=stats, runners=runners, core=core,
                http=http, worker=worker)


async def _listen(args: argparse.Namespace, plan: Plan, app: _App) -> None:
    """Step 3: bind the gRPC port and the metrics endpoint, start answering (health NOT_SERVING)."""
    app.address = _bind(app.server, args.host, args.port, plan.tls)
    if app.worker is not None:
        try:
            app.metrics = MetricsServer.start_unix(app.stats.values(), app.worker.metrics_socket)
        except StartupError:
            await app.server.stop(None)
            app.decoder.close()
            raise
    elif args.metrics_port >= 0:
        auth = TokenAuth(plan.token) if plan.token else None
        try:
            app.metrics = MetricsServer.start(
                app.stats.values(), args.host, args.metrics_port, plan.tls.cert if plan.tls else None,
                plan.tls.key if plan.tls else None, plan.tls.client_ca if plan.tls else None,
                (lambda header: header is not None and auth.check([("authorization", header)])) if auth else None)
        except StartupError:
            await app.server.stop(None)
            app.decoder.close()
            raise
    if app.http is not None:
        try:
            await app.http.start(args.host, args.http_port, plan.tls.ssl_context() if plan.tls else None,
                                 reuse_port=app.worker is not None)
        except StartupError:
            await app.server.stop(None)
            app.decoder.close()
            if app.metrics is not None:
                app.metrics.close()
            raise
    await app.server.start()
    if plan.token and not plan.tls and not _loopback(args.host):
        log_event(logger, logging.WARNING, "token_without_tls", host=args.host,
                  hint="the bearer token crosses the network in clear text; add --tls-cert/--tls-key")
    _announce(app, "listening", address=app.address, port=int(app.address.rsplit(":", 1)[1]),
              pid=os.getpid(), models=[e.name for e in plan.served], health="NOT_SERVING",
              http_port=app.http.port if app.http else None,
              metrics_port=app.metrics.port if app.metrics else None, tls=plan.tls is not None,
              mutual_tls=bool(plan.tls and plan.tls.client_ca), auth=plan.token is not None)


async def _load_models(args: argparse.Namespace, plan: Plan, app: _App, shutdown: "_Shutdown") -> asyncio.Future | None:
    """Step 4: load and warm each model in a worker thread (a signal stops the sequence); returns the load still
    running when a signal came, if any, so the caller can release it."""
    loop = asyncio.get_running_loop()
    waiter = asyncio.ensure_future(shutdown.event.wait())
    try:
        for entry in plan.served:
            loading = loop.run_in_executor(None, load_model, entry, plan.manifest, args.device,
                                           min(8, args.max_images_per_request), plan.batching[entry.name],
                                           app.stats[entry.name], args.intra_op_threads)
            await asyncio.wait([loading, waiter], return_when=asyncio.FIRST_COMPLETED)
            if shutdown.event.is_set():
                return loading
            runner, timing = await loading
            app.runners[entry.name] = runner
            log_event(logger, logging.INFO, "model_ready", model=entry.name, version=entry.version,
                      backend=runner.backend.kind, device=runner.backend.device,
                      providers=list(runner.backend.providers),
                      intra_op_threads=getattr(runner.backend, "intra_op_threads", None), **timing)
    finally:
        waiter.cancel()
    return None


def _log_ready(args: argparse.Namespace, plan: Plan, app: _App) -> None:
    typed = app.runners[plan.typed_model.name].backend
    manifest = plan.manifest
    _announce(app, "ready", address=app.address, port=int(app.address.rsplit(":", 1)[1]),
              models=sorted(app.runners), model=plan.typed_model.name, backend=typed.kind, device=typed.device,
              providers=list(typed.providers), net=manifest.net, margin=manifest.margin,
              embedding_dim=manifest.embedding_dim, test_accuracy=manifest.test_accuracy,
              max_images_per_request=plan.limits.max_images_per_request,
              max_message_bytes=plan.limits.max_message_bytes, dynamic_batching=args.dynamic_batching,
              max_batch_size={name: b.max_batch_size for name, b in plan.batching.items()},
              max_queue_delay_us=args.max_queue_delay_us, max_queue_size=args.max_queue_size,
              inline_below_us=args.inline_below_us, intra_op_threads=args.intra_op_threads,
              metrics_port=app.metrics.port if app.metrics else None, http_port=app.http.port if app.http else None,
              http_limits=app.http.options.bodies.as_fields() if app.http else None,
              max_connections=app.http.options.connections.max_connections if app.http else None)


async def _drain_and_stop(args: argparse.Namespace, app: _App, shutdown: "_Shutdown",
                          loading: asyncio.Future | None) -> None:
    """Step 5: health NOT_SERVING, refuse new calls while those in flight finish, stop gRPC, release everything.
    A second signal at any point ends the wait at once."""
    log_event(logger, logging.INFO, "stopping", grace_seconds=args.grace_seconds)
    started = time.monotonic()
    await app.health.enter_graceful_shutdown()
    app.drain.draining = True
    app.core.draining = True
    if app.http is not None:
        app.http.stop_accepting()
    quiet = min(DRAIN_QUIET_S, args.grace_seconds / 4)
    drained = await _until(app.drain.wait(quiet, args.grace_seconds / 2), shutdown.forced)
    log_event(logger, logging.INFO, "drained", drained=bool(drained), in_flight=app.drain.in_flight,
              seconds=round(time.monotonic() - started, 3))
    grace = 0 if shutdown.forced.is_set() else max(0.0, args.grace_seconds - (time.monotonic() - started))
    stopping = asyncio.ensure_future(app.server.stop(grace))
    if not shutdown.forced.is_set():
        await _until(asyncio.shield(stopping), shutdown.forced)
    # A second signal while gRPC waits out the grace period, or during the drain with calls still in flight: leave
    # now (gRPC's stop and releasing the models would wait for a backend call that may never return).
    forced_with_calls = shutdown.forced.is_set() and app.drain.in_flight > 0
    if not forced_with_calls:
        await asyncio.wait([stopping], timeout=0 if shutdown.forced.is_set() and grace else None)
    if forced_with_calls or not stopping.done():
        log_event(logger, logging.WARNING, "forced_stop", in_flight=app.drain.in_flight,
                  hint="a second signal cut the grace period short; calls still in flight were abandoned")
        _exit_now(0)
    shutdown.close()
    if app.http is not None:
        await app.http.stop()
    app.decoder.close()
    if loading is not None and not loading.done():
        late, _ = await loading  # a signal arrived while loading: let the thread finish, then release
        late.close()
    for runner in app.runners.values():
        runner.close()
    if app.metrics is not None:
        app.metrics.close()


async def serve(args: argparse.Namespace, worker: WorkerLink | None = None) -> int:
    """Run until SIGTERM/SIGINT (a worker: or its parent's order); returns the exit status (0 after a clean
    shutdown). The steps: plan → build → listen → load → (serve until a signal) → drain and stop; a worker loads
    before it listens."""
    loop = asyncio.get_running_loop()
    shutdown = _Shutdown(loop)
    if worker is not None:
        worker.watch(loop, shutdown.order)
    loop.set_exception_handler(LoopFaults(logger).handle)
    plan = make_plan(args)
    app = _build(args, plan, ConnectionLimits.from_args(args), worker)
    if worker is None:
        await _listen(args, plan, app)
    loading = trimming = None
    try:
        loading = await _load_models(args, plan, app, shutdown)
        if worker is not None and not shutdown.event.is_set():
            await _listen(args, plan, app)
        if not shutdown.event.is_set():
            await app.health.set_all(SERVING)
            _log_ready(args, plan, app)
            trimming = asyncio.ensure_future(trim_when_grown())
            await shutdown.event.wait()
    finally:
        if trimming is not None:
            trimming.cancel()
        await _drain_and_stop(args, app, shutdown, loading)
    _announce(app, "stopped")
    return 0


def _exit_now(code: int) -> None:
    """Leave without running anything else (see run_cli: no interpreter teardown of native thread pools)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def _until(work, cancel: asyncio.Event) -> bool:
    """Await `work` unless `cancel` is set first (then False)."""
    task, stop = asyncio.ensure_future(work), asyncio.ensure_future(cancel.wait())
    done, _ = await asyncio.wait([task, stop], return_when=asyncio.FIRST_COMPLETED)
    for pending in (task, stop):
        pending.cancel()
    return task in done and task.result()


def main(args: argparse.Namespace, worker: WorkerLink | None = None) -> int:
    faulthandler.enable()  # a native crash prints every thread's Python stack to stderr
    configure_logging(args.log_level, args.log_format)
    if worker is not None:
        worker.tag_logs()
    configure_pillow(args.max_image_pixels)
    fix_mmap_threshold()  # freed image buffers go back to the system (serving.malloc)
    try:
        if worker is None and getattr(args, "workers", 1) > 1:
            return supervise(args)
        return asyncio.run(serve(args, worker))
    except StartupError as exc:  # UsageError (flags that cannot work together) exits 2, as argparse's errors do
        log_event(logger, logging.ERROR, "startup_failed", error=str(exc))
        print(f"error: {exc}", file=sys.stderr)
        if worker is not None:
            worker.send("startup_failed", error=str(exc))
        return 2 if isinstance(exc, UsageError) else 1


def run_cli() -> None:
    """Entry point of `python -m serving`: run, flush, then leave without interpreter finalisation.

    Once serve() returns every call has been answered and every log line written. Tearing down the
    native thread pools of torch, ONNX Runtime and gRPC core during Python's finalisation occasionally
    crashed (SIGSEGV, about 1 run in 10 with the TorchScript backend), turning a clean stop into exit
    code -11; os._exit skips that teardown so the exit code is the one main() returned.
    """
    worker = WorkerLink.from_env()  # started by a parent of --workers N: its flags come from there
    _exit_now(main(worker.args if worker else get_args_parser().parse_args(), worker))


if __name__ == "__main__":
    run_cli()
