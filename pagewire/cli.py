"""The ``pagewire`` command line.

    pagewire up [--model DIR] [--port 50051]     run Redis, worker, scheduler and router locally
    pagewire generate "text" [--max-tokens N]    stream a completion from a router
    pagewire make-model DIR [--seed N] [--size] [--arch A]  build a random-weight test model
    pagewire worker|scheduler|router [flags]     run one service (what containers run)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import runpy
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from pagewire.config import add_arguments, flag_args

DEFAULT_ADDR = "127.0.0.1:50051"
# make-model --arch: pagewire.testmodel_arch.ARCHS (kept here so --help needs no torch import).
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "mixtral",
         "qwen3_moe", "llava", "qwen2_5_vl")
# The service settings ``pagewire up`` offers, as ``vllm serve`` does: each flag named, typed and
# documented as the service's own (pagewire/config.py) and handed to every service that has it
# (``--served-model-name`` and ``--max-model-len`` reach worker and router, ``--max-num-seqs``
# and ``--max-num-batched-tokens`` scheduler and worker). Every other setting stays reachable
# as PAGEWIRE_<FLAG>.
UP_FLAGS = {
    "scheduler": ("max_num_seqs", "max_num_batched_tokens", "max_queue", "prefix_caching"),
    "worker": ("dtype", "device", "max_model_len", "kv_cache_gb", "num_blocks", "block_size",
               "threads", "attention_backend", "served_model_name", "load_format",
               "gpu_memory_utilization", "cuda_graphs"),
    "router": ("chat_template", "tool_call_parser", "reasoning_parser", "routing_policy", "max_n",
               "max_logprobs"),
}
SERVICES = {"worker": "worker_svc.server", "scheduler": "scheduler_svc.server", "router": "router.server"}


def default_model_dir() -> Path:
    root = Path(os.environ.get("PAGEWIRE_CACHE", Path.home() / ".cache" / "pagewire"))
    return root / "models" / "tiny-seed0"


def cmd_make_model(args: argparse.Namespace) -> None:
    if args.arch == "llama":  # the default test model, written without transformers
        from pagewire.testmodel import make_model

        path = make_model(args.dir, seed=args.seed, size=args.size)
    elif args.arch == "llava":  # vision-language: CLIP tower + projector + the Llama decoder
        from pagewire.testmodel_vlm import make_llava_model

        path = make_llava_model(args.dir, seed=args.seed, size=args.size)
    elif args.arch == "qwen2_5_vl":  # vision-language: window-attention ViT + Qwen2 with M-RoPE
        from pagewire.testmodel_qwenvl import make_qwenvl_model

        path = make_qwenvl_model(args.dir, seed=args.seed, size=args.size)
    else:
        from pagewire.testmodel_arch import make_arch_model

        path = make_arch_model(args.dir, args.arch, seed=args.seed, size=args.size)
    print(f"wrote {args.size} {args.arch} test model (seed {args.seed}) to {path}")


def _config_classes() -> dict[str, type]:
    from pagewire.config import RouterConfig, SchedulerConfig, WorkerConfig

    return {"scheduler": SchedulerConfig, "worker": WorkerConfig, "router": RouterConfig}


def add_up_flags(parser: argparse.ArgumentParser) -> None:
    added: set[str] = set()
    for service, cls in _config_classes().items():
        names = [n for n in UP_FLAGS[service] if n not in added]
        add_arguments(parser, cls, only=names)
        added.update(names)


def up_service_args(args: argparse.Namespace) -> dict[str, list[str]]:
    """The flags ``up`` hands each service: every UP_FLAGS setting the service has, whichever
    service's list offered it."""
    offered = {n for names in UP_FLAGS.values() for n in names}
    values = {n: getattr(args, n) for n in offered}
    return {service: flag_args(cls, values) for service, cls in _config_classes().items()}


