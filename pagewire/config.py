"""Service configuration: one dataclass per service, read from flags and environment.

Each field is declared once, with its default and help; :func:`parse` turns the dataclass into
command-line flags (``--max-num-seqs``), and every flag can also come from the environment as
``PAGEWIRE_MAX_NUM_SEQS`` (flags win). ``REDIS_URL`` is honoured as the standard name for Redis.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


def opt(default: Any, help: str, env: str | None = None) -> Any:
    """A config field: default, help text, and optionally an extra environment variable name."""
    return field(default=default, metadata={"help": help, "env": env})


@dataclass
class CommonConfig:
    redis_url: str = opt("", "Redis URL: redis://[:password@]host:port/db, rediss:// (TLS), unix:///path, or redis+cluster://host:port for a Redis Cluster. Empty: none.", "REDIS_URL")
    deployment: str = opt("default", "Deployment name: namespaces every Redis key.")
    log_level: str = opt("INFO", "Python log level.")
    log_format: str = opt("text", "text, or json (one object per line with request_id and trace_id).")
    metrics_port: int = opt(-1, "Port for Prometheus /metrics over HTTP (0: any free port; -1: off).")
    drain_timeout_s: float = opt(30.0, "On SIGTERM: stop accepting, finish in-flight work for this long, then exit.")
    tls_cert: str = opt("", "PEM certificate this service presents (as server, and as client for mTLS). Empty: plaintext.")
    tls_key: str = opt("", "PEM private key for --tls-cert.")
    tls_ca: str = opt("", "PEM CA bundle that peers' certificates must chain to (verifies servers we dial).")
    tls_client_auth: bool = opt(False, "mTLS: require clients to present a certificate signed by --tls-ca.")


@dataclass
class WorkerConfig(CommonConfig):
    model: str = opt("", "Hugging Face model directory (config.json, *.safetensors).")
    served_model_name: str = opt("", "Name clients use for the model. Empty: the directory name.")
    host: str = opt("127.0.0.1", "Address to listen on.")
    port: int = opt(0, "Port to listen on (0: any free port; the chosen one is printed).")
    worker_id: str = opt("", "Stable worker id for the registry. Empty: host:port.")
    advertise: str = opt("", "Address the scheduler should dial. Empty: host:port.")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N.")
    dtype: str = opt("auto", "auto (the model's dtype on GPU, float32 on CPU), float32, float16, bfloat16.")
    block_size: int = opt(16, "Tokens per KV block.")
    num_blocks: int = opt(0, "KV blocks to allocate. 0: size from --kv-cache-gb / GPU memory.")
    kv_cache_gb: float = opt(0.5, "KV cache size on CPU when --num-blocks is 0.")
    gpu_memory_utilization: float = opt(0.9, "Share of free GPU memory for the KV cache.")
    max_model_len: int = opt(0, "Longest sequence. 0: the model's max_position_embeddings.")
    attention_backend: str = opt("auto", "auto (triton on CUDA, cpu on CPU), cpu (compiled decode), torch, triton, reference (the plain oracle).")
    threads: int = opt(0, "torch CPU threads. 0: torch's default.")
    heartbeat_s: float = opt(2.0, "Seconds between registry heartbeats (TTL is 3x).")
    load_format: str = opt("auto", "auto (safetensors from --model), or dummy (random weights from config.json).")
    group: str = opt("default", "Worker group to join: a scheduler without --workers drives the registered workers of its --group.")
    packed_weights: bool = opt(True, "On a CPU (float32, or bfloat16 with AVX-512 BF16/AMX): pack the projection weights once at start-up for oneDNN's kernels; bfloat16 on a CPU without bfloat16 kernels: products of 8+ rows run in float32 (widened per call, rounded once). --no-packed-weights: plain F.linear, which in bfloat16 re-lays the weight on every call (or runs a slow reference loop without AVX-512 BF16) and in float32 runs MKL's sgemm, slow at a few rows.")
    cuda_graphs: bool = opt(True, "On CUDA: capture decode steps as CUDA graphs at start-up and replay them (--no-cuda-graphs: launch every kernel eagerly).")
    max_num_seqs: int = opt(256, "Largest decode batch captured as a CUDA graph (match the scheduler's --max-num-seqs); larger batches run eagerly.")
    max_num_batched_tokens: int = opt(2048, "Most tokens in one step (match the scheduler's --max-num-batched-tokens): the largest row count the CPU warm-up builds products for.")
    warmup_s: float = opt(0.0, "On a CPU with packed weights: seconds at most, before reporting healthy, to run each packed projection once at every row count steps use (decode batches first, then prefill sizes up to --max-num-batched-tokens), so oneDNN builds those products (~2 ms each) now rather than in the first requests' steps; costs resident memory for every product built (measured: +690 MiB for the small test model at 5 s). 0: build each on first use.")


@dataclass
class SchedulerConfig(CommonConfig):
    host: str = opt("127.0.0.1", "Address to listen on.")
    port: int = opt(0, "Port to listen on (0: any free port).")
    workers: str = opt("", "Comma-separated worker addresses. Empty: discover from the Redis registry.")
    model_name: str = opt("", "Model name for Redis keys. Empty: the workers' served model name.")
    max_num_seqs: int = opt(256, "Most sequences in one step.")
    max_num_batched_tokens: int = opt(2048, "Most tokens (decodes + prefill chunks) in one step.")
    max_encoder_tokens: int = opt(4096, "Most image placeholder tokens whose vision encoding may start in one step (the first image of a step always runs).")
    max_queue: int = opt(4096, "Most waiting requests; past it a submit is refused with RESOURCE_EXHAUSTED.")
    prefix_caching: bool = opt(True, "Reuse cached KV blocks of shared prefixes.")
    priority_aging_s: float = opt(10.0, "A waiting request gains one priority level per this many seconds.")
    heartbeat_check_s: float = opt(1.0, "Seconds between checks of each worker's heartbeat key.")
    check_invariants: bool = opt(False, "Assert block invariants after every step (tests).")
    group: str = opt("default", "Worker group this scheduler drives; one scheduler per group holds its lease in Redis.")
    lease_ttl_s: float = opt(10.0, "Scheduler lease TTL; a standby replica takes over this long after the holder dies.")
    store_timeout_s: float = opt(10.0, "Redis silent for longer than this: health NOT_SERVING until it answers (streams wait meanwhile).")
    advertise: str = opt("", "Address routers should dial, published in Redis. Empty: host:port.")
    hold_after_first_token: bool = opt(True, "CPU workers: a step that gives a request its first token is written to Redis and sent to the routers before the worker gets its next step, so that this delivery does not wait for CPU behind the worker's compute (TTFT; the worker waits a few ms, once per request). GPU workers always get the next step at once.")
    join_new_requests: bool = opt(True, "CPU workers: a request that arrives after the worker's next step was sent (--step-lead-ms) but before the worker began it is sent at once as a step the worker runs inside that one, instead of waiting for it to end (TTFT). GPU workers get each step at once anyway.")
    step_lead_ms: float = opt(3.0, "Send each worker its next step this long before the step it is computing should end (predicted from its recent step times), so requests arriving meanwhile join it. CPU workers only (a GPU worker gets each step at once). Negative: send as soon as it may go.")


@dataclass
class RouterConfig(CommonConfig):
    model: str = opt("", "Model directory (tokenizer files and config.json).")
    served_model_name: str = opt("", "Name clients use for the model. Empty: the directory name.")
    host: str = opt("127.0.0.1", "Address to listen on.")
    port: int = opt(0, "Port to listen on (0: any free port).")
    scheduler: str = opt("", "One fixed scheduler for every request (host:port). Empty: one per live worker group, found in Redis (--redis-url).")
    max_prompt_chars: int = opt(1 << 20, "Longest prompt text accepted, in characters.")
    resume_timeout_s: float = opt(60.0, "How long to keep re-attaching to a restarting scheduler.")
    http_port: int = opt(-1, "Port for the OpenAI-compatible HTTP API (0: any free port; -1: off).")
    api_key: str = opt("", "Bearer token the public API requires (gRPC 'authorization' metadata, HTTP header). Empty: none.", "PAGEWIRE_API_KEY")
    routing_policy: str = opt("prefix", "prefix (cached tokens vs load), least-load, or round-robin.")
    chat_template: str = opt("", "Jinja chat template file. Empty: the tokenizer's own.")
    tool_call_parser: str = opt("", "Parse tool calls out of chat output for tool_choice auto: hermes, llama3_json or mistral (vLLM's --tool-call-parser). Empty: auto is refused.")
    reasoning_parser: str = opt("", "Split chat output into reasoning_content and content: deepseek_r1 or qwen3. Empty: off.")
    max_n: int = opt(16, "Most completions per request (n).")
    max_stop_strings: int = opt(16, "Most stop strings per request.")
    max_logprobs: int = opt(20, "Most top logprobs per token.")
    max_model_len: int = opt(0, "Longest sequence the workers run (match the workers' --max-model-len). 0: the model's max_position_embeddings.")
    max_images: int = opt(8, "Most images per request (vision-language models).")
    max_image_pixels: int = opt(4096 * 4096, "Largest image accepted, in decoded pixels (width x height).")
    max_image_bytes: int = opt(6 << 20, "Most encoded image bytes per request (inline, data: URLs and fetched, in all).")
    image_url_hosts: str = opt("", "Comma-separated hosts whose http(s) image URLs the router fetches (* any). Empty: fetching off.")
    image_fetch_timeout_s: float = opt(10.0, "Time limit of one image URL fetch, in seconds.")
    image_cache_bytes: int = opt(256 << 20, "Preprocessed images kept by their encoded bytes' hash, so a repeated image is not decoded or preprocessed again (LRU, pixel bytes). 0: off.")


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return "PAGEWIRE_" + name.upper()


def _env_default(f: dataclasses.Field[Any]) -> Any:
    for var in (env_name(f.name), f.metadata.get("env")):
        if var and var in os.environ:
            return type(f.default)(os.environ[var]) if not isinstance(f.default, bool) else (
                os.environ[var].lower() in ("1", "true", "yes")
            )
    return f.default


def add_arguments(
    parser: argparse.ArgumentParser, cls: type, only: Sequence[str] | None = None
) -> None:
    """Add one flag per field of the config dataclass ``cls`` (``only``: just these fields, as
    ``pagewire up`` offers a chosen few of each service's, named and documented the same)."""
    fields = dataclasses.fields(cls)
    if only is not None:
        unknown = set(only) - {f.name for f in fields}
        if unknown:
            raise ValueError(f"{cls.__name__} has no fields {sorted(unknown)}")
        fields = tuple(f for f in fields if f.name in only)
    for f in fields:
        env = env_name(f.name) + (f" or {f.metadata['env']}" if f.metadata.get("env") else "")
        kind: dict[str, Any] = (
            {"action": argparse.BooleanOptionalAction}
            if isinstance(f.default, bool)
            else {"type": type(f.default)}
        )
        parser.add_argument(
            flag_name(f.name),
            dest=f.name,
            default=_env_default(f),
            help=f"{f.metadata.get('help', '')} (env {env}; default %(default)r)",
            **kind,
        )


def flag_args(cls: type, values: dict[str, Any]) -> list[str]:
    """``values`` of fields of ``cls`` as that service's flags; a value the service would take by
    itself (its default, or what the shared environment already says) is left out."""
    args: list[str] = []
    for f in dataclasses.fields(cls):
        if f.name not in values or values[f.name] == _env_default(f):
            continue
        v = values[f.name]
        if isinstance(f.default, bool):
            args.append(flag_name(f.name) if v else "--no-" + f.name.replace("_", "-"))
        else:
            args += [flag_name(f.name), str(v)]
    return args


def parse(cls: type[T], argv: Sequence[str] | None = None, prog: str | None = None) -> T:
    parser = argparse.ArgumentParser(prog=prog, description=cls.__doc__)
    add_arguments(parser, cls)
    ns = parser.parse_args(argv)
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})  # type: ignore[call-arg]
