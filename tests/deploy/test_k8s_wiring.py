"""The manifests start pagewire the way its own command line and configuration understand.

Each pagewire container's arguments go through the real parser (``pagewire.cli`` picks the
command, the service's config dataclass parses the rest), with the container's environment in
place, so an unknown flag, a PAGEWIRE_* variable that no field reads, or a value of the wrong
type fails here. The parsed configuration is then held against the manifests: the port the
service listens on is the port the probes, the Service and Prometheus use, and every address it
dials leads to a pod that serves that port.
"""

from __future__ import annotations

import argparse
from urllib.parse import urlsplit

import pytest
import yaml
from deploy_cli import CONFIGS, env_names, parse
from k8s_manifests import Container, Manifests

from pagewire import cli


def pagewire_containers(manifests: Manifests) -> list[Container]:
    found = [c for c in manifests.all_containers() if c.is_pagewire]
    assert found, f"{manifests.overlay}: no pagewire containers"
    return found


def pagewire_services(manifests: Manifests) -> list[Container]:
    """The pagewire containers that run a service (not the init containers)."""
    return [c for c in pagewire_containers(manifests) if not c.init]


def test_every_service_has_a_config_class() -> None:
    assert set(CONFIGS) == set(cli.SERVICES)


def test_pagewire_containers_parse_with_the_real_cli(manifests: Manifests) -> None:
    for c in pagewire_containers(manifests):
        parsed = parse(c)
        if c.init:
            assert isinstance(parsed, argparse.Namespace) and parsed.command == "make-model"
        else:
            assert isinstance(parsed, CONFIGS[c.args[0]]), f"{c.name}: not a service"


def test_pagewire_env_names_are_config_fields(manifests: Manifests) -> None:
    for c in pagewire_services(manifests):
        known = env_names(CONFIGS[c.args[0]])
        unread = sorted(n for n in c.env if n.startswith("PAGEWIRE_") and n not in known)
        assert not unread, f"{c.name}: no {c.args[0]} config field reads {unread}"


def test_unknown_flag_fails_the_parse(manifests: Manifests) -> None:
    worker = manifests.service_containers("worker")[0]
    worker.spec = {**worker.spec, "args": [*worker.spec["args"], "--no-such-flag=1"]}
    with pytest.raises(pytest.fail.Exception, match="usage error"):
        parse(worker)


@pytest.mark.parametrize("service", list(CONFIGS))
def test_service_listens_on_its_declared_ports(manifests: Manifests, service: str) -> None:
    for c in manifests.service_containers(service):
        cfg = parse(c)
        assert cfg.host == "0.0.0.0", f"{c.name}: must listen beyond the pod's loopback"
        assert cfg.port == c.port("grpc")
        assert cfg.metrics_port == c.port("metrics")
        if service == "router":
            assert cfg.http_port == c.port("http")


@pytest.mark.parametrize("service", list(CONFIGS))
def test_probes_are_grpc_health_of_the_whole_server(manifests: Manifests, service: str) -> None:
    containers = manifests.service_containers(service)
    assert containers, f"{manifests.overlay}: no {service}"
    for c in containers:
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            grpc = c.spec[probe].get("grpc")
            assert grpc, f"{c.name}: {probe} is not a gRPC probe"
            assert grpc["port"] == c.port("grpc"), f"{c.name}: {probe} port"
            assert grpc.get("service", "") == "", f"{c.name}: {probe} must check service ''"


def test_every_probe_targets_a_declared_port(manifests: Manifests) -> None:
    for c in manifests.all_containers():
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            action = {
                k: v
                for k, v in c.spec.get(probe, {}).items()
                if k in ("grpc", "httpGet", "tcpSocket")
            }
            for kind, spec in action.items():
                assert c.resolve_port(spec["port"]) is not None, (
                    f"{c.name}: {probe}.{kind} port {spec['port']} is not a container port"
                )


