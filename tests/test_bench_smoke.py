"""The benchmarks still run end to end (about a second of load each; no timing asserted)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_bench(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt install wrk)")
def test_ingest_bench_runs_and_every_202_is_stored() -> None:
    out = run_bench("ingest.py", "--duration", "1", "--connections", "8", "--rules", "50")
    assert out.count("every 202 is a stored row") == 2
    assert "ratio deploybot/bare (50 rules)" in out


def test_pipeline_bench_drains_with_one_ubiops_call_per_event() -> None:
    out = run_bench("pipeline.py", "--duration", "1", "--events", "60", "--connections", "8")
    assert "UbiOps creates 60 for 60 events" in out
    assert "backlog zero" in out


@pytest.mark.slow
def test_waiting_bench_measures_idle_waits() -> None:
    out = run_bench("waiting.py", "--runs", "50", "--duration", "1", "--ticks", "20")
    assert "50 runs waiting on until" in out
    assert "due-check per tick (claim, nothing due)" in out


def test_recovery_bench_kills_restarts_and_resumes_without_repeating_a_create() -> None:
    out = run_bench("recovery.py", "--rate", "40", "--send-s", "1", "--post-delay-s", "0.5")
    assert "restarted process resumed every claim" in out
    assert "(one per event: nothing done twice)" in out
