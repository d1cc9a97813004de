"""Metrics: the `Metrics` middleware counts and times deliveries, and a daemon's health server
answers /healthz, /readyz and /metrics (parsed with prometheus-client's own parser).

The metrics live in prometheus-client's process-wide registry, so each test reads how much a
sample moved, on a queue name of its own.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from pydantic import TypeAdapter

from orchestrator.broker.base import IncomingMeta
from orchestrator.broker.memory import MemoryBroker
from orchestrator.core.ledger_rules import deposit
from orchestrator.errors import PoisonMessageError, RunRefusedError
from orchestrator.settings import AMQPSettings
from orchestrator.store.ledger import Ledger
from orchestrator.store.memory import MemoryObjectStore
from schemas.messages import Envelope, GetJob
from tests._waiting import eventually
from tests.unit.test_ledger import RivalStore
from workers.middleware import EnvelopeHandler, Metrics, RefusalReplies, wrap
from workers.runtime import health_server

ENVELOPE: TypeAdapter[Envelope[Any]] = TypeAdapter(Envelope)
JOB_UID = "0123456789abcdef" * 2
NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)


def sample(name: str, **labels: str) -> float:
    """The sample's value now (0 if it was never set)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _meta(queue: str, *, redelivered: bool = False, sent: datetime | None = None) -> IncomingMeta:
    return IncomingMeta(
        queue=queue,
        message_id="amqp-id",
        correlation_id="corr",
        reply_to="p.reply.caller",
        exchange="p.commands",
        routing_key="rpc.access",
        redelivered=redelivered,
        delivery_count=1 if redelivered else 0,
        headers={},
        timestamp=sent,
    )


def _get_job() -> Envelope[GetJob]:
    return Envelope(sender="test", body=GetJob(job_uid=JOB_UID))


@pytest.fixture
def queue() -> str:
    return f"metrics-{uuid.uuid4().hex[:8]}"


def _chain(handler: EnvelopeHandler) -> EnvelopeHandler:
    async def no_reply(meta: IncomingMeta, reply: object) -> None:
        pass

    return wrap(handler, [Metrics(clock=lambda: NOW), RefusalReplies(no_reply)])


async def test_a_handled_delivery_is_counted_timed_and_its_lag_recorded(queue: str) -> None:
    seen_in_flight: list[float] = []

    async def handler(envelope: Envelope[Any], meta: IncomingMeta) -> None:
        seen_in_flight.append(sample("parjobs_handlers_in_flight", queue=queue))

    await _chain(handler)(_get_job(), _meta(queue, sent=NOW - timedelta(seconds=2)))

    assert seen_in_flight == [1.0]
    assert sample("parjobs_handlers_in_flight", queue=queue) == 0
    ok = {"queue": queue, "type": "get_job", "outcome": "ok"}
    assert sample("parjobs_messages_consumed_total", **ok) == 1
    assert sample("parjobs_handler_seconds_count", queue=queue, type="get_job") == 1
    assert sample("parjobs_message_lag_seconds_sum", queue=queue) == 2.0
    assert sample("parjobs_message_lag_seconds_bucket", queue=queue, le="1.0") == 0
    assert sample("parjobs_message_lag_seconds_bucket", queue=queue, le="5.0") == 1
    assert sample("parjobs_messages_redelivered_total", queue=queue, type="get_job") == 0


async def test_outcomes_poison_failed_refused_and_redelivered(queue: str) -> None:
    def raising(error: Exception) -> EnvelopeHandler:
        async def handler(envelope: Envelope[Any], meta: IncomingMeta) -> None:
            raise error

        return handler

    refusals = {"type": "get_job", "code": "job.run_refused"}
    refused_before = sample("parjobs_messages_refused_total", **refusals)
    with pytest.raises(PoisonMessageError):
        await _chain(raising(PoisonMessageError("bad")))(_get_job(), _meta(queue))
    with pytest.raises(RuntimeError):
        await _chain(raising(RuntimeError("down")))(_get_job(), _meta(queue, redelivered=True))
    await _chain(raising(RunRefusedError("no")))(_get_job(), _meta(queue))

    def consumed(outcome: str) -> float:
        return sample(
            "parjobs_messages_consumed_total", queue=queue, type="get_job", outcome=outcome
        )

    assert (consumed("poison"), consumed("failed"), consumed("ok")) == (1, 1, 1)
    assert sample("parjobs_messages_redelivered_total", queue=queue, type="get_job") == 1
    assert sample("parjobs_messages_refused_total", **refusals) == refused_before + 1
    assert sample("parjobs_handler_seconds_count", queue=queue, type="get_job") == 3
    assert sample("parjobs_handlers_in_flight", queue=queue) == 0


