"""The objects fit together: selectors find pods, budgets and autoscalers have targets, rollouts
and shutdowns suit each tier, and each overlay does what it is for (dev: the test model on CPU;
gpu: one GPU per worker, the model from a claim)."""

from __future__ import annotations

import pytest
from deploy_cli import parse
from k8s_manifests import Container, Manifests, load, name_of


def test_every_service_selects_exactly_one_workload(manifests: Manifests) -> None:
    for service in manifests.of_kind("Service"):
        selector = service["spec"]["selector"]
        assert len(manifests.pods_selected_by(selector)) == 1, name_of(service)


def test_service_ports_reach_the_same_container_port(manifests: Manifests) -> None:
    """Clients use the port number the pods serve: no remapping to remember."""
    for service in manifests.of_kind("Service"):
        (workload,) = manifests.pods_selected_by(service["spec"]["selector"])
        main = [c for c in manifests.containers(workload) if not c.init]
        for port in service["spec"]["ports"]:
            numbers = {c.resolve_port(port.get("targetPort", port["port"])) for c in main}
            assert port["port"] in numbers, f"{name_of(service)}: port {port['name']}"


def test_workload_selectors_match_their_own_pods(manifests: Manifests) -> None:
    for w in manifests.workloads():
        selector = w["spec"]["selector"]["matchLabels"]
        assert manifests.pods_selected_by(selector) == [w], name_of(w)


def test_disruption_budgets_cover_routers_and_workers(manifests: Manifests) -> None:
    covered = set()
    for pdb in manifests.of_kind("PodDisruptionBudget"):
        (workload,) = manifests.pods_selected_by(pdb["spec"]["selector"]["matchLabels"])
        assert pdb["spec"].get("maxUnavailable") == 1, f"{name_of(pdb)}: one pod at a time"
        covered.add(name_of(workload))
    assert covered == {"pagewire-router", "pagewire-worker"}


def test_autoscaler_owns_the_router_replica_count(manifests: Manifests) -> None:
    (hpa,) = manifests.of_kind("HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    target = manifests.get(ref["kind"], ref["name"])
    assert (ref["kind"], name_of(target)) == ("Deployment", "pagewire-router")
    assert "replicas" not in target["spec"], "a fixed count would fight the autoscaler"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    main = [c for c in manifests.containers(target) if not c.init]
    assert all("cpu" in c.spec["resources"]["requests"] for c in main), "CPU target needs requests"


def test_one_scheduler_replaced_never_overlapped(manifests: Manifests) -> None:
    """The new scheduler would wait for the old one's lease, never become ready, and stall a
    rolling update: the old one must go first."""
    scheduler = manifests.get("Deployment", "pagewire-scheduler")
    assert scheduler["spec"]["replicas"] == 1
    strategy = scheduler["spec"]["strategy"]
    surge = strategy.get("rollingUpdate", {}).get("maxSurge", "25%")
    assert strategy["type"] == "Recreate" or surge in (0, "0%")


def test_workers_are_a_statefulset_behind_a_headless_service(manifests: Manifests) -> None:
    workers = manifests.get("StatefulSet", "pagewire-worker")
    service = manifests.get("Service", workers["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"].get("publishNotReadyAddresses") is True
    assert manifests.pods_selected_by(service["spec"]["selector"]) == [workers]
    (worker,) = manifests.service_containers("worker")
    mount = next(m["mountPath"] for m in worker.spec["volumeMounts"] if m["name"] == "model")
    assert parse(worker).model.startswith(mount + "/"), "the model is read from the model volume"


def drain_budget(c: Container) -> float:
    """Seconds from SIGTERM's decision to the process having to exit: preStop, then drain."""
    pre_stop = c.spec.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    sleep = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
    return sleep + parse(c).drain_timeout_s


@pytest.mark.parametrize("service", ["worker", "scheduler", "router"])
def test_grace_period_outlasts_the_drain(manifests: Manifests, service: str) -> None:
    for c in manifests.service_containers(service):
        grace = c.workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > drain_budget(c), f"{c.name}: killed before its drain ends"


def test_every_container_requests_resources_and_caps_memory(manifests: Manifests) -> None:
    for c in manifests.all_containers():
        resources = c.spec.get("resources", {})
        assert {"cpu", "memory"} <= set(resources.get("requests", {})), c.name
        assert "memory" in resources.get("limits", {}), c.name


def test_pagewire_runs_unprivileged_on_a_read_only_root(manifests: Manifests) -> None:
    for c in manifests.all_containers():
        if not c.is_pagewire:
            continue
        pod = c.workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, c.name
        assert c.spec["securityContext"]["readOnlyRootFilesystem"] is True, c.name
        assert "/tmp" in {m["mountPath"] for m in c.spec["volumeMounts"]}, f"{c.name}: no /tmp"


def test_dev_builds_the_test_model_the_services_load() -> None:
    manifests = load("dev")
    for service in ("worker", "router"):
        (c,) = manifests.service_containers(service)
        init = [i for i in manifests.containers(c.workload) if i.init]
        assert [i.args[0] for i in init] == ["make-model"], c.name
        built = parse(init[0])
        assert (built.dir, built.size, built.seed) == (parse(c).model, "tiny", 0), c.name
    (worker,) = manifests.service_containers("worker")
    assert parse(worker).device == "cpu"
    stateful = manifests.get("StatefulSet", "pagewire-worker")
    assert stateful["spec"]["replicas"] == 1


def test_gpu_workers_get_one_gpu_each_and_the_shared_model() -> None:
    manifests = load("gpu")
    (worker,) = manifests.service_containers("worker")
    resources = worker.spec["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1"
    assert parse(worker).device.startswith("cuda")
    pod = worker.workload["spec"]["template"]["spec"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert pod["nodeSelector"]
    claim = manifests.get("PersistentVolumeClaim", "pagewire-model")
    for c in (worker, *manifests.service_containers("router")):
        volumes = c.workload["spec"]["template"]["spec"]["volumes"]
        (model,) = [v for v in volumes if v["name"] == "model"]
        assert model == {
            "name": "model",
            "persistentVolumeClaim": {"claimName": name_of(claim), "readOnly": True},
        }, c.name
    gpu_pods = {
        name_of(w)
        for w in manifests.workloads()
        if any(
            "nvidia.com/gpu" in c.spec["resources"].get("limits", {})
            for c in manifests.containers(w)
        )
    }
    assert gpu_pods == {"pagewire-worker"}, "only workers hold GPUs"
