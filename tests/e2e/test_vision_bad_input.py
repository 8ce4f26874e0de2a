"""Bad image input, over gRPC and over HTTP, against a live stack of each vision-language test
model (LLaVA, Qwen2.5-VL): refused, naming the part.

The router runs with small image limits; a second router on the same scheduler fetches http(s)
image URLs from 127.0.0.1 only, and a loopback HTTP server plays the image host (one path
serves a PNG, one answers 404; a closed port is unreachable). A fetched image that passes is
answered exactly as transformers answers the same pixels.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import vlm_cases
from e2e_util import launch, run_concurrently
from PIL import Image
from test_bad_input_table import http_error

from pagewire import serving
from pagewire.launcher import Stack, free_port
from pagewire.v1 import common_pb2, generation_pb2, generation_pb2_grpc

MAX_IMAGES, MAX_PIXELS, MAX_BYTES = 2, 40_000, 60_000
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def solid_png(w: int, h: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 90)).save(out, format="PNG")
    return out.getvalue()


def noise_png(seed: int, side: int) -> bytes:
    return vlm_cases.png(vlm_cases.image(seed, (side, side)))


GOOD_IMAGE = vlm_cases.image(3, (40, 64))
GOOD = vlm_cases.png(GOOD_IMAGE)
PNG = noise_png(1, 30)
TRUNCATED = PNG[: len(PNG) // 2]
BIG = solid_png(300, 200)  # 60,000 pixels in a few hundred bytes
HEAVY = noise_png(2, 120)  # ~43 KB each: two are over MAX_BYTES


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@dataclass(frozen=True)
class Row:
    name: str
    field: str
    images: list[bytes | str]  # bytes: inline (gRPC) / data URL (HTTP); str: a URL as given
    text: str = "What is this?"


TABLE = [
    Row("not an image", "messages[0].content[0]", [b"hello, I am text"]),
    Row("truncated PNG", "messages[0].content[0]", [TRUNCATED]),
    Row("too many images", f"messages[0].content[{MAX_IMAGES}]", [PNG] * (MAX_IMAGES + 1)),
    Row("too many pixels", "messages[0].content[0]", [BIG]),
    Row("too many bytes", "messages[0].content[1]", [HEAVY, noise_png(3, 120)]),
    Row("URL while fetching is off", "messages[0].content[0]", ["http://127.0.0.1:9/x.png"]),
    Row("not a data or http URL", "messages[0].content[0]", ["file:///etc/passwd"]),
    Row("data URL not base64", "messages[0].content[0]", ["data:image/png;base64,@@@"]),
]


def table(model: Path) -> list[Row]:
    """TABLE, plus the model's own placeholder typed as text (and Qwen's video placeholder)."""
    token = vlm_cases.processor(model).image_token
    rows = [*TABLE, Row("placeholder typed as text", "messages", [PNG], text=f"look: {token}")]
    if token == "<|image_pad|>":
        rows.append(Row("video placeholder typed as text", "messages", [PNG],
                        text="watch: <|video_pad|>"))
    return rows


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    """A loopback HTTP server: /good.png is an image, anything else 404."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            if self.path == "/good.png":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(GOOD)))
                self.end_headers()
                self.wfile.write(GOOD)
            else:
                self.send_error(404)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def stacks(vlm_model: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[Stack, str, str, Path]]:
    """(stack, its router's HTTP base, the fetching router's gRPC address, the model)."""
    http_port = free_port()
    limits = ["--max-images", str(MAX_IMAGES), "--max-image-pixels", str(MAX_PIXELS),
              "--max-image-bytes", str(MAX_BYTES)]
    stack = launch(vlm_model, tmp_path_factory.mktemp("logs"),
                   worker_args=["--num-blocks", "256"],
                   router_args=["--http-port", str(http_port), *limits])
    try:
        fetching = asyncio.run(stack.start_router(
            stack.service("scheduler"), 0,
            [*limits, "--image-url-hosts", "127.0.0.1", "--image-fetch-timeout-s", "5"]))
        yield stack, f"http://127.0.0.1:{http_port}", fetching.address, vlm_model
    finally:
        stack.stop()


