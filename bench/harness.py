"""Shared pieces of the benchmarks: payloads, tokens, rule folders, and server processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import jwt
from sqlalchemy import insert

from bot.db.models import action_runs, events
from bot.rules.loader import JIRA_EVENTS

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
SECRET = "bench-client-secret-" + "s" * 24
PAYLOAD_BYTES = 4096
TOKEN_TTL_S = 24 * 3600


def oauth_token(secret: str = SECRET, ttl_s: int = TOKEN_TTL_S) -> str:
    """Return a long-lived HS256 token as Jira signs OAuth 2.0 app deliveries."""
    now = int(time.time())
    claims = {"iss": "bench", "iat": now, "exp": now + ttl_s, "context": {}}
    return jwt.encode(claims, secret, algorithm="HS256")


def issue_updated(key: str = "OPS-1", size_bytes: int = PAYLOAD_BYTES) -> dict[str, Any]:
    """Return a jira:issue_updated payload padded to about `size_bytes` with a description."""
    payload: dict[str, Any] = json.loads((ROOT / "tests/data/jira_issue_updated.json").read_text())
    payload["issue"]["key"] = key
    payload["issue"]["fields"]["description"] = ""
    pad = size_bytes - len(json.dumps(payload))
    payload["issue"]["fields"]["description"] = ("Steps to roll out the model. " * 200)[
        : max(pad, 0)
    ]
    return payload


def write_rules(folder: Path, count: int, *, ubiops_call: bool = False) -> Path:
    """Write `count` rules spread over Jira's events; with `ubiops_call` rule 0 matches."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["rules:"]
    for i in range(count):
        matching = ubiops_call and i == 0
        event = "jira:issue_updated" if matching else JIRA_EVENTS[i % len(JIRA_EVENTS)]
        status = "Ready to deploy" if matching else f"Stage {i}"
        lines.append(
            f"""  - name: rule-{i}
    on:
      events: [{event}]
      jql: project = OPS
    when:
      - changed: status
        to: {status}
      - field: issue.fields.summary
        matches: "(?i)model|hotfix-{i}"
    do:
      - action: ubiops.deployment_versions_create
        with:
          project_name: ml-prod
          deployment_name: churn
          data:
            version: "{{{{ issue.key | lower }}}}"
            environment: python3-11"""
        )
    (folder / "bench.yaml").write_text("\n".join(lines) + "\n")
    return folder


def write_matching_rule(folder: Path) -> Path:
    """One rule every bench delivery matches, three UbiOps calls (create, two reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = "project_name: ml-prod\n          deployment_name: churn"
    (folder / "bench.yaml").write_text(
        f"""rules:
  - name: rollout
    on: {{events: [jira:issue_updated]}}
    when:
      - changed: status
        to: Ready to deploy
    do:
      - id: version
        action: ubiops.deployment_versions_create
        with:
          {target}
          data: {{version: "{{{{ issue.key | lower }}}}", environment: python3-11}}
      - action: ubiops.deployment_versions_get
        with:
          {target}
          version: "{{{{ steps.version.version }}}}"
      - action: ubiops.deployments_get
        with:
          {target}
"""
    )
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_http(url: str, timeout_s: float = 30.0) -> None:
    """Wait until `url` answers 200."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not become ready in {timeout_s} s")
        time.sleep(0.1)


def serve_env(
    workdir: Path, port: int, database_url: str, rules: Path, **extra: str
) -> dict[str, str]:
    """Environment for `deploybot serve` with default settings except the given ones."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEPLOYBOT_", "JIRA_"))}
    env.update(
        DEPLOYBOT_DATABASE_URL=database_url,
        DEPLOYBOT_RULES_DIR=str(rules),
        DEPLOYBOT_HOST="127.0.0.1",
        DEPLOYBOT_PORT=str(port),
        JIRA_CLIENT_SECRET=SECRET,
        PYTHONPATH=str(ROOT),
        **extra,
    )
    return env


@contextlib.contextmanager
def process(
    args: list[str], env: dict[str, str], cwd: Path, ready_url: str, log_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server process until the block ends (SIGINT: a graceful stop), logging to a file."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_http(ready_url)
            yield proc
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def deploybot(
    workdir: Path, port: int, database_url: str, rules: Path, **extra: str
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    """Run `deploybot serve` (as `python -m bot serve`) until the block ends."""
    return process(
        [PYTHON, "-m", "bot", "serve"],
        serve_env(workdir, port, database_url, rules, **extra),
        workdir,
        f"http://127.0.0.1:{port}/readyz",
        workdir / f"deploybot-{port}.log",
    )


def profile(pid: int, duration_s: float, out: Path) -> subprocess.Popen[bytes]:
    """Start py-spy (install it into .venv for profiling) on a process; collapsed stacks."""
    spy = Path(PYTHON).with_name("py-spy")
    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            str(spy),
            "record",
            "-p",
            str(pid),
            "-d",
            str(int(duration_s)),
            "-f",
            "raw",
            "-o",
            str(out),
            *(["--native"] if os.environ.get("BENCH_PROFILE_NATIVE") else []),
            "--threads",
            "--rate",
            os.environ.get("BENCH_PROFILE_RATE", "100"),
            *(["--gil"] if os.environ.get("BENCH_PROFILE_GIL") else []),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def cpu_seconds(pid: int, *, thread: int | None = None) -> float:
    """CPU time (user + system) a live process, or one of its threads, has used so far."""
    path = f"/proc/{pid}/task/{thread}/stat" if thread is not None else f"/proc/{pid}/stat"
    try:
        fields = Path(path).read_text().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def log_tail(workdir: Path, lines: int = 20) -> str:
    """Return the end of every server log in `workdir` (for a failed run's report)."""
    out = []
    for path in sorted(workdir.glob("*.log")):
        out.append(f"--- {path.name}")
        out.extend(path.read_text(errors="replace").splitlines()[-lines:])
    return "\n".join(out)


async def seed_processed_events(
    conn: Any,
    count: int,
    *,
    prefix: str,
    body: bytes,
    now: datetime,
    run_of: Callable[[int], dict[str, Any]],
) -> None:
    """Insert `count` processed issue-updated events (`body % i` each), 1,000 a statement,
    and the action run `run_of(event_id)` of each: the backlog a benchmark starts from."""
    for start in range(0, count, 1000):
        chunk = range(start, min(start + 1000, count))
        rows = [
            {
                "tenant": "",
                "delivery_id": f"{prefix}-{i}",
                "retry_count": 0,
                "webhook_event": "jira:issue_updated",
                "issue_key": f"OPS-{i}",
                "source": "live",
                "body": body % i,
                "status": "processed",
                "received_at": now,
                "attempts": 1,
            }
            for i in chunk
        ]
        ids = (await conn.execute(insert(events).returning(events.c.id), rows)).scalars().all()
        await conn.execute(insert(action_runs), [run_of(event_id) for event_id in ids])
