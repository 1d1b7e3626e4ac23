"""A RabbitMQ cluster of private nodes on 127.0.0.1, for the cluster topology, its chaos
mode and the tests: Debian's rabbitmq-server 3.10, each node its own Erlang node
(saga-PORT@localhost) with its own AMQP port, distribution port, mnesia and log dirs
under basedir, all sharing one Erlang cookie (the cluster's password between nodes).

The nodes find each other by the classic peer-discovery list in each node's
rabbitmq.conf: a fresh node joins the first node it can reach, so the first start
boots node 0 alone, then the others together. A node that restarts with its data
rejoins the cluster by itself; a cluster started again after stop() starts every
node at once, since a node waits for the peer that stopped last before it serves.

    cluster = RabbitCluster("/tmp/saga-cluster", nodes=3).start()
    os.environ["RABBITMQ_URL"] = cluster.url()   # every node, comma-separated
    cluster.kill(1); cluster.restart(1); cluster.stop()

CLI:  python tools/cluster_rabbit.py [--dir DIR] [--nodes N] [--port FIRST]
runs the cluster in the foreground, prints RABBITMQ_URL=... when every node has
joined, stops it on SIGTERM/SIGINT."""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from brokers import PrivateRabbitMQ, default_basedir, pick_free_port, wait_for  # noqa: E402

RABBITMQCTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"


class ClusterNode(PrivateRabbitMQ):
    """One node of the cluster: PrivateRabbitMQ with a fixed distribution port (peers
    and the CLI tools find it through epmd either way; fixed keeps the logs readable),
    the cluster's cookie and the peer list."""

    def __init__(self, basedir: str | os.PathLike, port: int, dist_port: int, cookie: str,
                 peers: list[str]) -> None:
        super().__init__(basedir, port)
        self.dist_port, self.cookie, self.peers = dist_port, cookie, peers

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env["RABBITMQ_DIST_PORT"] = str(self.dist_port)
        return env

    def write_config(self) -> None:
        super().write_config()
        cookie = self.dir / "home" / ".erlang.cookie"
        if not cookie.exists() or cookie.read_text() != self.cookie:
            cookie.unlink(missing_ok=True)
            fd = os.open(cookie, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "w") as f:
                f.write(self.cookie)
        with open(self.dir / "rabbitmq.conf", "a") as conf:
            conf.write("cluster_formation.peer_discovery_backend = classic_config\n"
                       # node 0 boots first and alone: it need not wait 5 s for peers
                       "cluster_formation.discovery_retry_limit = 1\n"
                       "cluster_formation.discovery_retry_interval = 200\n")
            for n, peer in enumerate(self.peers, 1):
                conf.write(f"cluster_formation.classic_config.nodes.{n} = {peer}\n")

    def fresh(self) -> bool:
        """No data yet: the node has never booted, so it will join rather than rejoin."""
        return not (self.dir / "mnesia").exists()

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """rabbitmqctl against this node (the cookie is found through HOME)."""
        ctl = RABBITMQCTL if os.path.exists(RABBITMQCTL) else shutil.which("rabbitmqctl")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env["HOME"] = str(self.dir / "home")
        done = subprocess.run([ctl, "-n", self.node, *args], env=env, capture_output=True,
                              text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} on {self.node}: "
                               f"{done.stderr.strip() or done.stdout.strip()}")
        return done.stdout


