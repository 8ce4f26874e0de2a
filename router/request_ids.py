"""The scheduler request ids a router has in flight, over all its schedulers.

A client (or a gateway setting ``X-Request-Id``) may send a second request with the id of one
still running. The scheduler refuses it (ALREADY_EXISTS) only when it reaches the same scheduler
over the same stream, and by then the router's per-id state -- the event queue of the first
request -- would already be replaced. So the router refuses it first, here, before anything of the
first request is touched; the id is free again once its request has ended.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from router.errors import RequestError


class InFlightIds:
    def __init__(self) -> None:
        self._ids: set[str] = set()

    def claim(self, ids: Iterable[str], shown: str) -> None:
        """Take ``ids`` for a new request, or raise ALREADY_EXISTS naming ``shown`` (the id the
        client sent) if one of them is in flight."""
        wanted = set(ids)
        if wanted & self._ids:
            raise RequestError(grpc.StatusCode.ALREADY_EXISTS, "request_id",
                               f"{shown!r} is in flight; a new request needs a new id")
        self._ids |= wanted

    def release(self, ids: Iterable[str]) -> None:
        self._ids.difference_update(ids)

    def __contains__(self, rid: str) -> bool:
        return rid in self._ids
