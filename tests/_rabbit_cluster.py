"""A RabbitMQ cluster of three nodes of its own on this machine, for failover tests.

Each node has its own name (`pjc<n>-<tag>@localhost`), AMQP and inter-node ports, data and log
directories, and runs `rabbitmq-server` in the foreground as a child process in a session of its
own: killed (SIGKILL, as a crash) and started again by its process group, never through
`rabbitmqctl stop`, so the machine's shared node is never touched. The nodes share an Erlang
cookie through `HOME` (`$HOME/.erlang.cookie`, read by the server and `rabbitmqctl` alike). Only
the first node runs the management plugin, on a port of its own: provisioning broker users goes
through it (users and permissions are cluster-wide).

The scripts are run from `/usr/lib/rabbitmq/bin`, not `/usr/sbin`: Debian's wrappers there switch
to the `rabbitmq` user, whose home would hold another cookie.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import anyio
from pydantic import SecretStr

from orchestrator.settings import ManagementSettings

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
START_TIMEOUT_S = 90.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class NodeCommandError(RuntimeError):
    """A `rabbitmqctl` command failed."""


async def _listening(port: int) -> bool:
    try:
        stream = await anyio.connect_tcp("127.0.0.1", port)
    except OSError:
        return False
    await stream.aclose()
    return True


@dataclass
class Node:
    name: str
    """The Erlang node name, `pjc<n>-<tag>@localhost`."""
    amqp_port: int
    dist_port: int
    dir: Path
    management_port: int | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def up(self) -> bool:
        return self.process is not None and self.process.poll() is None


class RabbitCluster:
    """Three RabbitMQ nodes clustered together, and an administrator on them."""

    def __init__(self, size: int = 3) -> None:
        if not (RABBITMQ_BIN / "rabbitmq-server").exists():
            raise RuntimeError(f"no RabbitMQ server scripts in {RABBITMQ_BIN}: install rabbitmq")
        tag = secrets.token_hex(4)
        self.dir = Path(tempfile.mkdtemp(prefix="parjobs-rabbit-cluster-"))
        cookie = self.dir / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20))
        cookie.chmod(0o400)  # Erlang refuses a cookie others may read
        self.nodes = [
            Node(
                name=f"pjc{n}-{tag}@localhost",
                amqp_port=_free_port(),
                dist_port=_free_port(),
                dir=self.dir / f"node{n}",
                management_port=_free_port() if n == 1 else None,
            )
            for n in range(1, size + 1)
        ]
        self.admin_user = f"pjc-admin-{tag}"
        self.admin_password = SecretStr(secrets.token_hex(24))  # hex: never a leading "-"

    # --- what clients are given ------------------------------------------------------------------

    def amqp_urls(self) -> str:
        """The administrator's PARJOBS_AMQP_URL: every node's URL, the first node's first."""
        password = self.admin_password.get_secret_value()
        return ",".join(
            f"amqp://{self.admin_user}:{password}@127.0.0.1:{node.amqp_port}/"
            for node in self.nodes
        )

    @property
    def management(self) -> ManagementSettings:
        return ManagementSettings(
            url=f"http://127.0.0.1:{self.nodes[0].management_port}",
            username=self.admin_user,
            password=self.admin_password,
        )

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every node, join the others to the first, and add the administrator."""
        for node in self.nodes:
            self._write_config(node)
            self._spawn(node)
        for node in self.nodes:
            await self.await_startup(node)
        first = self.nodes[0].name
        for node in self.nodes[1:]:
            await self.ctl(node, "stop_app")
            await self.ctl(node, "join_cluster", first)
            await self.ctl(node, "start_app")
        password = self.admin_password.get_secret_value()
        await self.ctl(self.nodes[0], "add_user", self.admin_user, password)
        await self.ctl(self.nodes[0], "set_user_tags", self.admin_user, "administrator")
        await self.ctl(self.nodes[0], "set_permissions", self.admin_user, ".*", ".*", ".*")

    def _write_config(self, node: Node) -> None:
        node.dir.mkdir(parents=True, exist_ok=True)
        lines = [f"listeners.tcp.1 = 127.0.0.1:{node.amqp_port}"]
        plugins = "[]."
        if node.management_port is not None:
            lines += [
                f"management.tcp.port = {node.management_port}",
                "management.tcp.ip = 127.0.0.1",
            ]
            plugins = "[rabbitmq_management]."
        (node.dir / "rabbitmq.conf").write_text("\n".join(lines) + "\n")
        (node.dir / "enabled_plugins").write_text(plugins + "\n")
        (node.dir / "rabbitmq-env.conf").write_text("")  # not the machine's (its NODENAME)

    def _environment(self, node: Node) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.dir),  # the cluster's cookie
            "LANG": "C.UTF-8",
            "RABBITMQ_NODENAME": node.name,
            "RABBITMQ_NODE_PORT": str(node.amqp_port),
            "RABBITMQ_DIST_PORT": str(node.dist_port),
            "RABBITMQ_CONFIG_FILE": str(node.dir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(node.dir / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(node.dir / "rabbitmq-env.conf"),
            "RABBITMQ_MNESIA_BASE": str(node.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(node.dir / "log"),
            "RABBITMQ_LOGS": "-",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def _spawn(self, node: Node) -> None:
        with (node.dir / "server.log").open("ab") as log:
            node.process = subprocess.Popen(
                [str(RABBITMQ_BIN / "rabbitmq-server")],
                env=self._environment(node),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: the shell script and the VM
            )

    async def await_startup(self, node: Node) -> None:
        """Until `node` runs RabbitMQ (a restarted node has rejoined the cluster by then).
        `await_startup` gives up at once while the VM has not registered its name yet."""
        with anyio.fail_after(START_TIMEOUT_S):
            while True:
                try:
                    await self.ctl(node, "await_startup", "--timeout", str(int(START_TIMEOUT_S)))
                except NodeCommandError:
                    await anyio.sleep(0.5)
                else:
                    break
            # The management listener may come a moment after the node says it has started.
            while node.management_port is not None and not await _listening(node.management_port):
                await anyio.sleep(0.2)

    async def ctl(self, node: Node, *args: str, timeout: float = 60) -> str:  # noqa: ASYNC109
        """`rabbitmqctl -n <node> args...` with the cluster's cookie; its output."""
        if node.process is not None and node.process.poll() is not None:
            raise RuntimeError(f"{node.name} exited:\n{self.log_tail(node)}")
        with anyio.fail_after(timeout):
            result = await anyio.run_process(
                [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", node.name, *args],
                env={"PATH": os.environ.get("PATH", ""), "HOME": str(self.dir), "LANG": "C.UTF-8"},
                check=False,
            )
        if result.returncode != 0:
            raise NodeCommandError(
                f"rabbitmqctl -n {node.name} {' '.join(args[:1])} failed: "
                f"{result.stderr.decode(errors='replace')}\n{self.log_tail(node)}"
            )
        return result.stdout.decode()

    def log_tail(self, node: Node, lines: int = 15) -> str:
        try:
            text = (node.dir / "server.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    async def kill(self, node: Node) -> None:
        """SIGKILL the node's process group (its script and its Erlang VM), as a crash would."""
        process = node.process
        assert process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with anyio.fail_after(30):
            while process.poll() is None:
                await anyio.sleep(0.05)

    async def restart(self, node: Node) -> None:
        """Start a killed node again on its own data: it rejoins the cluster."""
        assert not node.up, f"{node.name} is still running"
        self._spawn(node)
        await self.await_startup(node)

    async def heal(self) -> None:
        """Start again every node a test left down (one that failed before restarting it)."""
        for node in self.nodes:
            if not node.up:
                await self.restart(node)

    async def connection_nodes(self, marker: str) -> list[tuple[str, str]]:
        """(node, client properties) of each client connection whose properties hold `marker`
        (e.g. its connection name), asked of a running node: a connection's pid names the node
        that holds it."""
        live = next(node for node in self.nodes if node.up)
        listing = await self.ctl(
            live, "list_connections", "--no-table-headers", "--silent", "pid", "client_properties"
        )
        found = []
        for line in listing.splitlines():
            pid, _, properties = line.partition("\t")
            if marker in properties:
                found.append((pid.strip("<>").split(".", 1)[0], properties))
        return found

    def node_named(self, name: str) -> Node:
        return next(node for node in self.nodes if node.name == name)

    async def stop(self) -> None:
        for node in self.nodes:
            if node.up:
                await self.kill(node)
        shutil.rmtree(self.dir, ignore_errors=True)