def test_prometheus_scrapes_the_metrics_port(manifests: Manifests) -> None:
    for c in pagewire_services(manifests):
        notes = c.workload["spec"]["template"]["metadata"].get("annotations", {})
        assert notes.get("prometheus.io/scrape") == "true", c.name
        assert notes.get("prometheus.io/path") == "/metrics", c.name
        assert int(notes["prometheus.io/port"]) == parse(c).metrics_port == c.port("metrics")


def test_addresses_each_service_dials_lead_to_the_right_port(manifests: Manifests) -> None:
    (router,) = manifests.service_containers("router")
    (scheduler,) = manifests.service_containers("scheduler")
    router_cfg, scheduler_cfg = parse(router), parse(scheduler)

    # Routers find each group's scheduler in Redis, at the address the scheduler advertises.
    assert not router_cfg.scheduler and router_cfg.redis_url, "routers read the group directory"
    target, port = manifests.dial(scheduler_cfg.advertise)
    assert target.spec["args"][0] == "scheduler" and port == scheduler_cfg.port
    for address in scheduler_cfg.workers.split(","):
        target, port = manifests.dial(address)
        assert target.spec["args"][0] == "worker" and port == parse(target).port
    for c in manifests.service_containers("worker"):
        cfg = parse(c)
        assert cfg.worker_id == c.pod_name, f"{c.name}: worker id is the pod name"
        target, port = manifests.dial(cfg.advertise)
        assert (target.pod_name, port) == (c.pod_name, cfg.port), f"{c.name}: advertise"


def test_scheduler_drives_every_worker_pod(manifests: Manifests) -> None:
    (scheduler,) = manifests.service_containers("scheduler")
    workers = parse(scheduler).workers.split(",")
    stateful = manifests.get("StatefulSet", "pagewire-worker")
    replicas = stateful["spec"].get("replicas", 1)
    dialled = {manifests.dial(w)[0].pod_name for w in workers}
    assert dialled == {f"pagewire-worker-{i}" for i in range(replicas)}
    assert len(workers) == replicas, "a worker is listed twice"


def test_redis_and_tracing_endpoints_lead_to_their_servers(manifests: Manifests) -> None:
    collector = manifests.get("Deployment", "pagewire-otel-collector")
    for c in pagewire_services(manifests):
        redis_url = urlsplit(parse(c).redis_url)
        assert redis_url.scheme == "redis", f"{c.name}: REDIS_URL"
        target, _ = manifests.dial(f"{redis_url.hostname}:{redis_url.port}")
        assert target.spec["name"] == "redis"
        otlp = urlsplit(c.env["OTEL_EXPORTER_OTLP_ENDPOINT"])
        target, port = manifests.dial(f"{otlp.hostname}:{otlp.port}")
        assert target.workload == collector
        assert port == collector_otlp_grpc_port(manifests), f"{c.name}: not the OTLP gRPC port"
        assert c.env["OTEL_SERVICE_NAME"] == f"pagewire-{c.args[0]}"


def collector_otlp_grpc_port(manifests: Manifests) -> int:
    """The port the collector's configuration (the file its --config names) receives OTLP
    gRPC on, after checking the traces pipeline starts there."""
    (c,) = [c for c in manifests.all_containers() if c.spec["name"] == "otel-collector"]
    (config_arg,) = [a for a in c.args if a.startswith("--config=")]
    path = config_arg.removeprefix("--config=")
    mount = next(m for m in c.spec["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    volume = next(
        v for v in c.workload["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]
    )
    data = manifests.get("ConfigMap", volume["configMap"]["name"])["data"]
    config = yaml.safe_load(data[path.removeprefix(mount["mountPath"] + "/")])
    assert "otlp" in config["service"]["pipelines"]["traces"]["receivers"]
    endpoint = config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    host, _, port = endpoint.rpartition(":")
    assert host == "0.0.0.0", "the collector must listen beyond its pod's loopback"
    assert int(port) == c.port("otlp-grpc")
    return int(port)
