"""Issue 11's failures, injected for real (see fault_injection.py, which also runs them as a script
and prints a table): each scenario runs the real commands with loader workers on and checks what the
user sees. A scenario covers several cases; the assertion lists every case that went wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from fault_injection import SCENARIOS, Report, make_data

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("faults_mini"))


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_fault_scenario(name, shards, tmp_path):
    report = Report()
    SCENARIOS[name](report, shards, tmp_path)
    assert report.rows, "the scenario checked nothing"
    failed = report.failures()
    assert not failed, "\n\n".join(f"{r.case}: {r.outcome}" for r in failed)
