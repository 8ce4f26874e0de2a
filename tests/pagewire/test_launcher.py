"""The local launcher's start-up contract: a service that dies while starting is reported at once."""

from __future__ import annotations

import asyncio
import time

import pytest

from pagewire.launcher import Stack


def test_a_service_that_exits_while_starting_fails_fast_with_its_exit_code() -> None:
    stack = Stack(model="unused")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"broken exited with code 1 before it became healthy"):
        # A module that cannot be found: python exits with 1 before listening anywhere.
        asyncio.run(stack.start_service("broken", "pagewire.no_such_module", [], port=1,
                                        timeout=120))
    assert time.monotonic() - start < 30  # not the 120 s health timeout
    stack.stop()
