"""best_of: of a request's candidates, the n with the highest cumulative logprob, renumbered.

The ranking needs every candidate whole, so responses are held until all have finished, then
sent candidate by candidate, best first (index 0 is the best). The score is the sum of the raw
logprobs of a candidate's sampled tokens (what ``Logprobs`` reports: before temperature and
filters), vLLM's ``cumulative_logprob``; the router asks the worker for them (logprobs 0) when the
client did not, and strips them again (``keep_logprobs`` False).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import AsyncGenerator

from pagewire.v1 import generation_pb2


def score(responses: list[generation_pb2.GenerateResponse]) -> float:
    return sum(lp.logprob for r in responses for lp in r.logprobs)


async def select(
    responses: AsyncGenerator[generation_pb2.GenerateResponse, None], n: int, keep_logprobs: bool
) -> AsyncGenerator[generation_pb2.GenerateResponse, None]:
    by_candidate: dict[int, list[generation_pb2.GenerateResponse]] = defaultdict(list)
    async with contextlib.aclosing(responses) as each:
        async for response in each:
            by_candidate[response.index].append(response)
    ranked = sorted(by_candidate, key=lambda i: score(by_candidate[i]), reverse=True)
    for new_index, old_index in enumerate(ranked[:n]):
        for response in by_candidate[old_index]:
            response.index = new_index
            if not keep_logprobs:
                del response.logprobs[:]
            yield response
