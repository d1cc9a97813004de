"""The seed page's JobSheet API over a job's state (pure; request_services runs in test_e2e)."""

from __future__ import annotations

import json

import pytest

from orchestrator.client.jobsheet import JobSheet
from orchestrator.errors import JobError
from schemas.events import JobRequest, JobState
from tests.unit.test_jobstate import PATHS, REQUEST, sheet_in


def test_null_jobsheet() -> None:
    sheet = JobSheet(JobRequest(calculation="checksum"))
    assert sheet.is_null()
    assert sheet.uid() is None
    assert sheet.state() is None
    assert sheet.job() == JobRequest(calculation="checksum")
    assert JobSheet().job() is None


def test_existing_jobsheet_round_trips_through_json() -> None:
    sheet = JobSheet(state=sheet_in(JobState.RUNNING))
    assert not sheet.is_null()
    assert sheet.job() == REQUEST
    again = JobSheet.from_data(json.loads(json.dumps(sheet.to_data())))
    assert again.state() == sheet.state()
    assert again.uid() == sheet.uid()
    assert JobSheet.from_data(JobSheet().to_data()).is_null()
    state = sheet.state()
    assert state is not None
    assert state.seq == len(PATHS[JobState.RUNNING])


def test_bad_data_and_mismatched_request_are_refused() -> None:
    with pytest.raises(JobError, match="not JobSheet data"):
        JobSheet.from_data({"job": {"calculation": ""}})
    with pytest.raises(JobError, match="disagree"):
        JobSheet(JobRequest(calculation="other"), state=sheet_in(JobState.READY))