class RabbitCluster:
    """`nodes` private RabbitMQ nodes on loopback, clustered."""

    def __init__(self, basedir: str | os.PathLike, nodes: int = 3,
                 ports: list[int] | None = None) -> None:
        self.basedir = Path(basedir).resolve()
        self.basedir.mkdir(parents=True, exist_ok=True)
        ports = ports or self.saved_ports(nodes) or [pick_free_port() for _ in range(nodes)]
        state = self.basedir / "cluster.json"
        saved = json.loads(state.read_text()) if state.exists() else {}
        if saved.get("ports") != ports:
            saved = {"ports": ports, "dist_ports": [pick_free_port() for _ in ports],
                     "cookie": secrets.token_hex(16).upper()}
            state.write_text(json.dumps(saved))
        names = [f"saga-{port}@localhost" for port in ports]
        self.nodes = [ClusterNode(self.basedir, port, dist, saved["cookie"], names)
                      for port, dist in zip(ports, saved["dist_ports"])]

    def saved_ports(self, nodes: int) -> list[int] | None:
        """The ports of a cluster made in this basedir before, so its data is found again."""
        state = self.basedir / "cluster.json"
        if state.exists():
            ports = json.loads(state.read_text())["ports"]
            if len(ports) == nodes:
                return ports
        return None

    def url(self) -> str:
        """RABBITMQ_URL for the processes: every node's URL, comma-separated."""
        return ",".join(node.url for node in self.nodes)

    def start(self) -> "RabbitCluster":
        """Start every node and return once each serves AMQP as a member of one cluster."""
        if any(node.fresh() for node in self.nodes):
            # A fresh node joins the first peer it can reach: boot node 0 alone, then
            # the others, which all join node 0's cluster (fresh nodes booting together
            # could each decide to be the first; joins are serialized by a lock).
            self.nodes[0].start()
            rest = self.nodes[1:]
        else:
            rest = self.nodes
        for node in rest:
            node.launch()
        for node in rest:
            node.wait_started()
        self.wait_clustered()
        return self

    def wait_clustered(self, timeout: float = 60) -> None:
        """Until node 0 sees every node running (a fresh node that missed its peers
        would boot alone: a cluster of one, which must not pass for three)."""
        want = sorted(node.node for node in self.nodes)
        wait_for(lambda: self.running_nodes() == want, timeout,
                 f"nodes {want} to form one cluster", interval=0.5)

    def running_nodes(self, i: int = 0) -> list[str]:
        """The cluster's running nodes as node i sees them."""
        status = json.loads(self.nodes[i].ctl("cluster_status", "--formatter", "json"))
        return sorted(status.get("running_nodes", []))

    def queues(self) -> list[dict]:
        """Every queue as a live node sees it: name, type, leader, members, online,
        messages, messages_ready, consumers (a chaos run kills the node that leads a
        queue). A quorum queue's messages also count those dead-lettered and not yet
        confirmed by their target queue (neither ready nor unacknowledged)."""
        node = next(n for n in self.nodes if n.alive())
        return json.loads(node.ctl("list_queues", "name", "type", "leader", "members",
                                   "online", "messages", "messages_ready",
                                   "messages_unacknowledged", "consumers",
                                   "--formatter", "json"))

    def index_of(self, node_name: str) -> int:
        """Which of self.nodes is the Erlang node `node_name` (as queues() names them)."""
        return [node.node for node in self.nodes].index(node_name)

    def kill(self, i: int) -> None:
        """kill -9 node i: its whole process tree, at once (beam, epmd children, ...)."""
        self.nodes[i].kill()

    def restart(self, i: int) -> None:
        """Start node i again (after kill or stop); it rejoins with its data."""
        self.nodes[i].start()

    def alive(self, i: int) -> bool:
        return self.nodes[i].alive()

    def stop(self) -> None:
        """Gracefully, the last node first. A cluster started again after this starts
        every node at once (see start)."""
        for node in reversed(self.nodes):
            node.stop()

    def __enter__(self) -> "RabbitCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=default_basedir() / "rabbitmq-cluster")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--port", type=int, help="first AMQP port; the next nodes take "
                        "the following ones (default: free ports, kept in DIR)")
    args = parser.parse_args(argv)
    ports = [args.port + n for n in range(args.nodes)] if args.port else None
    cluster = RabbitCluster(args.dir, args.nodes, ports)
    stopping = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.append(True))
    started = time.monotonic()
    cluster.start()
    print(f"RABBITMQ_URL={cluster.url()}  ({len(cluster.nodes)} nodes in "
          f"{time.monotonic() - started:.0f} s, data in {cluster.basedir})", flush=True)
    # A node that dies (a chaos run kills them) does not end this: the cluster serves on.
    while not stopping:
        time.sleep(0.2)
    cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
