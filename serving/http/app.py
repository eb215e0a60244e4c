"""The HTTP/REST transport: an aiohttp application on the server's event loop, beside gRPC, over the same core.

    http = HttpServer(core, drain, auth, HttpOptions(...), configs)
    await http.start(host, port, ssl_context)      # http.port: the bound port (0 picks one)
    ...
    await http.stop()

One middleware is the boundary every request passes (as the gRPC interceptor is for calls): security headers,
CORS for the origins allowed with --http-cors-origin, the bearer token (static files, health and the OpenAPI
document stay open), the concurrent-request cap (429), draining (503 "shutting down"; in-flight requests finish
and count until their answer is written), the error table (serving/http/errors.py: `{"error": ...}`) and the
outcome on the charged model's counters. Routes: KServe v2 (serving/http/kserve_rest.py), the typed API
(serving/http/typed_rest.py), the page (GET /, /static/*) and GET /v2/openapi.json. Contract: docs/http_api.md.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from serving.core.boundary import Drain, record
from serving.core.inference import InferenceCore
from serving.core.errors import NotReady, ServingError, StartupError, Unauthenticated
from serving.http import kserve_rest, typed_rest
from serving.http.errors import HttpError, error_response, status_for
from serving.logs import log_event
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


@dataclass(frozen=True)
class HttpOptions:
    max_body_bytes: int = 16 * 1024 * 1024  # --max-message-bytes, as for gRPC
    max_concurrent: int = 512  # --max-concurrent-rpcs, as for gRPC
    body_timeout: float = 30.0  # --http-body-timeout: a body that trickles in slower is dropped (408)
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
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self.app = web.Application(middlewares=[self._boundary], client_max_size=options.max_body_bytes,
                                   handler_args={"max_field_size": 8190, "max_line_size": 8190})
        kserve_rest.add_routes(self.app, kserve_rest.KServeRest(core, configs, options.max_body_bytes,
                                                                options.body_timeout))
        typed_rest.add_routes(self.app, typed_rest.TypedRest(core, options.max_body_bytes, options.body_timeout))
        self.app.router.add_get("/", self._index)
        self.app.router.add_get("/static/{name}", self._static)
        self.app.router.add_get("/v2/openapi.json", self._openapi)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, host: str, port: int, ssl_context=None, reuse_port: bool = False) -> None:
        """reuse_port: one of --workers N, sharing the port its parent claimed (SO_REUSEPORT)."""
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host.strip("[]"), port, ssl_context=ssl_context, backlog=128,
                           reuse_address=True, reuse_port=reuse_port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise StartupError(f"cannot bind the HTTP port {host}:{port} ({exc.strerror or exc}); choose another "
                               "--http-port (0: any free port, -1: no HTTP)") from None
        self.port = site._server.sockets[0].getsockname()[1]  # the port the OS picked for --http-port 0

    async def stop(self) -> None:
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
        protected = not _open(request.path)
        start = self.drain.arrived() if protected else 0
        error: BaseException | None = None
        ok = counted = recorded = False
        try:
            try:
                if protected:
                    if self.auth is not None and not self.auth.check_header(request.headers.get("Authorization")):
                        raise Unauthenticated("missing or invalid credentials: send `Authorization: Bearer <token>`")
                    if self.drain.draining:
                        raise NotReady("the server is shutting down; retry (another replica) later")
                    if self.active >= self.options.max_concurrent:
                        raise HttpError(429, f"more than {self.options.max_concurrent} requests at once "
                                             "(--max-concurrent-rpcs); retry later", {"Retry-After": "1"})
                    self.active += 1
                    counted = True
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
            except Exception as exc:  # a bug: 500 with the type only, the traceback to the log
                error = exc
                logger.exception("unhandled exception in %s %s", request.method, request.path)
                status, message = status_for(exc)
                response = error_response(status, message)
            self._headers(request, response)
            if protected:  # counted before the answer leaves: a client that scrapes right after it sees the call
                elapsed, recorded = time.perf_counter_ns() - start, True
                record(charged(), ok, error, elapsed)
            await response.prepare(request)
            await response.write_eof()  # answered: only now does the call stop counting for the drain
            return response
        finally:
            if counted:
                self.active -= 1
            if protected:
                self.drain.answered()
                if not recorded:  # cancelled or failed before an answer was made
                    elapsed = time.perf_counter_ns() - start
                    record(charged(), ok, error, elapsed)
                if logger.isEnabledFor(logging.DEBUG):
                    log_event(logger, logging.DEBUG, "http", method=request.method, path=request.path,
                              ok=ok, ms=round(elapsed / 1e6, 3), peer=request.remote)
            error = None  # no exception → traceback → this frame → exception cycle (issue 20)

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
        if not name or name.startswith(".") or "/" in name or "\\" in name:
            raise HttpError(404, f"no static file {name!r}")
        path = (STATIC_DIR / name).resolve()
        if path.parent != STATIC_DIR.resolve():
            raise HttpError(404, f"no static file {name!r}")
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
