"""Observability end to end: the three daemons as processes run a job, then each one's /metrics is
scraped and parsed with prometheus-client's own parser, and says what the daemon did."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from orchestrator.store.base import ObjectStore
from orchestrator.store.seaweed import LocalSeaweed
from schemas.events import JobState
from tests.e2e.test_e2e import HAPPY_PATH, Harness, open_cluster, payload
from workers.cluster import ROLES

pytestmark = pytest.mark.integration

MAX_RUNS = 3


@pytest.fixture(scope="module")
async def harness(seaweed: LocalSeaweed, store: ObjectStore) -> AsyncIterator[Harness]:
    async with open_cluster(seaweed, store, {"PARJOBS_MAX_RUNS": str(MAX_RUNS)}) as opened:
        yield opened


async def scrape(harness: Harness, role: str) -> list[Sample]:
    """Every sample `role`'s /metrics serves, as prometheus-client parses it."""
    async with httpx.AsyncClient(timeout=5) as http:
        response = await http.get(harness.health_url(role, "/metrics"))
    assert response.status_code == 200, response.text
    return [
        sample
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    ]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels`."""
    return sum(
        sample.value
        for sample in samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


async def test_each_daemon_serves_metrics_of_what_it_did_for_a_job(harness: Harness) -> None:
    data = payload(5000, "observed")
    sheet = await harness.run_job(data)
    assert sheet.state is JobState.COMPLETED, sheet.reason
    scraped = {role: await scrape(harness, role) for role in ROLES}

    transitions = {
        kind: sum(
            total(samples, "parjobs_job_transitions_total", type=kind)
            for samples in scraped.values()
        )
        for kind in HAPPY_PATH
    }
    assert all(count >= 1 for count in transitions.values()), transitions
    assert total(scraped["access"], "parjobs_job_transitions_total", type="submitted") >= 1
    assert total(scraped["compute"], "parjobs_job_transitions_total", type="completed") >= 1
    for role in ROLES:
        samples = scraped[role]
        assert total(samples, "parjobs_messages_consumed_total", outcome="ok") >= 1, role
        assert total(samples, "parjobs_messages_consumed_total", outcome="failed") == 0, role
        assert total(samples, "parjobs_handler_seconds_count") >= 1, role
        assert total(samples, "parjobs_messages_published_total") >= 1, role
        assert total(samples, "parjobs_s3_request_seconds_count", operation="get_object") >= 1
        assert total(samples, "parjobs_dead_letter_queue_depth") == 0, role
    # Access holds the job's price and settles it: two ledger appends at least.
    assert total(scraped["access"], "parjobs_ledger_appends_total") >= 2
    runs = harness.topology.rpc_queue("runs").name
    assert total(scraped["compute"], "parjobs_handler_slots", queue=runs) == MAX_RUNS
    assert total(scraped["compute"], "parjobs_handlers_in_flight", queue=runs) == 0
    assert total(scraped["compute"], "parjobs_handler_seconds_count", queue=runs) >= 1
