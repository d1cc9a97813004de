"""`LocalCluster`: the three daemons as separate processes, for `parjobs dev`, the demo and tests.

It plays the operator: it makes a key pair per service role and the service keys file listing
their public halves, gives the operator and each role a broker user of its own (through RabbitMQ's
management API, as `PARJOBS_MANAGEMENT_*`'s administrator), declares the topology as the operator,
and starts each daemon as its role (its own broker URL and key file), with a health port each and
log files; `start` returns once every daemon answers /readyz. `add_user` registers a user and gives
them a broker user, so a test client connects as that user (`user_amqp`). `kill` and `restart`
exist for the crash tests.

A role may run as several replicas (`replicas={"access": 2}`): the first is named after its role
("access"), the others "access#2", "access#3"...; every method that takes a daemon takes either
name, so callers that know of one daemon per role need not change.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Self

import anyio
import httpx

from orchestrator.broker.admin import BrokerAdmin, vhost_of
from orchestrator.broker.deployment import (
    Deployment,
    declare_topology,
    delete_topology,
    provision_roles,
    provision_user,
    remove_users,
)
from orchestrator.broker.identities import Role
from orchestrator.core.keys import KeyPair, PublicKeys
from orchestrator.core.layout import JobKeys
from orchestrator.core.service_keys import ServiceKeys
from orchestrator.errors import ConfigurationError
from orchestrator.services.accounts import Accounts
from orchestrator.settings import AMQPSettings, ManagementSettings, S3Settings
from orchestrator.store.s3 import S3ObjectStore
from schemas.signing import SERVICE_ROLES, ServiceRole

ROLES = ("access", "storage", "compute")
_REPLICA_MARK = "#"


def replica_name(role: str, index: int) -> str:
    """The name of replica `index` (from 1) of `role`: the role itself for the first."""
    if index < 1:
        raise ValueError(f"replicas are numbered from 1, not {index}")
    return role if index == 1 else f"{role}{_REPLICA_MARK}{index}"


def role_of(name: str) -> str:
    """The role a daemon named `name` ("access", "access#2", ...) plays."""
    return name.split(_REPLICA_MARK, 1)[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def s3_environment(s3: S3Settings) -> dict[str, str]:
    """`s3` as the PARJOBS_S3_* variables a daemon (or `parjobs replay`) reads."""
    access_key, secret_key = s3.require_credentials()
    env = {
        "PARJOBS_S3_ENDPOINT_URL": s3.require_endpoint(),
        "PARJOBS_S3_ACCESS_KEY_ID": access_key,
        "PARJOBS_S3_SECRET_ACCESS_KEY": secret_key,
        "PARJOBS_S3_REGION": s3.region,
        "PARJOBS_S3_BUCKET": s3.bucket,
    }
    if s3.public_endpoint_url:
        env["PARJOBS_S3_PUBLIC_ENDPOINT_URL"] = s3.public_endpoint_url
    return env


class LocalCluster:
    """access, storage and compute daemons on one S3 store and one broker prefix."""

    def __init__(
        self,
        s3: S3Settings,
        *,
        prefix: str = "parjobs",
        overrides: dict[str, str] | None = None,
        ready_timeout: float = 30.0,
        keep_dir: bool = False,
        delete_topology: bool = False,
        replicas: dict[str, int] | None = None,
        management: ManagementSettings | None = None,
    ) -> None:
        counts = {role: 1 for role in ROLES} | dict(replicas or {})
        if unknown := set(counts) - set(ROLES):
            raise ValueError(f"no such role: {', '.join(sorted(unknown))} (roles: {ROLES})")
        if bad := {role: n for role, n in counts.items() if n < 1}:
            raise ValueError(f"every role needs at least one replica, not {bad}")
        self.instances: tuple[str, ...] = tuple(
            replica_name(role, index) for role in ROLES for index in range(1, counts[role] + 1)
        )
        """Every daemon's name, in start order: "access", "access#2", ..., "storage", ..."""
        self.keep_dir = keep_dir
        self.delete_topology = delete_topology
        """For throwaway prefixes: leave the broker clean (topology and broker users) at stop."""
        self.management = management if management is not None else ManagementSettings()
        self.s3 = s3
        self.prefix = prefix
        self._overrides = dict(overrides or {})
        self._ready_timeout = ready_timeout
        self.dir = Path(tempfile.mkdtemp(prefix="parjobs-cluster-"))
        self.health_ports: dict[str, int] = {}
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._environment: dict[str, str] = {}
        self.key_passphrase = secrets.token_urlsafe(16)
        """The passphrase of every role's key file (`key_file`)."""
        self.service_keys = self._make_keys()
        """Each role's public keys, as the operator hands them out (`service_keys_file`)."""
        self._deployment: Deployment | None = None

    @property
    def data_root(self) -> str:
        return self._overrides.get("PARJOBS_DATA_ROOT", "")

    @property
    def amqp(self) -> AMQPSettings:
        """The broker as the operator's set-up user (an administrator) reaches it."""
        return AMQPSettings(prefix=self.prefix)

    @property
    def deployment(self) -> Deployment:
        """The broker users provisioned for this cluster (once started)."""
        if self._deployment is None:
            raise ConfigurationError("the cluster is not started: its broker users do not exist")
        return self._deployment

    @property
    def operator_amqp(self) -> AMQPSettings:
        """The broker as the operator connects: declares, replays, reads the dead letters."""
        return self.deployment.role_settings(Role.OPERATOR)

    def user_amqp(self, name: str) -> AMQPSettings:
        """The broker as the registered user `name` connects (after `add_user`)."""
        return self.deployment.user_settings(name)

    async def add_user(self, name: str, public_key: PublicKeys) -> AMQPSettings:
        """Register `name` with `public_key` (as `parjobs users add`) and give them a broker
        user: the settings their client connects with."""
        async with S3ObjectStore(self.s3) as store:
            await Accounts(store, JobKeys(self.data_root)).add_user(name, public_key)
        async with self._admin() as admin:
            await provision_user(admin, self.deployment, name)
        return self.user_amqp(name)

    def _admin(self) -> BrokerAdmin:
        return BrokerAdmin(self.management, vhost=vhost_of(self.amqp.amqp_url.get_secret_value()))

    def replicas(self, role: str) -> tuple[str, ...]:
        """The names of `role`'s daemons ("access", "access#2", ...)."""
        return tuple(name for name in self.instances if role_of(name) == role)

    def log_path(self, name: str) -> Path:
        return self.dir / f"{self._known(name)}.log"

    def _known(self, name: str) -> str:
        if name not in self.instances:
            raise ValueError(f"no daemon {name!r} in this cluster (daemons: {self.instances})")
        return name

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def key_file(self, role: str) -> Path:
        """The key file of service role `role` (its passphrase: `key_passphrase`)."""
        return self.dir / f"{role}.key"

    @property
    def service_keys_file(self) -> Path:
        """The operator's service keys file: what clients check replies and events against."""
        return self.dir / "service-keys.json"

    def _make_keys(self) -> ServiceKeys:
        """A key pair per role, and the service keys file listing their public halves."""
        public: dict[ServiceRole, PublicKeys] = {}
        for role in SERVICE_ROLES:
            pair = KeyPair.generate(role)
            pair.save(self.key_file(role), self.key_passphrase)
            public[role] = pair.public
        service_keys = ServiceKeys(public)
        service_keys.save(self.service_keys_file)
        return service_keys

    async def start(self) -> None:
        async with self._admin() as admin:
            await admin.check()  # a clear error, naming the fix, if the management API is off
            self._deployment = await provision_roles(admin, self.amqp)
        await declare_topology(self.operator_amqp)
        self._environment = {
            **os.environ,
            **s3_environment(self.s3),
            "PARJOBS_PREFIX": self.prefix,
            "PARJOBS_SERVICE_KEYS_FILE": str(self.service_keys_file),
            "PARJOBS_KEY_PASSPHRASE": self.key_passphrase,
            **self._overrides,
        }
        for name in self.instances:
            self.health_ports[name] = _free_port()
            self._spawn(name)
        for name in self.instances:
            await self.wait_ready(name)

    def _spawn(self, name: str) -> None:
        role = role_of(name)
        env = {
            **self._environment,
            "PARJOBS_HEALTH_PORT": str(self.health_ports[name]),
            "PARJOBS_KEY_FILE": str(self.key_file(role)),
            "PARJOBS_AMQP_URL": self.deployment.role_settings(
                Role(role)
            ).amqp_url.get_secret_value(),
        }
        with self.log_path(name).open("ab") as log:
            self._processes[name] = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                [sys.executable, "-m", "orchestrator.cli", role_of(name)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    async def wait_ready(self, name: str) -> None:
        url = f"http://127.0.0.1:{self.health_ports[self._known(name)]}/readyz"
        with anyio.move_on_after(self._ready_timeout):
            async with httpx.AsyncClient(timeout=1.0) as http:
                while True:
                    process = self._processes[name]
                    if process.poll() is not None:
                        raise ConfigurationError(
                            f"the {name} daemon exited with {process.returncode}:\n"
                            + self.log_tail(name)
                        )
                    with contextlib.suppress(httpx.TransportError):
                        if (await http.get(url)).status_code == 200:
                            return
                    await anyio.sleep(0.1)
        raise ConfigurationError(f"the {name} daemon was not ready in time:\n{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path(name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def pid(self, name: str) -> int:
        return self._processes[self._known(name)].pid

    async def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> int | None:
        """Send `sig` to a daemon and wait for it to exit; its exit code."""
        process = self._processes[self._known(name)]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with anyio.move_on_after(30):
            while process.poll() is None:
                await anyio.sleep(0.05)
        return process.poll()

    async def restart(self, name: str) -> None:
        await self.kill(name, signal.SIGKILL)
        self._spawn(name)
        await self.wait_ready(name)

    async def stop(self) -> None:
        """SIGTERM every daemon (they drain), SIGKILL what is left after 30 s."""
        for process in self._processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        with anyio.move_on_after(30):
            while any(p.poll() is None for p in self._processes.values()):
                await anyio.sleep(0.05)
        for process in self._processes.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        if self.delete_topology:
            await delete_topology(self.amqp)
            if self._deployment is not None:
                async with self._admin() as admin:
                    await remove_users(admin, self.amqp)
