"""Every object an overlay renders is valid Kubernetes, on the oldest and newest versions we claim.

Validation is kubernetes-validate's strict mode (the official OpenAPI schemas with unknown
fields rejected), so a misspelt field fails here instead of being dropped by the API server.
"""

from __future__ import annotations

import kubernetes_validate
import pytest
from k8s_manifests import Manifests, name_of

# gRPC probes are GA from 1.27; the newest is whatever the pinned kubernetes-validate bundles.
OLDEST_SUPPORTED = "1.27"
VERSIONS = [OLDEST_SUPPORTED, kubernetes_validate.latest_version()]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_validates_strictly(manifests: Manifests, version: str) -> None:
    errors = []
    for obj in manifests.objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            errors.append(f"{obj['kind']}/{name_of(obj)}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"{obj['kind']}/{name_of(obj)}: {e.message}")
    assert not errors, f"{manifests.overlay} on Kubernetes {version}:\n" + "\n".join(errors)


def test_object_names_are_unique_per_kind(manifests: Manifests) -> None:
    keys = [(o["kind"], name_of(o)) for o in manifests.objects]
    assert len(keys) == len(set(keys))


def test_overlay_renders_every_tier(manifests: Manifests) -> None:
    kinds = {(o["kind"], name_of(o)) for o in manifests.objects}
    for expected in [
        ("Deployment", "pagewire-redis"),
        ("Deployment", "pagewire-otel-collector"),
        ("Deployment", "pagewire-scheduler"),
        ("Deployment", "pagewire-router"),
        ("StatefulSet", "pagewire-worker"),
        ("HorizontalPodAutoscaler", "pagewire-router"),
    ]:
        assert expected in kinds, f"{manifests.overlay} lacks {expected}"
