"""Where one image chat's time to first token goes, with and without an image prefix hit.

    python bench/image_ttft.py --rounds 5 --modes off,on,off,on

Starts the stack (Redis, worker, scheduler, router; the small LLaVA test model, or ``--arch
qwen2_5_vl``'s small Qwen2.5-VL) once per mode --
``off``: the router's image cache off (``--image-cache-bytes 0``), ``on``: the default -- with
OpenTelemetry's console exporter, so each request's spans land in the service logs. Each round
sends ``--concurrent`` chats at once (default 1), each with ``--images`` new random PNGs, then the
very same chats again (prefix hits), and splits each TTFT by the spans' wall-clock times:

- router: the client's send to the router's span start (parse, fetch/decode/preprocess/hash the
  images, template, tokenize, validate);
- submit: the router's span start to the scheduler's arrival (placement, the SubmitRequest with
  pixels over gRPC);
- sched: arrival to the first step sent (queue, admission, Redis writes of the request and its
  pixels);
- worker: the first prefill chunk's start to the last chunk's end (encode + prefill; a hit
  encodes nothing);
- return: the rest (token back to the scheduler, router, client).

Medians per
mode and kind. Modes alternate as given, so a noisy machine affects both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image

from pagewire import serving
from pagewire.launcher import start_stack
from pagewire.v1 import common_pb2, generation_pb2, generation_pb2_grpc

MODELS = Path.home() / ".cache/pagewire/models"
PARTS = ("router", "submit", "sched", "worker", "return")


def model_dir(arch: str) -> Path:
    return MODELS / f"{arch.replace('_', '')}-small-seed0"  # llava-small-seed0 as before


def png(rng: np.random.Generator, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def chat(rid: str, images: list[bytes], text: str) -> generation_pb2.GenerateRequest:
    parts = [generation_pb2.ContentPart(image=generation_pb2.ImagePart(data=d)) for d in images]
    parts.append(generation_pb2.ContentPart(text=text))
    return generation_pb2.GenerateRequest(
        request_id=rid, sampling=common_pb2.SamplingParams(temperature=0, max_tokens=4),
        chat=generation_pb2.Chat(messages=[generation_pb2.ChatMessage(role="user", parts=parts)]))


async def ttft(stub: generation_pb2_grpc.GenerationStub, request) -> tuple[int, int, int]:
    """(send, first token, cached tokens) in wall-clock ns."""
    sent, first, cached = time.time_ns(), 0, 0
    async for resp in stub.Generate(request):
        if resp.token_ids and not first:
            first = time.time_ns()
        if resp.HasField("usage"):
            cached = resp.usage.cached_tokens
    return sent, first, cached


async def run_mode(mode: str, args: argparse.Namespace, logs: Path, seed: int) -> list[dict]:
    env = {"OTEL_TRACES_EXPORTER": "console", "OTEL_BSP_SCHEDULE_DELAY": "200"}
    router_args = ["--image-cache-bytes", "0"] if mode == "off" else []
    stack = await start_stack(str(model_dir(args.arch)), worker_args=["--threads", str(args.threads)],
                              router_args=router_args, log_dir=logs, env=env)
    rng = np.random.default_rng(seed)
    size = tuple(int(x) for x in args.image_size.split("x"))
    sent = []
    try:
        async with serving.insecure_channel(stack.router) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            await ttft(stub, chat("warm", [png(rng, size)], "warm up"))
            for r in range(args.rounds):
                chats = [([png(rng, size) for _ in range(args.images)],
                          " ".join(f"word{rng.integers(1000)}" for _ in range(args.words)))
                         for _ in range(args.concurrent)]
                for kind in ("new", "hit"):
                    rids = [f"{mode}-{seed}-{r}-{kind}-{j}" for j in range(len(chats))]
                    got = await asyncio.gather(*(ttft(stub, chat(rid, images, text))
                                                 for rid, (images, text) in zip(rids, chats, strict=True)))
                    sent += [{"mode": mode, "kind": kind, "rid": rid, "send": s, "first": f,
                              "cached": c} for rid, (s, f, c) in zip(rids, got, strict=True)]
    finally:
        stack.stop()
    await asyncio.sleep(1)
    return breakdown(sent, spans(logs))


def spans(logs: Path) -> list[dict]:
    """Every span the console exporter wrote into the service logs."""
    dec, out = json.JSONDecoder(), []
    for log in logs.glob("*.log"):
        text = log.read_text(errors="replace")
        i = text.find("{\n")
        while i >= 0:
            try:
                obj, end = dec.raw_decode(text, i)
            except json.JSONDecodeError:
                end = i + 2
            else:
                if isinstance(obj, dict) and "name" in obj and "start_time" in obj:
                    out.append(obj)
            i = text.find("{\n", end)
    return out


def ns(stamp: str) -> int:
    dt = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return int(dt.timestamp()) * 10**9 + dt.microsecond * 1000


def breakdown(sent: list[dict], all_spans: list[dict]) -> list[dict]:
    by_trace: dict[str, list[dict]] = {}
    for s in all_spans:
        by_trace.setdefault(s["context"]["trace_id"], []).append(s)
    root = {s["attributes"].get("pagewire.request_id"): s["context"]["trace_id"]
            for s in all_spans if s["name"] == "pagewire.router.generate"}
    for rec in sent:
        group = by_trace.get(root.get(rec["rid"], ""), [])
        first = {n: min((ns(s["start_time"]) for s in group if s["name"] == n), default=0)
                 for n in ("pagewire.router.generate", "pagewire.scheduler.queue",
                           "pagewire.scheduler.schedule", "pagewire.worker.step")}
        steps = [s for s in group if s["name"] == "pagewire.worker.step"]
        w_end = max((ns(s["end_time"]) for s in steps), default=0)
        if not all(first.values()):
            continue
        rec["ms"] = {
            "router": first["pagewire.router.generate"] - rec["send"],
            "submit": first["pagewire.scheduler.queue"] - first["pagewire.router.generate"],
            "sched": first["pagewire.worker.step"] - first["pagewire.scheduler.queue"],
            "worker": w_end - first["pagewire.worker.step"],
            "return": rec["first"] - w_end,
            "ttft": rec["first"] - rec["send"],
        }
        rec["ms"] = {k: v / 1e6 for k, v in rec["ms"].items()}
    return sent


def table(records: list[dict], modes: list[str]) -> str:
    rows = ["| cache | request | n | TTFT | " + " | ".join(PARTS) + " | cached tokens |",
            "|---|---|---:|---:|" + "---:|" * len(PARTS) + "---:|"]
    for mode in dict.fromkeys(modes):
        for kind in ("new", "hit"):
            rs = [r for r in records if r["mode"] == mode and r["kind"] == kind and "ms" in r]
            if not rs:
                continue
            med = {k: statistics.median(r["ms"][k] for r in rs) for k in ("ttft", *PARTS)}
            cached = statistics.median(r["cached"] for r in rs)
            rows.append(f"| {mode} | {kind} | {len(rs)} | {med['ttft']:.1f} | "
                        + " | ".join(f"{med[p]:.1f}" for p in PARTS) + f" | {cached:.0f} |")
    return "\n".join(rows)


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--modes", default="off,on,off,on", help="router image cache per stack start")
    p.add_argument("--concurrent", type=int, default=1, help="chats sent at once per round")
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--image-size", default="640x480")
    p.add_argument("--words", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--arch", default="llava", choices=("llava", "qwen2_5_vl"),
                   help="the small test model of this vision-language family")
    p.add_argument("--out", default="bench_image_ttft.json")
    args = p.parse_args()
    model = model_dir(args.arch)
    if not (model / "config.json").exists():
        from pagewire.testmodel_qwenvl import make_qwenvl_model
        from pagewire.testmodel_vlm import make_llava_model

        make = make_llava_model if args.arch == "llava" else make_qwenvl_model
        make(model, seed=0, size="small")
    modes = args.modes.split(",")
    records = []
    for i, mode in enumerate(modes):
        logs = Path(tempfile.mkdtemp(prefix=f"image-ttft-{mode}-"))
        records += await run_mode(mode, args, logs, seed=i)
    print(table(records, modes))
    Path(args.out).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
