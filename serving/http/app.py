"""The HTTP/REST transport: an aiohttp application on the server's event loop, beside gRPC, over the same core.

    http = HttpServer(core, drain, auth, HttpOptions(...), configs)
    await http.start(host, port, ssl_context)      # http.port: the bound port (0 picks one)
    ...
    await http.stop()

Connections are bounded by serving.http.connections (head, idle and write timeouts, a connection cap). One
middleware is the boundary every request passes (as the gRPC interceptor is for calls): security headers, CORS
for the origins allowed with --http-cors-origin, the bearer token (static files, health and the OpenAPI document
stay open), draining (503 "shutting down" with `Connection: close`, not counted as a call; in-flight requests
finish and count until their answer is written), the body read within its limits (serving.http.bodies) *before*
the request takes one of the --max-concurrent-rpcs slots (429 beyond them), so bodies still arriving hold none,
the error table (serving/http/errors.py: `{"error": ...}`) and the outcome on the charged model's counters. Routes: KServe v2 (serving/http/kserve_rest.py), the typed API
(serving/http/typed_rest.py), the page (GET /, /static/*) and GET /v2/openapi.json. Contract: docs/http_api.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from serving.core.boundary import Drain, record
from serving.core.inference import InferenceCore
from serving.core.errors import ServingError, StartupError, Unauthenticated
from serving.http import kserve_rest, typed_rest
from serving.http.bodies import BodyLimits, receive
from serving.http.connections import ConnectionGuard, ConnectionPolicy
from serving.http.errors import HttpError, error_response, status_for
from serving.logs import RateLimitedLog, log_event
from serving.metrics import charged
from serving.security import TokenAuth

__all__ = ["HttpOptions", "HttpServer", "STATIC_DIR", "OPENAPI_FILE"]

logger = logging.getLogger("serving.http")
STATIC_DIR = Path(__file__).with_name("static")
OPENAPI_FILE = Path(__file__).with_name("openapi.json")
OPEN_PATHS = ("/v2/health/", "/static/", "/v2/openapi.json")  # and "/" itself: no token needed
CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; connect-src 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".png": "image/png",
                 ".svg": "image/svg+xml", ".ico": "image/x-icon", ".json": "application/json",
                 ".webmanifest": "application/manifest+json"}
CORS_HEADERS = "Authorization, Content-Type, Inference-Header-Content-Length"
# connections the kernel completes before the server accepts them: a burst larger than this is dropped by the
# kernel unseen (the connection cap, not the backlog, bounds what the server holds)
BACKLOG = 1024


@dataclass(frozen=True)
class HttpOptions:
    bodies: BodyLimits  # per encoding, from --max-message-bytes, --max-images-per-request, --http-body-timeout
    connections: ConnectionPolicy  # serving.connection_limits: caps and timeouts from the flags and the fd limit
    max_concurrent: int = 512  # --max-concurrent-rpcs, as for gRPC
    cors_origins: tuple[str, ...] = ()  # --http-cors-origin (repeatable); none: no cross-origin access


def _open(path: str) -> bool:
    return path == "/" or path.startswith(OPEN_PATHS)


class HttpServer:
    def __init__(self, core: InferenceCore, drain: Drain, auth: TokenAuth | None, options: HttpOptions,
                 configs: dict) -> None:
        self.core = core
        self.drain = drain
        self.auth = auth
        self.options = options
        self.active = 0  # requests past the boundary and not yet answered (the concurrency cap counts these)
        self._faults = RateLimitedLog(logger)
        self._static_files = {path.name: path for path in STATIC_DIR.iterdir()
                              if path.is_file() and not path.name.startswith(".")}
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None  # the listening socket(s) of the port
        self.guard: ConnectionGuard | None = None
        # aiohttp inflates nothing itself (serving.http.bodies does, within the limit) and keeps no connection
        # open on its own clock: the guard's timeouts are shorter
        self.app = web.Application(middlewares=[self._boundary], client_max_size=options.bodies.body_bytes,
                                   handler_args={"max_field_size": 8190, "max_line_size": 8190,
                                                 "auto_decompress": False, "lingering_time": 2.0,
                                                 "keepalive_timeout": 3600 * 24})
        kserve_rest.add_routes(self.app, kserve_rest.KServeRest(core, configs, options.bodies))
        typed_rest.add_routes(self.app, typed_rest.TypedRest(core, options.bodies))
        self.app.router.add_get("/", self._index)
        self.app.router.add_get("/static/{name}", self._static)
        self.app.router.add_get("/v2/openapi.json", self._openapi)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, host: str, port: int, ssl_context=None, reuse_port: bool = False) -> None:
        """reuse_port: one of --workers N, sharing the port its parent claimed (SO_REUSEPORT)."""
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=0)
        await self._runner.setup()
        self.guard = ConnectionGuard(self.options.connections, ssl_context)  # it runs TLS itself, to count it
        try:
            server = await asyncio.get_running_loop().create_server(
                self.guard.factory(self._runner.server), host.strip("[]") or None, port, backlog=BACKLOG,
                reuse_address=True, reuse_port=reuse_port)
        except OSError as exc:
            await self._runner.cleanup()
            raise StartupError(f"cannot bind the HTTP port {host}:{port} ({exc.strerror or exc}); choose another "
                               "--http-port (0: any free port, -1: no HTTP)") from None
        self._server = server
        self.port = server.sockets[0].getsockname()[1]  # the port the OS picked for --http-port 0

    def stop_accepting(self) -> None:
        """Draining: new connections are refused (nothing sent, so nothing lost; under --workers another process
        takes them), the open ones are answered, each answer closing its connection."""
        if self._server is not None:
            self._server.close()

    async def stop(self) -> None:
        self.stop_accepting()
        if self.guard is not None:
            self.guard.close_all()
        if self._runner is not None:
            await self._runner.cleanup()

    # ------------------------------------------------------------------ the boundary

    def _headers(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        if response.content_type == "text/html":
            response.headers["Content-Security-Policy"] = CSP
        elif not request.path.startswith("/static/"):
            response.headers.setdefault("Cache-Control", "no-store")
        origin = request.headers.get("Origin")
        if origin and origin in self.options.cors_origins:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
            response.headers["Access-Control-Expose-Headers"] = kserve_rest.HEADER_LENGTH

    @web.middleware
    async def _boundary(self, request: web.Request, handler) -> web.StreamResponse:
        if request.method == "OPTIONS":
            return self._preflight(request)
        guard, transport = self.guard, request.transport
        protected = not _open(request.path)
        start = time.perf_counter_ns()
        error: BaseException | None = None
        ok = counted = arrived = recorded = False
        try:
            try:
                if protected:
                    if self.auth is not None and not self.auth.check_header(request.headers.get("Authorization")):
                        raise Unauthenticated("missing or invalid credentials: send `Authorization: Bearer <token>`")
                    if self.drain.draining:  # an answer, not an arrival: the drain does not wait for it
                        raise HttpError(503, "the server is shutting down; retry (another replica) later",
                                        {"Connection": "close", "Retry-After": "1"})
                    start, arrived = self.drain.arrived(), True
                    if request.can_read_body:
                        if guard is not None:
                            guard.reading(transport)
                        await receive(request, self.options.bodies)
                    if self.active >= self.options.max_concurrent:
                        raise HttpError(429, f"more than {self.options.max_concurrent} requests at once "
                                             "(--max-concurrent-rpcs); retry later", {"Retry-After": "1"})
                    self.active += 1
                    counted = True
                if guard is not None:
                    guard.busy(transport)
                response = await handler(request)
                ok = response.status < 400
            except web.HTTPException as exc:  # aiohttp's own: no route (404), wrong method (405), ...
                error = exc
                message = exc.text if exc.status >= 400 and exc.text and not exc.text.startswith("<") else exc.reason
                response = error_response(exc.status, f"{request.method} {request.path}: {message}",
                                          {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None)
            except ServingError as exc:
                error = exc
                status, message = status_for(exc)
                response = error_response(status, message, getattr(exc, "headers", None))
            except ConnectionError as exc:
                error = exc  # the client went away mid-request: nothing to answer, a warning at most
                self._faults.warning("http_client_disconnected", path=request.path, error=type(exc).__name__)
                raise ConnectionResetError("client disconnected") from None
            except (RequestPayloadError, HttpProcessingError) as exc:  # a chunked body that breaks its framing
                error = exc
                self._faults.warning("http_bad_body", path=request.path, error=type(exc).__name__)
                response = error_response(400, f"the request body is malformed or cut short ({type(exc).__name__})",
                                          {"Connection": "close"})
            except Exception as exc:  # a bug: 500 with the type only, the traceback to the log
                error = exc
                logger.exception("unhandled exception in %s %s", request.method, request.path)
                status, message = status_for(exc)
                response = error_response(status, message)
            self._headers(request, response)
            if response.headers.get("Connection", "").lower() == "close" or self.drain.draining:
                response.force_close()  # the body was not read (or not all), or shutting down: this connection ends
            if arrived:  # counted before the answer leaves: a client that scrapes right after it sees the call
                elapsed, recorded = time.perf_counter_ns() - start, True
                record(charged(), ok, error, elapsed)
            await response.prepare(request)
            await response.write_eof()  # answered: only now does the call stop counting for the drain
            if guard is not None:
                guard.idle(transport)
            return response
        finally:
            if counted:
                self.active -= 1
            if arrived:
                self.drain.answered()
                if not recorded:  # cancelled or failed before an answer was made
                    elapsed = time.perf_counter_ns() - start
                    record(charged(), ok, error, elapsed)
                if logger.isEnabledFor(logging.DEBUG):
                    log_event(logger, logging.DEBUG, "http", method=request.method, path=request.path,
                              ok=ok, ms=round((time.perf_counter_ns() - start) / 1e6, 3), peer=request.remote)
            error = None  # no exception → traceback → this frame → exception cycle

    def _preflight(self, request: web.Request) -> web.Response:
        origin = request.headers.get("Origin")
        if not origin or origin not in self.options.cors_origins:
            return error_response(403, f"cross-origin requests from {origin or '(no origin)'} are not allowed "
                                       "(--http-cors-origin)")
        return web.Response(status=204, headers={
            "Access-Control-Allow-Origin": origin, "Vary": "Origin", "Access-Control-Max-Age": "600",
            "Access-Control-Allow-Methods": "GET, POST, OPTIONS", "Access-Control-Allow-Headers": CORS_HEADERS})

    # ------------------------------------------------------------------ the page and the document

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return self._file(STATIC_DIR / "index.html")

    async def _static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        path = self._static_files.get(name)  # only the files shipped, by exact name: nothing to resolve or escape
        if path is None:
            raise HttpError(404, f"no static file {name[:100]!r}")
        return self._file(path)

    async def _openapi(self, request: web.Request) -> web.StreamResponse:
        return self._file(OPENAPI_FILE)

    @staticmethod
    def _file(path: Path) -> web.Response:
        content_type = CONTENT_TYPES.get(path.suffix)
        if content_type is None or not path.is_file():
            raise HttpError(404, f"no such file: {path.name}")
        return web.Response(body=path.read_bytes(), content_type=content_type,
                            charset="utf-8" if content_type.startswith("text/") or content_type.endswith("json")
                            else None)
