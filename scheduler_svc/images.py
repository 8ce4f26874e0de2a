"""What the scheduler does with a request's images: keep them to re-send, and budget encoding.

The router sends each image as preprocessed pixels with its placeholder run (``ImageInput``).
The scheduler must be able to send them to a worker again whenever the worker loses the
sequence -- preemption by recompute, a lost worker, a restarted scheduler -- so:

- in memory, the Request holds them until it ends;
- in Redis, one value per request (``req:<id>:images``, an ``ImageInputs`` message) written at
  admission and on a resync, deleted when the request finishes, and expiring after
  ``IMAGES_TTL_S`` in any case, so images of requests nobody will ever resume (their scheduler
  gone for good) do not stay. The request's hash records how many it had: a restarted
  scheduler that finds them missing (expired) does not resume that request -- recomputing it
  without its images would be silently wrong -- and its router hears NOT_FOUND. Bounded: the
  router's --max-images / --max-image-pixels per request, times the --max-queue requests.

An encoder budget per step (``--max-encoder-tokens``): vision encoding costs compute as prefill
does, so a prefill chunk that would start encoding images past what is left of the step's
budget is cut before the first such image (it runs next step). The first image of a step always
runs, so an image larger than the budget still does.
"""

from __future__ import annotations

from collections.abc import Sequence

from pagewire.v1 import common_pb2

IMAGES_TTL_S = 24 * 3600


def pack(images: Sequence[common_pb2.ImageInput]) -> bytes:
    return common_pb2.ImageInputs(images=images).SerializeToString()


def unpack(data: bytes | None) -> list[common_pb2.ImageInput]:
    return list(common_pb2.ImageInputs.FromString(data or b"").images)


def check(images: Sequence[common_pb2.ImageInput], prompt_len: int) -> str | None:
    """Why ``images`` cannot belong to a prompt of ``prompt_len`` tokens (None: they can)."""
    end = 0
    for i, im in enumerate(images):
        if im.offset < end or im.length <= 0 or im.offset + im.length > prompt_len:
            return f"images[{i}]: placeholder run [{im.offset}, {im.offset + im.length}) is not " \
                   f"inside the prompt ({prompt_len} tokens) after the previous image"
        if len(im.pixel_values) != 4 * _numel(im.shape):
            return f"images[{i}]: pixel_values is not float32 of shape {list(im.shape)}"
        if im.grid_thw and (len(im.grid_thw) != 3 or len(im.shape) != 2
                            or _numel(im.grid_thw) != im.shape[0]):
            return f"images[{i}]: grid_thw {list(im.grid_thw)} does not match the " \
                   f"{list(im.shape)} patches"
        end = im.offset + im.length
    return None


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def clip_chunk(images: Sequence[common_pb2.ImageInput], start: int, n: int, left: int,
               budget: int, first: bool) -> tuple[int, int]:
    """(tokens of the chunk [start, start + n) to run, encoder tokens they cost) given ``left``
    of the step's ``budget`` encoder tokens. ``first``: the chunk is the first the worker gets
    of this sequence (since it was last sent whole), so it also encodes an image it starts
    inside of. An image over what is left runs only as the step's first."""
    cost = 0
    for im in images:
        if im.offset + im.length <= start or im.offset >= start + n:
            continue
        if im.offset < start and not first:
            continue  # encoded by an earlier chunk, cached on the worker
        if cost + im.length > left and (cost or left < budget):
            return max(im.offset - start, 0), cost
        cost += im.length
    return n, cost
