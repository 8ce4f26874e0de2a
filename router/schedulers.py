"""The schedulers a router submits to: one fixed scheduler, or one per live worker group.

``--scheduler H:P`` names a single scheduler that takes every request (:class:`FixedScheduler`,
the one-group deployment). Without it, :class:`SchedulerGroups` reads the group directory in Redis
(``pagewire.group_directory``: each live group's scheduler address and its workers) every
``refresh_s`` seconds and keeps one :class:`SchedulerLink` per live group. A request is placed on a
worker by the routing policy over the workers of live groups only, then submitted on the link of
that worker's group.

A link outlives its group's lease while it has requests in flight: when the group's scheduler
restarts, or a standby takes the lease over at another address (the link is pointed there on the
next read), those requests re-attach as with a single scheduler. An idle link of a group that is
no longer live is closed; the group's link is made again when it comes back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from pagewire.group_directory import Group, read_live_groups
from pagewire.redis_client import Client
from pagewire.redis_keys import RedisKeys
from pagewire.store_outage import STORE_ERRORS
from pagewire.tls import TLSFiles
from router.scheduler_link import SchedulerLink

log = logging.getLogger("router.schedulers")


class Schedulers(Protocol):
    """What request placement needs from the router's schedulers."""

    @property
    def eligible(self) -> frozenset[str] | None:
        """Worker ids routing may choose; None: any registered worker."""

    def link_for(self, worker_id: str) -> SchedulerLink | None:
        """The link of the scheduler that drives ``worker_id``; None if no live one does."""

    def fallback(self) -> SchedulerLink | None:
        """A connected link to use when routing cannot choose a worker (Redis away or empty): its
        scheduler picks. None when no scheduler is connected."""

    @property
    def in_flight(self) -> int: ...

    async def wait_ready(self, timeout: float) -> None:
        """Return once a scheduler's link is connected (``run`` is running); raise TimeoutError
        after ``timeout`` s."""

    async def run(self) -> None:
        """Keep the links connected (and, for groups, up to date) until cancelled."""


class FixedScheduler:
    """``--scheduler H:P``: one scheduler, whatever worker a request is routed to."""

    eligible = None

    def __init__(self, link: SchedulerLink) -> None:
        self.link = link

    def link_for(self, worker_id: str) -> SchedulerLink:
        return self.link

    def fallback(self) -> SchedulerLink | None:
        return self.link if self.link.connected else None

    @property
    def in_flight(self) -> int:
        return self.link.in_flight

    async def wait_ready(self, timeout: float) -> None:
        await _until(lambda: self.link.connected, timeout, f"scheduler {self.link.address}")

    async def run(self) -> None:
        await self.link.run()


class SchedulerGroups:
    """One link per live worker group, kept in step with the group directory in Redis."""

    def __init__(
        self, r: Client, keys: RedisKeys, resume_timeout_s: float,
        tls: TLSFiles | None = None, refresh_s: float = 1.0,
    ) -> None:
        self.redis, self.keys, self.tls = r, keys, tls
        self.resume_timeout_s, self.refresh_s = resume_timeout_s, refresh_s
        self.links: dict[str, SchedulerLink] = {}  # group -> link (live groups, and busy ones)
        self.live: list[Group] = []
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._group_of: dict[str, str] = {}  # worker id -> its live group

    @property
    def eligible(self) -> frozenset[str]:
        return frozenset(self._group_of)

    def link_for(self, worker_id: str) -> SchedulerLink | None:
        group = self._group_of.get(worker_id)
        return self.links.get(group) if group is not None else None

    def fallback(self) -> SchedulerLink | None:
        links = [self.links[g.name] for g in self.live if g.name in self.links]
        connected = [link for link in links if link.connected]
        return min(connected, key=lambda link: link.in_flight, default=None)

    @property
    def in_flight(self) -> int:
        return sum(link.in_flight for link in self.links.values())

    async def wait_ready(self, timeout: float) -> None:
        await _until(lambda: self.fallback() is not None, timeout, "a live scheduler group")

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self.refresh()
                except STORE_ERRORS as e:  # keep the last view until Redis is back
                    log.warning("reading the group directory failed: %s", e)
                await asyncio.sleep(self.refresh_s)
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop every link (requests still on them get no more events)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self.links.clear()

    async def refresh(self) -> None:
        """Read the group directory and bring the links and the worker map in step with it."""
        self.apply(await read_live_groups(self.redis, self.keys))

    def apply(self, groups: list[Group]) -> None:
        """Follow the directory. A group it no longer lists whose link is still connected stays
        live as last seen: its scheduler runs (one that loses its lease exits, breaking the
        stream), and a Redis that restarted empty lists nothing until the next publish."""
        listed = {g.name for g in groups}
        kept = [g for g in self.live if g.name not in listed and g.name in self.links
                and self.links[g.name].connected and self.links[g.name].address == g.address]
        groups = sorted([*groups, *kept], key=lambda g: g.name)
        live = {g.name for g in groups}
        for g in groups:
            link = self.links.get(g.name)
            if link is None:
                log.info("scheduler group %s at %s: %d worker(s)", g.name, g.address, len(g.workers))
                self._open(g)
            elif link.address != g.address:  # a standby took the group over
                log.info("scheduler group %s moved from %s to %s", g.name, link.address, g.address)
                link.address = g.address
        for name in [n for n, link in self.links.items() if n not in live and not link.in_flight]:
            log.info("scheduler group %s is gone: closing its link", name)
            self._tasks.pop(name).cancel()
            del self.links[name]
        group_of: dict[str, str] = {}
        for g in groups:  # sorted by name: a worker two groups claim stays with the first
            for w in g.workers:
                group_of.setdefault(w, g.name)
        self._group_of, self.live = group_of, groups

    def _open(self, g: Group) -> None:
        link = SchedulerLink(g.address, self.resume_timeout_s, self.tls)
        self.links[g.name] = link
        self._tasks[g.name] = asyncio.create_task(link.run(), name=f"scheduler-link-{g.name}")


async def _until(ready: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``ready`` until it holds; TimeoutError naming ``what`` after ``timeout`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not ready():
        if loop.time() > deadline:
            raise TimeoutError(f"{what} not connected after {timeout}s")
        await asyncio.sleep(0.05)
