"""An image part's bytes: inline, a ``data:`` URL, or an http(s) URL fetched under limits.

Fetching is off unless the router was started with ``--image-url-hosts``: a router that fetches
any URL a client names can be made to probe the network it sits in. With it on, only the listed
hosts (``*``: any) are fetched, each response is cut off past ``--max-image-bytes`` and the whole
fetch past ``--image-fetch-timeout-s``; every failure is INVALID_ARGUMENT naming the part.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import urllib.parse
from dataclasses import dataclass

import aiohttp

from pagewire.v1 import generation_pb2
from router.errors import RequestError


@dataclass(frozen=True)
class ImageLimits:
    max_images: int  # per request
    max_pixels: int  # per image, width x height as decoded
    max_bytes: int  # per request, encoded bytes of all its images
    url_hosts: frozenset[str]  # hosts http(s) image URLs may name; empty: fetching off
    fetch_timeout_s: float

    @classmethod
    def parse_hosts(cls, hosts: str) -> frozenset[str]:
        return frozenset(h.strip().lower() for h in hosts.split(",") if h.strip())


async def image_bytes(part: generation_pb2.ImagePart, field: str, limits: ImageLimits,
                      budget: int) -> bytes:
    """The encoded image of ``part``; ``budget``: bytes this request may still take."""
    kind = part.WhichOneof("source")
    if kind == "data":
        data = part.data
    elif kind == "url" and part.url.startswith("data:"):
        data = _data_url(part.url, field)
    elif kind == "url":
        data = await _fetch(part.url, field, limits, budget)
    else:
        raise RequestError.invalid(field, "an image part needs data or a url")
    if not data:
        raise RequestError.invalid(field, "the image is empty")
    if len(data) > budget:
        raise RequestError.invalid(field, f"images of this request exceed {limits.max_bytes} "
                                          "bytes in all (--max-image-bytes)")
    return data


def _data_url(url: str, field: str) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise RequestError.invalid(field, "a data URL must be data:<type>;base64,<data>")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError.invalid(field, "the data URL's payload is not valid base64") from None


async def _fetch(url: str, field: str, limits: ImageLimits, budget: int) -> bytes:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise RequestError.invalid(field, "must be a data: URL or an http(s) URL")
    if not limits.url_hosts:
        raise RequestError.invalid(field, "fetching image URLs is off on this server (send the "
                                          "image as a data: URL, or start the router with "
                                          "--image-url-hosts)")
    host = parsed.hostname.lower()
    if "*" not in limits.url_hosts and host not in limits.url_hosts:
        raise RequestError.invalid(field, f"host {host!r} is not in --image-url-hosts")
    timeout = aiohttp.ClientTimeout(total=limits.fetch_timeout_s)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, \
                session.get(url, allow_redirects=False) as resp:
            if resp.status != 200:
                raise RequestError.invalid(field, f"fetching the image gave HTTP {resp.status}")
            data = bytearray()
            async for chunk in resp.content.iter_chunked(1 << 16):
                data += chunk
                if len(data) > budget:
                    raise RequestError.invalid(
                        field, f"images of this request exceed {limits.max_bytes} bytes in all "
                               "(--max-image-bytes)")
            return bytes(data)
    except (aiohttp.ClientError, OSError) as e:
        raise RequestError.invalid(field, f"could not fetch the image: {e}") from None
    except asyncio.TimeoutError:
        raise RequestError.invalid(field, f"fetching the image took over "
                                          f"{limits.fetch_timeout_s} s") from None