async def test_ledger_appends_and_lost_races_are_counted(memory_store: MemoryObjectStore) -> None:
    root = f"ledger-{uuid.uuid4().hex[:8]}/"
    ledger = Ledger(memory_store, root)
    appends = sample("parjobs_ledger_appends_total")
    lost = sample("parjobs_ledger_lost_races_total")
    await ledger.deposit("alice", 10)
    async with RivalStore(memory_store, ledger, [deposit("bob", 1)]) as racing:
        await Ledger(racing, root).hold(uuid.uuid4().hex, uuid.uuid4().hex, "alice", 4)
    # alice's deposit, the rival's deposit, then the hold, second time lucky
    assert sample("parjobs_ledger_appends_total") == appends + 3
    assert sample("parjobs_ledger_lost_races_total") == lost + 1


# --- the health server ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
async def broker(amqp_settings: AMQPSettings) -> AsyncIterator[MemoryBroker]:
    async with MemoryBroker(amqp_settings, name="health-test") as connected:
        await connected.declare()
        yield connected


@pytest.fixture
def port() -> int:
    return _free_port()


async def test_the_health_server_answers_health_readiness_and_metrics(
    broker: MemoryBroker, memory_store: MemoryObjectStore, port: int
) -> None:
    async with (
        health_server(broker, memory_store, "127.0.0.1", port),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http,
    ):
        healthz = await http.get("/healthz")
        assert (healthz.status_code, healthz.json()) == (200, {"alive": True})
        readyz = await http.get("/readyz")
        assert readyz.status_code == 200
        assert readyz.json() == {"ready": True, "problems": [], "reconnections": 0}
        missing = await http.get("/nope")
        assert missing.status_code == 404
        assert missing.json() == {"paths": ["/healthz", "/readyz", "/metrics"]}

        # A consumed queue with one delivery held by its handler and two waiting.
        waiting = broker.topology.work_queue("storage", events=["job.#"])
        await broker.declare(waiting)
        release = anyio.Event()

        async def held(envelope: Envelope[Any], meta: IncomingMeta) -> None:
            await release.wait()

        for _ in range(3):
            await broker.publish(broker.topology.events, "job.x", _get_job())
        await broker.consume(waiting, ENVELOPE, held, prefetch=1)
        await eventually(
            lambda: _depth_is(broker, waiting.name, 2), "two wait", timeout=5, interval=0.01
        )

        scraped = await http.get("/metrics")
        release.set()
        assert scraped.status_code == 200
        assert scraped.headers["content-type"].startswith("text/plain")
        families = {family.name: family for family in text_string_to_metric_families(scraped.text)}
        assert {
            "parjobs_messages_consumed",
            "parjobs_handler_seconds",
            "parjobs_s3_request_seconds",
            "parjobs_ledger_appends",
            "parjobs_ledger_lost_races",
            "parjobs_dead_letter_queue_depth",
        } <= set(families)
        (depth,) = families["parjobs_dead_letter_queue_depth"].samples
        assert depth.value == 0
        assert [
            sample.value
            for sample in families["parjobs_queue_depth"].samples
            if sample.labels == {"queue": waiting.name}
        ] == [2]


async def _depth_is(broker: MemoryBroker, queue: str, expected: int) -> bool:
    return (await broker.queue_depths()).get(queue) == expected


async def test_readiness_is_503_naming_what_is_wrong(
    broker: MemoryBroker, memory_store: MemoryObjectStore, port: int
) -> None:
    await broker.close()
    async with (
        health_server(broker, memory_store, "127.0.0.1", port),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http,
    ):
        readyz = await http.get("/readyz")
        assert readyz.status_code == 503
        assert readyz.json()["problems"] == ["the broker connection is down"]
        assert (await http.get("/metrics")).status_code == 200  # a down broker is no 500
