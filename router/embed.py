"""Embeddings: a prompt's final hidden states, pooled by a worker.

The router submits an ordinary scheduler request with ``pooling`` set and ``max_tokens=1`` (the
scheduler runs the prompt and samples nothing); its one and last event carries the pooled vector.
Normalizing is done here, on the one vector, rather than on the worker.
"""

from __future__ import annotations

import uuid

import grpc
import numpy as np

from pagewire.v1 import common_pb2, generation_pb2, scheduler_pb2
from router.errors import RequestError
from router.generation import MAX_REQUEST_ID_CHARS
from router.model import ServedModel
from router.placement import Placer

POOLINGS = (common_pb2.POOLING_MEAN, common_pb2.POOLING_LAST)


async def prepare_embed(
    model: ServedModel, request: generation_pb2.EmbedRequest
) -> scheduler_pb2.SubmitRequest:
    """Validate and tokenize; the scheduler request to submit."""
    model.check_name(request.model)
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise RequestError.invalid("request_id", f"at most {MAX_REQUEST_ID_CHARS} characters")
    pooling = request.pooling or common_pb2.POOLING_MEAN
    if pooling not in POOLINGS:
        raise RequestError.invalid(
            "pooling", f"must be POOLING_MEAN or POOLING_LAST, got {pooling}"
        )
    prompt = await model.prompt_ids(request, "input")
    if not prompt:
        raise RequestError.invalid("input", "must not be empty")
    if len(prompt) >= model.max_model_len:  # the scheduler runs it as prompt + 1 token
        raise RequestError.invalid(
            "input", f"is {len(prompt)} tokens; the limit is {model.max_model_len - 1}"
        )
    return scheduler_pb2.SubmitRequest(
        request_id=request.request_id or uuid.uuid4().hex,
        prompt_token_ids=prompt,
        sampling=common_pb2.SamplingParams(max_tokens=1),
        pooling=pooling,
    )


async def embed(
    placer: Placer, submit: scheduler_pb2.SubmitRequest, normalize: bool
) -> generation_pb2.EmbedResponse:
    """Run a prepared embedding request; wait for the event that carries the vector."""
    rid = submit.request_id
    placer.ids.claim([rid], rid)
    try:
        placement = await placer.place(list(submit.prompt_token_ids))
    except BaseException:
        placer.ids.release([rid])
        raise
    submit.worker_id, link = placement.worker_id, placement.link
    queue = link.submit(submit)
    finished = False
    try:
        while not finished:
            event = await queue.get()
            if event.error_code:
                raise RequestError.from_code(event.error_code, event.error_message)
            finished = event.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
    finally:
        link.finish(rid, abort=not finished)
        placer.ids.release([rid])
    if not event.embedding:
        raise RequestError(
            grpc.StatusCode.INTERNAL, "embedding", "the worker returned none (does it pool?)"
        )
    vector = np.asarray(event.embedding, dtype=np.float32)
    if normalize:
        vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
    return generation_pb2.EmbedResponse(
        request_id=rid,
        embedding=vector.tolist(),
        usage=common_pb2.Usage(
            prompt_tokens=len(submit.prompt_token_ids), cached_tokens=event.cached_tokens
        ),
    )
