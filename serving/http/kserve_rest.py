"""KServe v2 / Open Inference Protocol over HTTP/REST (what tritonclient.http speaks), over the core.

GET /v2/health/live|ready, GET /v2 (server metadata), GET /v2/models/{model}[/versions/{v}] (metadata),
.../ready, .../config, POST .../infer. Infer takes JSON, or Triton's binary tensor data extension: the header
`Inference-Header-Content-Length: L`, L bytes of JSON, then each input's raw bytes in order (its
`parameters.binary_data_size` says how many). Outputs come back binary when asked per output
(`parameters.binary_data`) or for all (`parameters.binary_data_output`), else as JSON `data`.
"""

from __future__ import annotations

import json

import numpy as np
from aiohttp import web

from serving.core.inference import InferenceCore
from serving.core.errors import InvalidInput
from serving.http.bodies import CLOSE, BodyLimits, body_of, off_loop, parse_json
from serving.http.errors import HttpError, error_response
from serving.grpc.kserve import runner_config, server_metadata
from serving.repository.format import OUTPUT_DATATYPE

__all__ = ["add_routes", "HEADER_LENGTH"]

HEADER_LENGTH = "Inference-Header-Content-Length"
_CONFIG_FIELDS = {"preserving_proto_field_name": True}


def _json(data, status: int = 200) -> web.Response:
    return web.Response(status=status, body=json.dumps(data, separators=(",", ":")).encode(),
                        content_type="application/json")


def _status(ok: bool, why: str = "not ready") -> web.Response:
    """KServe health and readiness: the status is the answer (200 true; 503 false, as a probe expects, with the
    usual error body)."""
    return web.Response(status=200) if ok else error_response(503, why)


