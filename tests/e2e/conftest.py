"""End-to-end fixtures: the real processes (redis-server, worker, scheduler, router) on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_util import HFReference, launch

from pagewire.launcher import Stack


@pytest.fixture(scope="module")
def stack(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack with a KV pool large enough for every test of the module."""
    s = launch(
        tiny_model,
        tmp_path_factory.mktemp("logs"),
        worker_args=["--num-blocks", "512", "--block-size", "16"],
        scheduler_args=["--check-invariants"],
    )
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="session")
def hf_reference(tiny_model: Path) -> HFReference:
    return HFReference(tiny_model)
