"""`LocalCluster`: the three daemons as separate processes, for `parjobs dev`, the demo and tests.

It gives them one configuration through the environment (S3, broker prefix, a freshly made
compute key file), a health port each, and log files; `start` returns once every daemon answers
/readyz. `kill` and `restart` exist for the crash tests.
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

from orchestrator._exceptions import ConfigurationError
from orchestrator._keys import KeyPair
from orchestrator._settings import AMQPSettings, S3Settings
from workers.daemons import delete_topology

ROLES = ("access", "storage", "compute")


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
    ) -> None:
        self.keep_dir = keep_dir
        self.delete_topology = delete_topology  # for throwaway prefixes: leave the broker clean
        self.s3 = s3
        self.prefix = prefix
        self._overrides = dict(overrides or {})
        self._ready_timeout = ready_timeout
        self.dir = Path(tempfile.mkdtemp(prefix="parjobs-cluster-"))
        self.health_ports: dict[str, int] = {}
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._environment: dict[str, str] = {}

    @property
    def data_root(self) -> str:
        return self._overrides.get("PARJOBS_DATA_ROOT", "")

    @property
    def amqp(self) -> AMQPSettings:
        return AMQPSettings(prefix=self.prefix)

    def log_path(self, role: str) -> Path:
        return self.dir / f"{role}.log"

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

    async def start(self) -> None:
        passphrase = secrets.token_urlsafe(16)
        key_file = self.dir / "compute.key"
        KeyPair.generate("compute").save(key_file, passphrase)
        self._environment = {
            **os.environ,
            **s3_environment(self.s3),
            "PARJOBS_PREFIX": self.prefix,
            "PARJOBS_COMPUTE_KEY_FILE": str(key_file),
            "PARJOBS_KEY_PASSPHRASE": passphrase,
            **self._overrides,
        }
        for role in ROLES:
            self.health_ports[role] = _free_port()
            self._spawn(role)
        for role in ROLES:
            await self.wait_ready(role)

    def _spawn(self, role: str) -> None:
        env = {**self._environment, "PARJOBS_HEALTH_PORT": str(self.health_ports[role])}
        with self.log_path(role).open("ab") as log:
            self._processes[role] = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                [sys.executable, "-m", "orchestrator.cli", role],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    async def wait_ready(self, role: str) -> None:
        url = f"http://127.0.0.1:{self.health_ports[role]}/readyz"
        with anyio.move_on_after(self._ready_timeout):
            async with httpx.AsyncClient(timeout=1.0) as http:
                while True:
                    process = self._processes[role]
                    if process.poll() is not None:
                        raise ConfigurationError(
                            f"the {role} daemon exited with {process.returncode}:\n"
                            + self.log_tail(role)
                        )
                    with contextlib.suppress(httpx.TransportError):
                        if (await http.get(url)).status_code == 200:
                            return
                    await anyio.sleep(0.1)
        raise ConfigurationError(f"the {role} daemon was not ready in time:\n{self.log_tail(role)}")

    def log_tail(self, role: str, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path(role).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def pid(self, role: str) -> int:
        return self._processes[role].pid

    async def kill(self, role: str, sig: signal.Signals = signal.SIGKILL) -> int | None:
        """Send `sig` to a daemon and wait for it to exit; its exit code."""
        process = self._processes[role]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with anyio.move_on_after(30):
            while process.poll() is None:
                await anyio.sleep(0.05)
        return process.poll()

    async def restart(self, role: str) -> None:
        await self.kill(role, signal.SIGKILL)
        self._spawn(role)
        await self.wait_ready(role)

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
