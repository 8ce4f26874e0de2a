"""The rendered Kubernetes manifests of one overlay, and what a kubelet would make of them.

The deploy tests read objects the way the cluster does: a container's environment is built from
its ``envFrom`` ConfigMaps and then its ``env`` entries in order, each ``$(VAR)`` expanded
against what came before; an address such as ``pagewire-scheduler:50052`` is followed through
the Service of that name, its selector and ``targetPort``, to the container port behind it.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
NAMESPACE = "pagewire-test"  # what metadata.namespace reads as in these tests
WORKLOAD_KINDS = ("Deployment", "StatefulSet")

Obj = dict[str, Any]


def render(overlay: str) -> list[Obj]:
    """``kubectl kustomize`` of one overlay: kubectl ships kustomize, so no second tool."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@functools.cache
def load(overlay: str) -> Manifests:
    """One overlay, rendered once per test session."""
    return Manifests(overlay, render(overlay))


def name_of(obj: Obj) -> str:
    return str(obj["metadata"]["name"])


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: a known name is replaced, ``$$`` escapes, an unknown
    reference stays as written."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
        value,
    )


@dataclass
class Container:
    """One container of a workload's pod template, as it would start in the pod ``pod_name``."""

    workload: Obj
    spec: Obj
    init: bool
    pod_name: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.workload['kind']}/{name_of(self.workload)}/{self.spec['name']}"

    @property
    def args(self) -> list[str]:
        return [expand(str(a), self.env) for a in self.spec.get("args", [])]

    @property
    def is_pagewire(self) -> bool:
        return str(self.spec["image"]).split(":")[0].rsplit("/", 1)[-1] == "pagewire"

    def port(self, name: str) -> int:
        """The container port called ``name``; fails the test if there is none."""
        for p in self.spec.get("ports", []):
            if p.get("name") == name:
                return int(p["containerPort"])
        pytest.fail(f"{self.name} declares no container port named {name!r}")

    def port_numbers(self) -> set[int]:
        return {int(p["containerPort"]) for p in self.spec.get("ports", [])}

    def resolve_port(self, port: int | str) -> int | None:
        """A probe's or a Service's port (number or name) as a declared container port."""
        for p in self.spec.get("ports", []):
            if port in (p.get("name"), p["containerPort"]):
                return int(p["containerPort"])
        return None


@dataclass
class Manifests:
    overlay: str
    objects: list[Obj]

    def of_kind(self, kind: str) -> list[Obj]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> Obj:
        """The object of ``kind`` whose name is ``name``, or (for a ConfigMap kustomize
        generated) whose name is ``name`` plus the content hash suffix."""
        found = [
            o
            for o in self.of_kind(kind)
            if name_of(o) == name or re.fullmatch(re.escape(name) + r"-[a-z0-9]{10}", name_of(o))
        ]
        assert len(found) == 1, f"{self.overlay}: expected one {kind} {name}, found {len(found)}"
        return found[0]

    def workloads(self) -> list[Obj]:
        return [o for o in self.objects if o["kind"] in WORKLOAD_KINDS]

    def pods_selected_by(self, selector: dict[str, str]) -> list[Obj]:
        return [w for w in self.workloads() if selects(selector, pod_labels(w))]

    def containers(self, workload: Obj, ordinal: int = 0) -> list[Container]:
        pod = f"{name_of(workload)}-{ordinal if workload['kind'] == 'StatefulSet' else 'abcde'}"
        spec = workload["spec"]["template"]["spec"]
        out = [Container(workload, c, True, pod) for c in spec.get("initContainers", [])]
        out += [Container(workload, c, False, pod) for c in spec["containers"]]
        for c in out:
            c.env = self.environment(c)
        return out

    def all_containers(self) -> Iterator[Container]:
        for w in self.workloads():
            yield from self.containers(w)

    def service_containers(self, command: str) -> list[Container]:
        """The main pagewire containers whose first argument is ``command`` (worker, ...)."""
        return [
            c
            for c in self.all_containers()
            if c.is_pagewire and not c.init and (c.spec.get("args") or [None])[0] == command
        ]

    def environment(self, c: Container) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in c.spec.get("envFrom", []):
            assert "configMapRef" in source, f"{c.name}: only ConfigMaps feed envFrom here"
            data = self.get("ConfigMap", source["configMapRef"]["name"]).get("data", {})
            env.update({source.get("prefix", "") + k: str(v) for k, v in data.items()})
        for var in c.spec.get("env", []):
            value = self._value_from(c, var) if "valueFrom" in var else var.get("value", "")
            if value is not None:
                env[var["name"]] = expand(str(value), env)
        return env

    def _value_from(self, c: Container, var: Obj) -> str | None:
        ref = var["valueFrom"]
        if "fieldRef" in ref:
            path = ref["fieldRef"]["fieldPath"]
            return {"metadata.name": c.pod_name, "metadata.namespace": NAMESPACE}[path]
        if "configMapKeyRef" in ref:
            key = ref["configMapKeyRef"]
            data = self.get("ConfigMap", key["name"]).get("data", {})
            assert key["key"] in data, f"{c.name}: {var['name']}: no key {key['key']}"
            return str(data[key["key"]])
        if "secretKeyRef" in ref:
            # No Secret is part of the manifests: one may only be referenced as optional.
            assert ref["secretKeyRef"].get("optional"), f"{c.name}: {var['name']} needs a Secret"
            return None
        raise AssertionError(f"{c.name}: unsupported valueFrom in {var['name']}")

    def dial(self, address: str) -> tuple[Container, int]:
        """Follow ``host:port`` as a pod in this namespace would: ``service:port`` through a
        Service to the container port behind it, ``pod.service:port`` to a StatefulSet pod by
        its headless Service. Returns the serving container and its port number."""
        host, _, port_text = address.rpartition(":")
        port = int(port_text)
        labels = host.split(".")
        assert len(labels) in (1, 2), f"{address}: expected service:port or pod.service:port"
        service = self.get("Service", labels[-1])
        backends = self.pods_selected_by(service["spec"]["selector"])
        assert len(backends) == 1, f"{address}: Service selects {len(backends)} workloads"
        workload = backends[0]
        if len(labels) == 2:
            return self._dial_pod(workload, service, labels[0], port, address)
        ports = [p for p in service["spec"]["ports"] if p["port"] == port]
        assert ports, f"{address}: Service {labels[0]} has no port {port}"
        target = ports[0].get("targetPort", port)
        for c in self.containers(workload):
            if not c.init and (number := c.resolve_port(target)) is not None:
                return c, number
        raise AssertionError(f"{address}: no container of {name_of(workload)} has port {target}")

    def _dial_pod(
        self, workload: Obj, service: Obj, pod: str, port: int, address: str
    ) -> tuple[Container, int]:
        assert workload["kind"] == "StatefulSet", f"{address}: pod names need a StatefulSet"
        assert service["spec"].get("clusterIP") == "None", f"{address}: Service is not headless"
        assert workload["spec"]["serviceName"] == name_of(service), f"{address}: wrong Service"
        prefix, _, ordinal = pod.rpartition("-")
        assert prefix == name_of(workload) and ordinal.isdigit(), f"{address}: not a pod name"
        assert int(ordinal) < workload["spec"].get("replicas", 1), f"{address}: no such replica"
        for c in self.containers(workload, int(ordinal)):
            if not c.init and port in c.port_numbers():
                return c, port
        raise AssertionError(f"{address}: pod {pod} declares no container port {port}")


def pod_labels(workload: Obj) -> dict[str, str]:
    return dict(workload["spec"]["template"]["metadata"].get("labels", {}))
