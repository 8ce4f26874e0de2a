"""Several requests' response streams read as one: a completions call with a list of prompts.

Each prompt is its own request down the shared path (validation, placement, n completions),
run concurrently; their responses are merged in arrival order, each one's ``index`` moved to
``prompt × n + index`` so the client sees one request with ``prompts × n`` choices, as OpenAI
numbers them. A failure of one prompt ends the call and closes (aborts) the others.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator

from pagewire.v1 import generation_pb2

Responses = AsyncGenerator[generation_pb2.GenerateResponse, None]


def merged(streams: list[Responses], width: int) -> Responses:
    """The responses of ``streams`` (each with indices in [0, width)) as one stream."""
    if len(streams) == 1:  # the common case: the stream itself, no task, no queue, no hop
        return streams[0]
    return _merged(streams, width)


async def _merged(streams: list[Responses], width: int) -> Responses:
    queue: asyncio.Queue[generation_pb2.GenerateResponse] = asyncio.Queue()
    tasks = [asyncio.ensure_future(_pump(p * width, s, queue)) for p, s in enumerate(streams)]
    running = set(tasks)
    try:
        while running or not queue.empty():
            while not queue.empty():
                yield queue.get_nowait()
            if not running:
                break
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, *running}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                yield getter.result()
            else:
                getter.cancel()
            for task in done - {getter}:
                running.discard(task)
                task.result()  # a prompt's error ends the call
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _pump(
    offset: int, stream: Responses, queue: asyncio.Queue[generation_pb2.GenerateResponse]
) -> None:
    async with contextlib.aclosing(stream) as each:
        async for response in each:
            response.index += offset
            queue.put_nowait(response)