def _split(body: bytes, header_length: str | None, limits: BodyLimits) -> tuple[dict, bytes]:
    """(the JSON request, the binary tail) of an infer body; counts over the JSON refuse what no valid request
    within the limits holds before it is parsed."""
    if header_length is None:
        json_part, binary = body, b""
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise InvalidInput(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 <= length <= len(body):
            raise InvalidInput(f"{HEADER_LENGTH} {length} is beyond the body's {len(body)} bytes")
        if length > limits.kserve_json_bytes:
            raise HttpError(413, f"the JSON header of {length} bytes is larger than the {limits.kserve_json_bytes} "
                                 "bytes this server accepts for it", CLOSE)
        json_part, binary = body[:length], body[length:]
    # a JSON-only body was counted as it arrived (serving.http.bodies.receive); a binary body's header is counted here
    request = parse_json(json_part, "the inference request", None if header_length is None else limits.kserve_counts)
    if not isinstance(request, dict):
        raise InvalidInput("the inference request must be a JSON object")
    return request, binary


def _parameters(holder: dict, what: str) -> dict:
    """`parameters` of the request, an input or an output: absent, or a JSON object."""
    parameters = holder.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidInput(f"{what}: 'parameters' must be a JSON object")
    return parameters


def _flatten(name: str, data) -> np.ndarray:
    """KServe JSON `data` (nested lists of numbers) as flat uint8, refusing anything else before a cast could."""
    try:
        array = np.asarray(data, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError, OverflowError):
        raise InvalidInput("input 'data' must be a (nested) list of numbers") from None
    with np.errstate(all="ignore"):
        if array.size and not np.all(array == np.floor(array)):
            raise InvalidInput("UINT8 input data must be whole numbers 0..255")
        if array.size and not (array.min() >= 0 and array.max() <= 255):
            raise InvalidInput(f"input '{name}' UINT8 values must be 0..255")
    return array.astype(np.uint8)


class KServeRest:
    def __init__(self, core: InferenceCore, configs: dict, limits: BodyLimits) -> None:
        self.core = core
        self.configs = configs
        self.limits = limits
        self._effective: dict[str, dict] = {}

    async def live(self, request: web.Request) -> web.Response:
        return _status(True)

    async def ready(self, request: web.Request) -> web.Response:
        return _status(self.core.server_ready(), "shutting down" if self.core.draining else
                       "the models are still loading")

    async def server_metadata(self, request: web.Request) -> web.Response:
        return _json(server_metadata())

    def _runner(self, request: web.Request, inference: bool = False):
        name, version = request.match_info["model"], request.match_info.get("version", "")
        return (self.core.inference_runner if inference else self.core.runner)(name, version)

    async def model_metadata(self, request: web.Request) -> web.Response:
        return _json(self.core.model_metadata(self._runner(request)))

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = request.match_info["model"], request.match_info.get("version", "")
        if name not in self.core.served or (version and name in self.core.runners
                                            and version != self.core.runners[name].version):
            self.core.runner(name, version)  # NotFound, in Triton's words
        return _status(self.core.model_ready(name, version), f"model '{name}' is not ready")

    async def model_config(self, request: web.Request) -> web.Response:
        from google.protobuf import json_format

        runner = self._runner(request)
        config = self._effective.get(runner.name)
        if config is None:
            config = self._effective[runner.name] = json_format.MessageToDict(
                runner_config(runner, self.configs.get(runner.name)), **_CONFIG_FIELDS)
        return _json(config)

    async def infer(self, request: web.Request) -> web.Response:
        runner = self._runner(request, inference=True)
        body, header_length = body_of(request), request.headers.get(HEADER_LENGTH)
        infer, tensor = await off_loop(lambda: self._parse(body, header_length), len(body))
        images = self.core.tensor_images(runner.name, **tensor)
        requested = infer.get("outputs") or []
        if not isinstance(requested, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                      for o in requested):
            raise InvalidInput("'outputs' must be a list of objects with a 'name'")
        wanted = self.core.wanted_outputs(runner, [o["name"] for o in requested])
        arrays = await self.core.infer_tensors(runner, images, wanted)
        binary_all = bool(_parameters(infer, "the request").get("binary_data_output", False))
        per_output = {o["name"]: _parameters(o, f"output '{o['name']}'").get("binary_data") for o in requested}
        outputs, tails = [], []
        for name, array in arrays:
            entry = {"name": name, "datatype": OUTPUT_DATATYPE, "shape": list(array.shape)}
            as_binary = per_output.get(name)
            if as_binary if as_binary is not None else binary_all:
                data = array.tobytes()
                entry["parameters"] = {"binary_data_size": len(data)}
                tails.append(data)
            else:
                entry["data"] = array.reshape(-1).tolist()
            outputs.append(entry)
        answer = {"model_name": runner.name, "model_version": runner.version, "outputs": outputs}
        if "id" in infer:
            answer["id"] = infer["id"]
        header = json.dumps(answer, separators=(",", ":")).encode()
        if not tails:
            return web.Response(body=header, content_type="application/json")
        return web.Response(body=header + b"".join(tails), content_type="application/octet-stream",
                            headers={HEADER_LENGTH: str(len(header))})

    def _parse(self, body: bytes, header_length: str | None) -> tuple[dict, dict]:
        """The request and its one input tensor's fields (name, datatype, shape, raw or values), checked; runs in
        a worker thread for large bodies, so it touches nothing of the core."""
        infer, binary = _split(body, header_length, self.limits)
        inputs = infer.get("inputs")
        if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
            got = ", ".join(repr(i.get("name")) for i in inputs if isinstance(i, dict)) \
                if isinstance(inputs, list) and inputs else "none"
            raise InvalidInput(f"expected 1 input named '{self.core.input_name}', got {got}")
        tensor = inputs[0]
        name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise InvalidInput("the input needs a 'name' and a 'datatype'")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise InvalidInput(f"input '{name}': 'shape' must be a list of integers")
        fields = {"name": name, "datatype": datatype, "shape": shape}
        size = _parameters(tensor, f"input '{name}'").get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0:
                raise InvalidInput(f"input '{name}': binary_data_size must be a non-negative integer")
            if size != len(binary):
                raise InvalidInput(f"input '{name}': binary_data_size {size} but {len(binary)} bytes follow the "
                                   "JSON header (truncated or extra data)")
            return infer, {**fields, "raw": binary}
        if binary:
            raise InvalidInput(f"{len(binary)} bytes of binary data follow the JSON header, but no input declares "
                               "binary_data_size")
        if "data" not in tensor:
            raise InvalidInput(f"input '{name}' has neither 'data' nor parameters.binary_data_size")
        return infer, {**fields, "values": _flatten(name, tensor["data"])}


def add_routes(app: web.Application, rest: KServeRest) -> None:
    r = app.router
    r.add_get("/v2/health/live", rest.live)
    r.add_get("/v2/health/ready", rest.ready)
    r.add_get("/v2", rest.server_metadata)
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        r.add_get(prefix, rest.model_metadata)
        r.add_get(prefix + "/ready", rest.model_ready)
        r.add_get(prefix + "/config", rest.model_config)
        r.add_post(prefix + "/infer", rest.infer)

