"""Tests that take ``manifests`` run once for every overlay."""

from __future__ import annotations

import pytest
from k8s_manifests import OVERLAYS, Manifests, load


@pytest.fixture(scope="session", params=OVERLAYS)
def manifests(request: pytest.FixtureRequest) -> Manifests:
    return load(request.param)