async def _up(args: argparse.Namespace) -> int:
    from pagewire.launcher import start_stack

    model = args.model
    if not model:
        from pagewire.testmodel import ensure_model

        model = str(ensure_model(default_model_dir(), seed=0, size="tiny"))
        print(f"pagewire up: serving the test model at {model}", flush=True)
    service_args = up_service_args(args)
    router_args = ["--http-port", str(args.http_port), *service_args["router"]]
    if args.api_key:
        router_args += ["--api-key", args.api_key]
    # Ctrl-C / SIGTERM at any moment, starting included, stops whatever has started: a start
    # cancelled half-way stops its services itself (start_stack), so none outlives `up`.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.ensure_future(start_stack(
        model,
        router_port=args.port,
        worker_args=service_args["worker"],
        scheduler_args=service_args["scheduler"],
        router_args=router_args,
        num_workers=args.num_workers,
        log_dir=Path(args.log_dir) if args.log_dir else None,
    ))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        print("pagewire up: stopped while starting", flush=True)
        return 0
    try:
        stack = starting.result()
    except RuntimeError as e:  # a service died while starting: its reason, not a traceback
        print(f"pagewire up: {e}", file=sys.stderr)
        return 1
    finally:
        stopping.cancel()
    try:
        print(f"pagewire up: router listening on {stack.router}", flush=True)
        if args.http_port >= 0:
            print(f"pagewire up: OpenAI-compatible API on http://127.0.0.1:{args.http_port}/v1",
                  flush=True)
        print(f'pagewire up: try  pagewire generate --addr {stack.router} "Once upon a time"', flush=True)
        while not stop.is_set():
            dead = [s for s in stack.services if s.process.poll() is not None]
            for svc in dead:
                print(f"pagewire up: {svc.exited('while serving')}", file=sys.stderr)
            if dead:
                print("pagewire up: stopping the rest", file=sys.stderr)
                return 1
            try:
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            except TimeoutError:
                pass
        return 0
    finally:
        print("pagewire up: stopping", flush=True)
        stack.stop()


async def _generate(args: argparse.Namespace) -> int:
    import grpc

    from pagewire import auth, serving
    from pagewire.tls import TLSFiles
    from pagewire.v1 import common_pb2, generation_pb2, generation_pb2_grpc

    sampling = common_pb2.SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, stop=args.stop or [], ignore_eos=args.ignore_eos,
    )
    if args.seed is not None:
        sampling.seed = args.seed
    request = generation_pb2.GenerateRequest(text=args.prompt, sampling=sampling)
    tls = TLSFiles.load("", "", args.tls_ca) if args.tls_ca else None
    async with serving.open_channel(args.addr, tls) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        try:
            async for resp in stub.Generate(request, metadata=auth.bearer_metadata(args.api_key)):
                sys.stdout.write(resp.text)
                sys.stdout.flush()
                if resp.finish_reason:
                    reason = common_pb2.FinishReason.Name(resp.finish_reason)
                    u = resp.usage
                    print(f"\n[{reason.removeprefix('FINISH_REASON_').lower()}: prompt {u.prompt_tokens}"
                          f" tokens, completion {u.completion_tokens} tokens]", file=sys.stderr)
        except grpc.aio.AioRpcError as e:
            print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagewire", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the whole stack locally")
    up.add_argument("--model", default="", help="model directory (default: build the test model)")
    up.add_argument("--port", type=int, default=50051, help="router port")
    up.add_argument("--num-workers", type=int, default=1, help="workers (one scheduler drives them)")
    up.add_argument("--http-port", type=int, default=8000,
                    help="router's OpenAI-compatible HTTP port (-1: off)")
    up.add_argument("--api-key", default=os.environ.get("PAGEWIRE_API_KEY", ""),
                    help="bearer token the public API requires (env PAGEWIRE_API_KEY)")
    up.add_argument("--log-dir", default="", help="write each service's log here")
    add_up_flags(up)

    gen = sub.add_parser("generate", help="stream a completion to the terminal")
    gen.add_argument("prompt")
    gen.add_argument("--addr", default=os.environ.get("PAGEWIRE_ADDR", DEFAULT_ADDR))
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--api-key", default=os.environ.get("PAGEWIRE_API_KEY", ""),
                     help="bearer token (env PAGEWIRE_API_KEY)")
    gen.add_argument("--tls-ca", default="", help="CA bundle: dial the router over TLS")

    mk = sub.add_parser("make-model", help="build a random-weight test model")
    mk.add_argument("dir")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--size", choices=["tiny", "small"], default="tiny")
    mk.add_argument("--arch", default="llama", choices=ARCHS,
                    help="model family (all share the test tokenizer)")

    for name in SERVICES:
        sub.add_parser(name, help=f"run the {name} service (flags: pagewire {name} --help)",
                       add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SERVICES:  # hand the rest of the flags to the service itself
        sys.argv = [f"pagewire {argv[0]}", *argv[1:]]
        runpy.run_module(SERVICES[argv[0]], run_name="__main__")
        return 0
    args = build_parser().parse_args(argv)
    if args.command == "make-model":
        cmd_make_model(args)
    elif args.command == "up":
        try:
            return asyncio.run(_up(args))
        except KeyboardInterrupt:
            pass
    elif args.command == "generate":
        return asyncio.run(_generate(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
