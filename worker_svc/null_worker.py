"""A worker with no model: the same gRPC service, answering every step at once.

For measuring the control plane (scheduler, Redis, router) without model compute, and for wide
fleets in routing benchmarks. It keeps the same per-sequence cache as the real runner (so
``unknown_seq_ids`` and "feed the last sample" behave the same) and samples a token that depends
only on the sequence and the output index, never an end-of-sequence token. ``--vocab-size``
keeps those tokens inside a real tokenizer's vocabulary (a router then detokenizes them), and
``--step-ms`` holds each step that long, so the router and scheduler see a real worker's pace.

Start: ``python -m worker_svc.null_worker --port P --num-blocks N [--worker-id ID]
[--vocab-size V] [--step-ms MS]``.
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence

import grpc

from pagewire import guarded_service, serving
from pagewire.v1 import worker_pb2, worker_pb2_grpc

SERVICE = "pagewire.v1.Worker"
VOCAB = 32000
FIRST_TOKEN = 16  # below are "special" ids; never sampled


class NullWorker(worker_pb2_grpc.WorkerServicer):
    def __init__(self, info: worker_pb2.WorkerInfo, step_s: float = 0.0) -> None:
        self.info = info
        self.vocab = info.vocab_size or VOCAB
        self.step_s = step_s

    async def Describe(
        self, request: worker_pb2.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.WorkerInfo:
        return self.info

    async def Execute(
        self, request_iterator: AsyncIterator[worker_pb2.Step], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.StepResult]:
        known: set[int] = set()
        async for step in request_iterator:
            known.difference_update(step.release_seq_ids)
            d = step.decodes
            unknown = [s.seq_id for s in step.seqs if not s.new and s.seq_id not in known]
            unknown += [i for i in d.seq_ids if i not in known]
            if unknown:
                yield worker_pb2.StepResult(step_id=step.step_id, unknown_seq_ids=unknown)
                continue
            known.update(s.seq_id for s in step.seqs if s.new)
            sampled = [s for s in step.seqs if s.sample]
            seq_ids = [*d.seq_ids, *(s.seq_id for s in sampled)]
            indices = [*d.output_indices, *(s.output_index for s in sampled)]
            if self.step_s:
                await asyncio.sleep(self.step_s)
            yield worker_pb2.StepResult(
                step_id=step.step_id,
                seq_ids=seq_ids,
                token_ids=[FIRST_TOKEN + (i * 31 + j) % (self.vocab - FIRST_TOKEN)
                           for i, j in zip(seq_ids, indices, strict=True)],
            )


async def serve(args: argparse.Namespace) -> None:
    server, health_servicer = serving.new_server([SERVICE])
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    info = worker_pb2.WorkerInfo(
        worker_id=args.worker_id or f"{args.host}:{port}",
        model=args.model_name,
        dtype="none",
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        max_model_len=args.max_model_len,
        vocab_size=args.vocab_size,
        eos_token_ids=[1],
        attention_backend="none",
        device="none",
        instance_id=uuid.uuid4().hex,
    )
    worker = NullWorker(info, args.step_ms / 1e3)
    guarded_service.add_service(server, worker_pb2.DESCRIPTOR.services_by_name["Worker"], worker)
    await server.start()
    await serving.set_serving(health_servicer, [SERVICE], True)
    await serving.run_until_signalled(server, health_servicer, [SERVICE])


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="pagewire-null-worker", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--worker-id", default="")
    p.add_argument("--model-name", default="null")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=65536)
    p.add_argument("--max-model-len", type=int, default=32768)
    p.add_argument("--vocab-size", type=int, default=VOCAB, help="tokens are drawn below this")
    p.add_argument("--step-ms", type=float, default=0.0, help="how long each step takes")
    args = p.parse_args(argv)
    serving.run_main(lambda: serve(args))


if __name__ == "__main__":
    main()
