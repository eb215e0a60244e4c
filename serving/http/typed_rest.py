"""The typed API (lsoftmax.v1) over HTTP, over the core: POST /v1/classify, POST /v1/embed, GET /v1/model.

A body is one of: `application/json`, the request message in protobuf's JSON mapping (so the contract stays in
protos/lsoftmax/v1/digit_service.proto); a raw image (`Content-Type: image/...`, one image); or
`multipart/form-data` with one or more image files. For the last two the options are query parameters (top_k,
return_logits, return_inputs, invert, fit, l2_normalize). Answers are the response messages in protobuf's JSON
mapping with every field present.
"""

from __future__ import annotations

from aiohttp import web
from google.protobuf import json_format

from serving._proto.lsoftmax.v1 import digit_service_pb2 as pb
from serving.core.inference import InferenceCore
from serving.core.errors import InvalidInput, LimitExceeded
from serving.http.bodies import BodyLimits, body_of, multipart_files, off_loop, parse_json
from serving.http.errors import HttpError
from serving.grpc.typed import classify_response, model_info_response

__all__ = ["TypedRest", "add_routes"]

_INVERT = {"auto": pb.INVERT_AUTO, "never": pb.INVERT_NEVER, "always": pb.INVERT_ALWAYS}
_FIT = {"auto": pb.FIT_AUTO, "digit": pb.FIT_DIGIT, "resize": pb.FIT_RESIZE}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def _answer(message) -> web.Response:
    text = json_format.MessageToJson(message, always_print_fields_with_no_presence=True, indent=None)
    return web.Response(text=text, content_type="application/json")


def _flag(query, name: str) -> bool:
    value = query.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise InvalidInput(f"query parameter {name}={query.get(name)!r}: use true or false")


def _choice(query, name: str, table: dict[str, int]) -> int:
    value = query.get(name, "auto").strip().lower()
    if value not in table:
        raise InvalidInput(f"query parameter {name}={query.get(name)!r}: choose from {', '.join(table)}")
    return table[value]


def _top_k(query) -> int:
    text = query.get("top_k", "1")
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise InvalidInput(f"query parameter top_k={text!r}: give a whole number from 1 to the number of classes")
    return value


class TypedRest:
    def __init__(self, core: InferenceCore, limits: BodyLimits) -> None:
        self.core = core
        self.limits = limits

    def _parse_json(self, body: bytes, message):
        """The request message from protobuf's JSON mapping; the images are counted before the (slow) mapping
        runs. In a worker thread for large bodies."""
        most = self.limits.max_images
        request = parse_json(body, "the request")  # its objects were counted as it arrived (bodies.receive)
        if not isinstance(request, dict):
            raise InvalidInput(f"the request must be a {message.DESCRIPTOR.name} as a JSON object")
        images = request.get("images")
        if isinstance(images, list) and len(images) > most:
            raise LimitExceeded(f"{len(images)} images in one request; this server accepts at most {most} "
                                "(--max-images-per-request)")
        try:
            return json_format.ParseDict(request, message)
        except (json_format.ParseError, ValueError, TypeError) as exc:
            raise InvalidInput(f"the request is not a valid {message.DESCRIPTOR.name} in JSON "
                               f"({str(exc).splitlines()[0]})") from None

    async def _request(self, request: web.Request, message):
        """(the images as the core takes them, the request message with the options): parsed from JSON, or a raw
        image or a multipart upload and the query. Uploaded bytes go to the core as they are, never copied into
        and out of a message (a 16 MiB upload cost the event loop tens of ms per copy)."""
        content_type = request.content_type  # without parameters, lowercase
        body = body_of(request)
        if content_type == "application/json":
            message = await off_loop(lambda: self._parse_json(body, message), len(body))
            return self._items(message), message
        if content_type.startswith("image/") or content_type == "application/octet-stream":
            if not body:
                raise InvalidInput("the request body is empty: send the image's bytes")
            files = [body]
        elif content_type == "multipart/form-data":
            files = [data for _, data in await off_loop(
                lambda: multipart_files(request.headers["Content-Type"], body, self.limits.max_images), len(body))]
        else:
            raise HttpError(415, f"unsupported Content-Type {content_type or '(none)'!r}: send application/json, "
                                 "an image (image/png, image/jpeg, ...) or multipart/form-data")
        query = request.query
        message.options.invert = _choice(query, "invert", _INVERT)
        message.options.fit = _choice(query, "fit", _FIT)
        if isinstance(message, pb.ClassifyRequest):
            message.top_k = _top_k(query)
            message.return_logits = _flag(query, "return_logits")
            message.return_inputs = _flag(query, "return_inputs")
        else:
            message.l2_normalize = _flag(query, "l2_normalize")
        return [("encoded", data) for data in files], message

    @staticmethod
    def _items(message) -> list[tuple[str | None, bytes]]:
        return [(image.WhichOneof("data"), image.encoded or image.pixels) for image in message.images]

    async def classify(self, request: web.Request) -> web.Response:
        self.core.typed_runner()  # not ready → 503 before the body is parsed
        items, message = await self._request(request, pb.ClassifyRequest())
        result = await self.core.classify(items, top_k=message.top_k, invert=message.options.invert,
                                          fit=message.options.fit)
        return _answer(classify_response(result, message.return_logits, message.return_inputs))

    async def embed(self, request: web.Request) -> web.Response:
        self.core.typed_runner()
        items, message = await self._request(request, pb.EmbedRequest())
        result = await self.core.embed(items, l2_normalize=message.l2_normalize,
                                       invert=message.options.invert, fit=message.options.fit)
        embedding = result.embedding
        return _answer(pb.EmbedResponse(embeddings=[pb.Embedding(values=row) for row in embedding.tolist()],
                                        dim=embedding.shape[1], model_name=result.model_name,
                                        model_version=result.model_version))

    async def model(self, request: web.Request) -> web.Response:
        return _answer(model_info_response(self.core.model_info()))


def add_routes(app: web.Application, rest: TypedRest) -> None:
    app.router.add_post("/v1/classify", rest.classify)
    app.router.add_post("/v1/embed", rest.embed)
    app.router.add_get("/v1/model", rest.model)
