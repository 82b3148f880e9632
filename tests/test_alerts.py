"""The example alert rules in docs/ are valid Prometheus rules and use deploybot's metrics."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from bot.web.metrics import Metrics

ALERTS = Path(__file__).resolve().parents[1] / "docs" / "alerts.yml"


def test_promtool_accepts_the_example_alert_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`; .ci/run installs it)")
    done = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 3 rules found" in done.stdout


def test_the_alerts_use_metrics_deploybot_exposes() -> None:
    metrics = Metrics()
    metrics.events_failed.inc()
    metrics.action_retries.labels("ubiops", "x").inc()
    exposed = set(
        re.findall(r"^(deploybot_\w+?)(?:\{| )", generate_latest(metrics.registry).decode(), re.M)
    )
    used = set(re.findall(r"\b(deploybot_\w+)", ALERTS.read_text()))
    assert used and used <= exposed, used - exposed
