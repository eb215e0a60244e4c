"""lsoftmax.v1.DigitService over gRPC: Classify, Embed, GetModelInfo as a thin adapter over the core.

protobuf in → serving.core.inference.InferenceCore (limits, images, batching, postprocessing) → protobuf out.
Errors are serving.core.errors types, mapped to status codes at the RPC boundary (serving.grpc.interceptors).
"""

from __future__ import annotations

import json
import time

from serving._proto.lsoftmax.v1 import digit_service_pb2 as pb
from serving._proto.lsoftmax.v1 import digit_service_pb2_grpc as pb_grpc
from serving.core.inference import Classified, InferenceCore, Limits

__all__ = ["DigitServicer", "Limits", "SERVICE_NAME", "classify_response"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DigitService"].full_name


def _deadline(context) -> float | None:
    remaining = context.time_remaining() if context is not None else None
    return time.monotonic() + remaining if remaining is not None else None


def _items(images) -> list[tuple[str | None, bytes]]:
    return [(image.WhichOneof("data"), image.encoded or image.pixels) for image in images]


def classify_response(result: Classified, return_logits: bool, return_inputs: bool) -> pb.ClassifyResponse:
    """The core's answer as lsoftmax.v1 messages (the HTTP transport maps this message to JSON)."""
    results = []
    known = result.known_score
    for i in range(len(result.labels)):
        top = [pb.ClassScore(label=int(label), probability=float(p))
               for label, p in zip(result.labels[i], result.probabilities[i])]
        results.append(pb.Classification(label=top[0].label, probability=top[0].probability, top_k=top,
                                         logits=result.logits[i].tolist() if return_logits else (),
                                         model_input=result.inputs[i].tobytes() if return_inputs else b"",
                                         known_score=float(known[i]) if known is not None else 0.0,
                                         rejected=bool(result.rejected[i])))
    return pb.ClassifyResponse(results=results, model_name=result.model_name, model_version=result.model_version)


def model_info_response(info: dict) -> pb.GetModelInfoResponse:
    fields = dict(info)
    fields["manifest_json"] = json.dumps(fields.pop("manifest_raw"), sort_keys=True)
    return pb.GetModelInfoResponse(**fields)


class DigitServicer(pb_grpc.DigitServiceServicer):
    def __init__(self, core: InferenceCore) -> None:
        self.core = core

    async def Classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyResponse:
        result = await self.core.classify(_items(request.images), top_k=request.top_k,
                                          invert=request.options.invert, fit=request.options.fit,
                                          deadline=_deadline(context))
        return classify_response(result, request.return_logits, request.return_inputs)

    async def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        result = await self.core.embed(_items(request.images), l2_normalize=request.l2_normalize,
                                       invert=request.options.invert, fit=request.options.fit,
                                       deadline=_deadline(context))
        embedding = result.embedding
        return pb.EmbedResponse(embeddings=[pb.Embedding(values=row) for row in embedding.tolist()],
                                dim=embedding.shape[1], model_name=result.model_name,
                                model_version=result.model_version)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.GetModelInfoResponse:
        return model_info_response(self.core.model_info())