def grpc_request(images: list[bytes | str], text: str) -> generation_pb2.GenerateRequest:
    parts = [generation_pb2.ContentPart(image=generation_pb2.ImagePart(data=i))
             if isinstance(i, bytes) else
             generation_pb2.ContentPart(image=generation_pb2.ImagePart(url=i)) for i in images]
    parts.append(generation_pb2.ContentPart(text=text))
    return generation_pb2.GenerateRequest(
        chat=generation_pb2.Chat(messages=[generation_pb2.ChatMessage(role="user", parts=parts)]),
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))


def http_body(images: list[bytes | str], text: str) -> dict:
    parts: list[dict] = [{"type": "image_url", "image_url": {
        "url": data_url(i) if isinstance(i, bytes) else i}} for i in images]
    parts.append({"type": "text", "text": text})
    return {"messages": [{"role": "user", "content": parts}], "max_tokens": 6}


async def grpc_error(address: str, request: generation_pb2.GenerateRequest
                     ) -> tuple[grpc.StatusCode, str] | None:
    async with serving.insecure_channel(address) as channel:
        try:
            async for _ in generation_pb2_grpc.GenerationStub(channel).Generate(request):
                pass
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details() or ""
    return None


def test_every_bad_image_over_grpc_is_refused_naming_the_part(stacks) -> None:
    stack, _, _, model = stacks
    wrong = []
    for row in table(model):
        got = asyncio.run(grpc_error(stack.router, grpc_request(row.images, row.text)))
        if got is None or got[0] != INVALID or not got[1].startswith(row.field + ":"):
            wrong.append(f"{row.name}: expected {row.field}: ..., got {got}")
    assert not wrong, "\n".join(wrong)


def test_every_bad_image_over_http_is_a_400_naming_the_part(stacks) -> None:
    _, base, _, model = stacks
    wrong = []
    for row in table(model):
        status, body = http_error(base, "/v1/chat/completions", http_body(row.images, row.text))
        if status != 400 or body.get("error", {}).get("param") != row.field:
            wrong.append(f"{row.name}: expected 400 param={row.field!r}, got {status} {body}")
    assert not wrong, "\n".join(wrong)


def test_video_parts_are_a_400_naming_the_part(stacks) -> None:
    """No family's video input is served (Qwen2.5-VL's included): refused, never dropped."""
    _, base, _, _ = stacks
    body = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what happens?"},
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}]}],
        "max_tokens": 4}
    status, reply = http_error(base, "/v1/chat/completions", body)
    assert status == 400 and reply["error"]["param"] == "messages[0].content[1]", reply


def test_image_embeddings_are_refused(stacks) -> None:
    _, base, _, _ = stacks
    for body in ({"input": [{"type": "image_url", "image_url": {"url": data_url(PNG)}}]},
                 {"messages": [{"role": "user", "content": "hi"}]}):
        status, reply = http_error(base, "/v1/embeddings", body)
        assert status == 400 and "not supported" in reply["error"]["message"], reply


def test_fetching_router_refuses_unreachable_missing_and_unlisted_urls(
    stacks, image_host: str
) -> None:
    _, _, fetching, _ = stacks
    closed = f"http://127.0.0.1:{free_port()}/x.png"
    for url, why in [(closed, "could not fetch"), (f"{image_host}/missing.png", "HTTP 404"),
                     (image_host.replace("127.0.0.1", "localhost") + "/good.png",
                      "not in --image-url-hosts")]:
        code, details = asyncio.run(grpc_error(fetching, grpc_request([url], "hi")))
        assert code == INVALID and details.startswith("messages[0].content[0]:"), details
        assert why in details, details


def test_fetched_image_is_answered_as_transformers_answers_it(stacks, image_host: str) -> None:
    _, _, fetching, model = stacks
    request = grpc_request([f"{image_host}/good.png"], "What is this?")
    ((ids, _, _),) = asyncio.run(run_concurrently(fetching, [request]))
    inputs = vlm_cases.hf_inputs(model, "What is this?", [GOOD_IMAGE])
    assert ids == vlm_cases.hf_generate(model, inputs, 6)
